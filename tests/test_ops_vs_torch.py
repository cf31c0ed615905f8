"""minvis_jax.ops against torch: point sampling as grid_sample, resizing as interpolate (bilinear,
align_corners=False, no antialias)."""

import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import ops

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
F = pytest.importorskip('torch.nn.functional')


def test_bilinear_corners_equal_grid_sample():
  rng = np.random.default_rng(0)
  masks = rng.normal(size=(3, 5, 7)).astype(np.float32)
  coords = rng.uniform(-0.2, 1.2, size=(400, 2)).astype(np.float32)  # includes the zero padding
  rows = masks.reshape(3, -1)
  ours = 0.0
  for position, weight in ops.bilinear_corners(jnp.asarray(coords), 5, 7):
    ours = ours + np.asarray(weight)[None] * rows[:, np.asarray(position)]
  grid = torch.from_numpy(coords * 2 - 1)[None, None]                          # [1, 1, P, 2]
  ref = F.grid_sample(torch.from_numpy(masks)[None], grid, mode='bilinear', padding_mode='zeros',
                      align_corners=False)[0, :, 0].numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize('size', [(5, 7), (32, 40), (16, 24), (1, 3)])
def test_resize_bilinear_equals_interpolate(size):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 12, 4)).astype(np.float32)
  ours = np.asarray(ops.resize_bilinear(jnp.asarray(x), *size))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode='bilinear',
                      align_corners=False, antialias=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize('n_in,n_out', [(4, 9), (9, 4), (6, 6), (1, 5), (23, 100)])
def test_bilinear_matrix_equals_interpolate(n_in, n_out):
  eye = torch.eye(n_in, dtype=torch.float64)[:, None, :]                       # [n_in, 1, n_in]
  ref = F.interpolate(eye, size=n_out, mode='linear', align_corners=False)[:, 0].T.numpy()
  np.testing.assert_allclose(ops.bilinear_matrix(n_in, n_out), ref, atol=1e-12)
