"""Tests for minvis_jax.ops: the bilinear corners against hand-computed values, the resize matrix
against a hand example and against `resize_bilinear`, and the device normalisation against the
host one."""

import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import ops
from minvis_jax.data import transforms


def _corners(coords, height, width):
  """ops.bilinear_corners of points [P, 2] as numpy (positions [4, P], weights [4, P])."""
  corners = ops.bilinear_corners(jnp.asarray(coords, jnp.float32), height, width)
  return (np.stack([np.asarray(p) for p, _ in corners]),
          np.stack([np.asarray(w) for _, w in corners]))


def test_bilinear_corners_hand_computed():
  height, width = 3, 4   # pixel (y, x) has its centre at ((x + 0.5) / 4, (y + 0.5) / 3)
  # A pixel centre (y=1, x=2): all weight on that pixel; its other corners weigh 0.
  pos, wts = _corners([[2.5 / 4, 1.5 / 3]], height, width)
  np.testing.assert_array_equal(pos[:, 0], [6, 7, 10, 11])
  np.testing.assert_array_equal(wts[:, 0], [1, 0, 0, 0])
  # Between pixels: x = 1.25, y = 0.5 in pixel units (corners in CORNERS order: (dx, dy)).
  pos, wts = _corners([[1.75 / 4, 1.0 / 3]], height, width)
  np.testing.assert_array_equal(pos[:, 0], [1, 2, 5, 6])
  np.testing.assert_allclose(wts[:, 0], [0.75 * 0.5, 0.25 * 0.5, 0.75 * 0.5, 0.25 * 0.5],
                             rtol=1e-6)
  # A quarter pixel left of the border: the outside corners weigh 0, positions clipped in.
  pos, wts = _corners([[0.25 / 4, 2.5 / 3]], height, width)
  np.testing.assert_array_equal(pos[:, 0], [8, 8, 8, 8])
  np.testing.assert_allclose(wts[:, 0], [0.0, 0.75, 0.0, 0.0])
  # Beyond the last pixel centre at the bottom right: the one inside corner keeps its tent weight.
  pos, wts = _corners([[4.25 / 4, 3.25 / 3]], height, width)
  np.testing.assert_array_equal(pos[:, 0], [11, 11, 11, 11])
  np.testing.assert_allclose(wts[:, 0], [0.25 * 0.25, 0.0, 0.0, 0.0])
  # Far outside: nothing.
  _, wts = _corners([[-0.5, 0.5], [0.5, 1.7]], height, width)
  np.testing.assert_array_equal(wts, 0.0)


def test_bilinear_corners_weights_sum_to_one_inside():
  rng = np.random.default_rng(0)
  coords = rng.uniform(0.5 / 7, 1 - 0.5 / 7, (500, 2))   # between the outermost pixel centres
  pos, wts = _corners(coords, 7, 7)
  np.testing.assert_allclose(wts.sum(0), 1.0, rtol=1e-6)
  assert pos.min() >= 0 and pos.max() < 49 and pos.dtype == np.int32


def test_bilinear_matrix_hand_computed():
  np.testing.assert_allclose(ops.bilinear_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  np.testing.assert_allclose(ops.bilinear_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_array_equal(ops.bilinear_matrix(5, 5), np.eye(5))
  for n_in, n_out in ((3, 11), (17, 4), (1, 6)):
    matrix = ops.bilinear_matrix(n_in, n_out)
    assert matrix.shape == (n_out, n_in) and matrix.dtype == np.float64
    np.testing.assert_allclose(matrix.sum(1), 1.0)


@pytest.mark.parametrize('size', [(5, 7), (16, 24), (3, 2)])
def test_resize_bilinear_equals_bilinear_matrix(size):
  """The two resizes of the package (device image resize, composed host matrices) agree."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  ours = np.asarray(ops.resize_bilinear(jnp.asarray(x), *size))
  rows, cols = ops.bilinear_matrix(8, size[0]), ops.bilinear_matrix(12, size[1])
  expected = np.einsum('Hh,Ww,bhwc->bHWc', rows, cols, x.astype(np.float64))
  assert ours.shape == (2, *size, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_normalize_equals_host_normalize_and_pad_within_an_ulp(tiny_config):
  """Every uint8 value of every channel, at several valid sizes inside one canvas: the device
  normalisation is within an ulp of the host's (XLA divides by multiplying with the reciprocal;
  hence inference keeps its host normalisation) and exactly zero in the padding."""
  mean, std = tiny_config.data.mean, tiny_config.data.std
  canvas = (20, 24)
  sizes = [(16, 16), (20, 24), (7, 19)]
  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  images, expected = [], []
  for i, (h, w) in enumerate(sizes):
    image = np.stack([np.roll(values, 37 * c + i) for c in range(3)], -1)            # [16, 16, 3]
    image = np.pad(image, ((0, 4), (0, 8), (0, 0)), mode='reflect')[:h, :w]
    expected.append(transforms.normalize_and_pad(image, mean, std, canvas))
    images.append(np.pad(image, ((0, canvas[0] - h), (0, canvas[1] - w), (0, 0))))
  ours = ops.normalize(jnp.asarray(np.stack(images)), jnp.asarray(sizes, jnp.int32), mean, std)
  ours, expected = np.asarray(ours), np.stack(expected)
  assert ours.dtype == np.float32
  np.testing.assert_array_max_ulp(ours, expected, maxulp=1)
  np.testing.assert_array_equal(ours == 0, expected == 0)
