"""Multi-scale deformable attention (Deformable DETR) in pure JAX: bilinear sampling by gathers.

Sampling gathers each point's four bilinear corners (four narrow rows) and autodiff's backward
scatters them. Measured against it per level (benchmarks/deform_attn.py, R50 384x384 shapes) and
slower on XLA:CPU: a once-padded map with one base index per point and a custom backward that
scatters one 4x-wide row per point, a 4x-wide value table with one gather per point, one gather of
all levels from the concatenated maps, and a dense bilinear (tent-function) matrix times the value.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def sample_level(value: jnp.ndarray, height: int, width: int, loc: jnp.ndarray,
                 weight: jnp.ndarray) -> jnp.ndarray:
  """Weighted bilinear sampling of one level, zero padding, align_corners=False.

  value: [B, M, H*W, D] (M heads); loc: [B, M, S, P, 2] normalised (x, y) in [0, 1];
  weight: [B, M, S, P] attention weights. Returns [B, M, S, D] = sum_p weight * value(loc).
  """
  x = loc[..., 0] * width - 0.5
  y = loc[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  idx, wts = [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
      flat = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
      idx.append(flat.astype(jnp.int32))
      wts.append(jnp.where(inside, wx * wy, 0.0) * weight)
  b, m, s, p = weight.shape
  idx = jnp.stack(idx, axis=-1).reshape(b, m, s * p * 4)           # [B, M, S*P*4]
  wts = jnp.stack(wts, axis=-1).reshape(b, m, s, p * 4)            # [B, M, S, P*4]
  gathered = jnp.take_along_axis(value, idx[..., None], axis=2)    # [B, M, S*P*4, D]
  gathered = gathered.reshape(b, m, s, p * 4, -1)
  return jnp.einsum('bmskd,bmsk->bmsd', gathered, wts.astype(gathered.dtype))


class MSDeformAttn(nn.Module):
  """Deformable attention over `len(spatial_shapes)` levels; reference points shared by levels."""
  dim: int
  heads: int = 8
  levels: int = 3
  points: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jnp.ndarray, reference: jnp.ndarray, value_in: jnp.ndarray,
               spatial_shapes: Sequence[tuple[int, int]]) -> jnp.ndarray:
    """query [B, S, C], reference [S, 2] (x, y in [0, 1]), value_in [B, sum(H*W), C]
    -> [B, S, C]."""
    b, s, _ = query.shape
    m, l, p, d = self.heads, self.levels, self.points, self.dim // self.heads
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    value = dense(self.dim, 'value_proj')(value_in).reshape(b, -1, m, d).transpose(0, 2, 1, 3)
    offsets = dense(m * l * p * 2, 'sampling_offsets')(query).reshape(b, s, m, l, p, 2)
    logits = dense(m * l * p, 'attention_weights')(query).reshape(b, s, m, l * p)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(b, s, m, l, p)
    normalizer = jnp.array([(w, h) for h, w in spatial_shapes], jnp.float32)  # [L, 2] as (x, y)
    loc = reference[None, :, None, None, None, :] + offsets.astype(jnp.float32) / normalizer[
        None, None, None, :, None, :]                                          # [B, S, M, L, P, 2]
    loc = loc.transpose(0, 2, 1, 3, 4, 5)                                      # [B, M, S, L, P, 2]
    attn = attn.transpose(0, 2, 1, 3, 4)                                       # [B, M, S, L, P]
    out = 0.
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
      v = value[:, :, start:start + h * w]
      start += h * w
      out = out + sample_level(v, h, w, loc[:, :, :, lvl], attn[:, :, :, lvl].astype(v.dtype))
    out = out.transpose(0, 2, 1, 3).reshape(b, s, self.dim)
    return dense(self.dim, 'output_proj')(out)
