"""Deformable-attention sampling against independent references: bilinear interpolation written
out per point (forward), and the same interpolation as a dense tent-function matrix (forward and
every gradient), including points outside the map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax.models import deform_attn
from support.deform_levels import sample_level


def _inputs(seed, b=2, m=3, h=5, w=7, s=40, p=4, d=6):
  rng = np.random.default_rng(seed)
  value = rng.normal(size=(b, m, h * w, d)).astype(np.float32)
  # Inside, just outside (one corner in the padding), and far outside on every side.
  loc = rng.uniform(-0.6, 1.6, (b, m, s, p, 2)).astype(np.float32)
  loc[:, :, :10] = rng.uniform(0.0, 1.0, (b, m, 10, p, 2))
  loc[:, :, 10:14, :, 0] = -0.5 / w + rng.uniform(-0.4, 0.4, (b, m, 4, p)) / w
  loc[:, :, 14:18, :, 1] = 1 + 0.5 / h + rng.uniform(-0.4, 0.4, (b, m, 4, p)) / h
  weight = rng.uniform(0, 1, (b, m, s, p)).astype(np.float32)
  ct = rng.normal(size=(b, m, s, d)).astype(np.float32)
  return value, (h, w), loc, weight, ct


def dense_tent(value, height, width, loc, weight):
  """sum_p weight * sum_yx relu(1-|x-xx|) relu(1-|y-yy|) value[yy, xx]: zero-padded bilinear."""
  x = loc[..., 0] * width - 0.5
  y = loc[..., 1] * height - 0.5
  wx = jax.nn.relu(1 - jnp.abs(x[..., None] - jnp.arange(width, dtype=x.dtype)))
  wy = jax.nn.relu(1 - jnp.abs(y[..., None] - jnp.arange(height, dtype=y.dtype)))
  a = jnp.sum((wy * weight[..., None])[..., :, None] * wx[..., None, :], axis=3)
  b, m, s = a.shape[:3]
  return jnp.einsum('bmsn,bmnd->bmsd', a.reshape(b, m, s, height * width), value)


@pytest.mark.parametrize('seed,shape', [(0, (5, 7)), (1, (1, 1)), (2, (12, 3))])
def test_sample_level_and_gradients_equal_dense_tent_form(seed, shape):
  value, _, loc, weight, ct = _inputs(seed, h=shape[0], w=shape[1])
  h, w = shape

  def run(fn):
    out, vjp = jax.vjp(jax.jit(lambda v, l, wt: fn(v, h, w, l, wt)), value, loc, weight)
    return (out,) + vjp(ct)

  ours, ref = run(sample_level), run(dense_tent)
  for name, a, r in zip(['out', 'd_value', 'd_loc', 'd_weight'], ours, ref):
    scale = max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-5 * scale,
                               err_msg=name)
  # The cases are real: sampled values and gradients are non-zero, some points read nothing.
  for r in ref:
    assert float(jnp.max(jnp.abs(r))) > 0.1
  assert float(jnp.min(jnp.max(jnp.abs(ref[0]), axis=-1))) == 0.0


def test_sample_level_matches_bilinear_per_point():
  value, (h, w), loc, weight, _ = _inputs(4, b=1, m=2, s=30)
  out = np.asarray(sample_level(jnp.asarray(value), h, w, loc, weight))
  grid = value.reshape(1, 2, h, w, -1)
  expected = np.zeros_like(out)
  for mi in range(2):
    for si in range(30):
      for pi in range(4):
        x = loc[0, mi, si, pi, 0] * w - 0.5
        y = loc[0, mi, si, pi, 1] * h - 0.5
        for yy in range(h):
          for xx in range(w):
            k = max(0.0, 1 - abs(x - xx)) * max(0.0, 1 - abs(y - yy))
            expected[0, mi, si] += weight[0, mi, si, pi] * k * grid[0, mi, yy, xx]
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_multi_scale_sample_forward_and_gradients_equal_dense_tent_per_level():
  """All levels at once, batch-major layout: the forward (a sum of row gathers) and the custom
  backward (autodiff of the gathered form) against the dense form summed over levels."""
  rng = np.random.default_rng(5)
  shapes, b, s, m, p, d = [(3, 4), (6, 5), (1, 2)], 2, 17, 3, 2, 5
  n = sum(h * w for h, w in shapes)
  value = rng.normal(size=(b, n, m, d)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, (b, s, m, len(shapes), p, 2)).astype(np.float32)
  attn = rng.uniform(0, 1, (b, s, m, len(shapes), p)).astype(np.float32)
  ct = rng.normal(size=(b, s, m, d)).astype(np.float32)

  def dense(value, loc, attn):
    out, start = 0., 0
    for lvl, (h, w) in enumerate(shapes):
      v = value[:, start:start + h * w].transpose(0, 2, 1, 3)
      out = out + dense_tent(v, h, w, loc[:, :, :, lvl].transpose(0, 2, 1, 3, 4),
                             attn[:, :, :, lvl].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
      start += h * w
    return out

  ours = jax.jit(lambda *a: deform_attn.multi_scale_sample(a[0], shapes, *a[1:]))
  np.testing.assert_allclose(ours(value, loc, attn), dense(value, loc, attn), atol=1e-5)
  grads = jax.jit(lambda *a: jax.vjp(ours, *a)[1](ct))(value, loc, attn)
  ref = jax.vjp(dense, value, loc, attn)[1](ct)
  for name, a, r in zip(['d_value', 'd_loc', 'd_attn'], grads, ref):
    assert float(jnp.max(jnp.abs(r))) > 0.1, name
    np.testing.assert_allclose(a, r, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(r)))),
                               err_msg=name)
