"""The predictor's composed mask resize against torch's interpolate, as the original does it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import frame_masks

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')


@pytest.mark.parametrize('padded,valid,out', [
    ((384, 640), (360, 640), (720, 1280)),   # YouTube-VIS 720p: x4 then x2
    ((288, 640), (272, 640), (272, 640)),    # test size = original size
    ((384, 512), (360, 480), (480, 640)),    # non-integer scale
    ((96, 160), (90, 150), (61, 77)),        # downsampling, odd sizes
])
def test_mask_logits_equal_torch_interpolate_twice(padded, valid, out):
  """The composed per-axis products equal the resize, crop, resize of docs/method.md §1 as the
  original code does it (torch interpolate, bilinear, align_corners=False), values and thresholded
  masks."""
  low = (padded[0] // 4, padded[1] // 4)
  rng = np.random.default_rng(sum(out))
  m = rng.normal(size=(3, low[0] // 6 + 2, low[1] // 6 + 2)).astype(np.float32) * 8
  m = np.asarray(jax.image.resize(m, (3, *low), 'cubic')).astype(np.float16)  # smooth, like masks
  got = np.asarray(frame_masks.mask_logits_t(jnp.asarray(m), padded, valid, out))
  up = torch.nn.functional.interpolate(torch.from_numpy(m.astype(np.float32))[None], size=padded,
                                       mode='bilinear', align_corners=False)
  want = torch.nn.functional.interpolate(up[:, :, :valid[0], :valid[1]], size=out,
                                         mode='bilinear', align_corners=False)[0].numpy()
  assert got.shape == (3, out[1], out[0])
  np.testing.assert_allclose(got.transpose(0, 2, 1), want, rtol=0, atol=1e-4)
  near_zero = np.abs(want) < 1e-4
  assert np.all(((got.transpose(0, 2, 1) > 0) == (want > 0)) | near_zero)
