"""Multi-scale deformable attention (Deformable DETR) in pure JAX: bilinear sampling by gathers.

Sampling (`sample_level`) gathers each point's four bilinear corners from a value map padded once
by one zero row/column on every side, so every corner index is `base + {0, 1, W+2, W+3}` with one
`base` per point and out-of-range corners read zeros. Its custom backward scatters each point's
four weighted corner rows as one 4x-wide row at `base` into a wide gradient table, then folds the
four column blocks back with shifted adds: XLA's scatter costs per index, so one wide row per point
is far cheaper than four narrow ones (the forward gather costs per element, so it stays narrow:
a wide *value* table is 4x larger and gathers slower at 48x48). `sample_level_reference` is the
plain four-gather form with autodiff's backward, kept as the reference for tests and benchmarks.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def sample_level_reference(value: jnp.ndarray, height: int, width: int, loc: jnp.ndarray,
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




def bilinear_corners(height: int, width: int, loc: jnp.ndarray,
                     weight: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """loc [..., 2], weight [...] -> (base [...] int32 index of the top-left corner in the value map
  padded to [(H+2)*(W+2)], corner weights [..., 4] (top-left, top-right, bottom-left,
  bottom-right) times `weight`, zero for corners outside the map)."""
  x = loc[..., 0] * width - 0.5
  y = loc[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  wts = []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      # A point far outside is clipped onto the border, so mask its corners (the padding alone
      # zeroes only corners one step outside).
      inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
      wts.append(jnp.where(inside, wx * wy, 0.0) * weight)
  base = (jnp.clip(y0, -1, height - 1) + 1) * (width + 2) + jnp.clip(x0, -1, width - 1) + 1
  return base.astype(jnp.int32), jnp.stack(wts, axis=-1)


def _corner_offsets(width: int) -> jnp.ndarray:
  return jnp.array([0, 1, width + 2, width + 3], jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sample_padded(table: jnp.ndarray, width: int, base: jnp.ndarray,
                  wts: jnp.ndarray) -> jnp.ndarray:
  """table [B, M, (H+2)*(W+2), D] (zero-padded value map), base [B, M, S, P],
  wts [B, M, S, P, 4] -> [B, M, S, D] = sum over points and corners of wts * table[corner]."""
  return _sample_padded_fwd(table, width, base, wts)[0]


def _flat_base(base, rows):
  """[B, M, S, P] per-map indices -> flat indices into the [B*M*rows] stacked maps."""
  b, m = base.shape[:2]
  return (base + (jnp.arange(b * m, dtype=jnp.int32) * rows).reshape(b, m, 1, 1)).reshape(-1)


def _sample_padded_fwd(table, width, base, wts):
  b, m, rows, d = table.shape
  s, p = base.shape[2:]
  idx = (_flat_base(base, rows)[:, None] + _corner_offsets(width)).reshape(-1)
  gathered = table.reshape(b * m * rows, d).at[idx].get(mode='promise_in_bounds')
  gathered = gathered.reshape(b, m, s, p * 4, d)
  out = jnp.einsum('bmskd,bmsk->bmsd', gathered, wts.reshape(b, m, s, p * 4).astype(table.dtype))
  return out, (gathered, base, wts, rows)


def _sample_padded_bwd(width, residuals, ct):
  gathered, base, wts, rows = residuals
  b, m, s, p = base.shape
  d = ct.shape[-1]
  # One wide row [4*D] per point: its four corners' weighted cotangents side by side.
  wide_rows = (wts.astype(ct.dtype)[..., None] * ct[:, :, :, None, None, :]).reshape(
      b * m * s * p, 4 * d)
  wide = jnp.zeros((b * m * rows, 4 * d), ct.dtype).at[_flat_base(base, rows)].add(
      wide_rows, mode='promise_in_bounds').reshape(b, m, rows, 4 * d)
  # Corner c of the point at base n is table row n + offset[c]: shift its block there.
  blocks = [wide[..., :d]]
  for c, off in enumerate((1, width + 2, width + 3), start=1):
    blocks.append(jnp.pad(wide[:, :, :rows - off, c * d:(c + 1) * d],
                          ((0, 0), (0, 0), (off, 0), (0, 0))))
  dtable = blocks[0] + blocks[1] + blocks[2] + blocks[3]
  dwts = jnp.einsum('bmskd,bmsd->bmsk', gathered, ct).reshape(wts.shape).astype(wts.dtype)
  return dtable, None, dwts


sample_padded.defvjp(_sample_padded_fwd, _sample_padded_bwd)


def sample_level(value: jnp.ndarray, height: int, width: int, loc: jnp.ndarray,
                 weight: jnp.ndarray) -> jnp.ndarray:
  """Same contract and values as `sample_level_reference` (see the module docstring)."""
  b, m, _, d = value.shape
  table = jnp.pad(value.reshape(b, m, height, width, d),
                  ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  table = table.reshape(b, m, (height + 2) * (width + 2), d)
  base, wts = bilinear_corners(height, width, loc, weight)
  return sample_padded(table, width, base, wts)


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
