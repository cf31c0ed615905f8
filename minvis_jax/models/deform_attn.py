"""Multi-scale deformable attention (Deformable DETR) in pure JAX: bilinear sampling by gathers.

Every sampling point reads its four bilinear corners from its image's [N*M, D] table of all levels
and heads. The forward sums the weighted row gathers as separate terms, a loop over levels (see
`_sample_summed`); under differentiation the rows are gathered into one array per level instead
(custom_vjp), whose autodiff is the faster backward on CPU (benchmarks/deform_attn.py has the
alternatives and their timings).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from minvis_jax.models.conv import Dense


def bilinear_terms(spatial_shapes: Sequence[tuple[int, int]], loc: jnp.ndarray,
                   attn: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Corners of every sampling point; zero padding, align_corners=False (`ops`' convention).

  loc: [B, S, M, L, P, 2] normalised (x, y) in [0, 1]; attn: [B, S, M, L, P]. Returns pos, int32
  [L, B, S, M, P*4] positions in the levels' concatenated [N = sum H*W] maps, and wts,
  [L, B, S, M, P*4] attention times bilinear weights (zero for corners outside the map).

  Not `ops.bilinear_corners`: the weights are products of the fractions x - x0 and 1 - (x - x0),
  where ops computes tents 1 - |x - xi|; equal in exact arithmetic, they differ by an ulp on some
  points under XLA, and the model's numbers stay as they were.
  """
  pos_levels, wts_levels = [], []
  start = 0
  for lvl, (height, width) in enumerate(spatial_shapes):
    x = loc[:, :, :, lvl, :, 0] * width - 0.5                                     # [B, S, M, P]
    y = loc[:, :, :, lvl, :, 1] * height - 0.5
    pos, wts = [], []
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    for dy, wy in ((0, 1 - fy), (1, fy)):
      for dx, wx in ((0, 1 - fx), (1, fx)):
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        flat = start + jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
        pos.append(flat.astype(jnp.int32))
        wts.append(jnp.where(inside, wx * wy, 0.0) * attn[:, :, :, lvl])
    start += height * width
    pos_levels.append(jnp.stack(pos, -1).reshape(*x.shape[:3], -1))
    wts_levels.append(jnp.stack(wts, -1).reshape(*x.shape[:3], -1))
  return jnp.stack(pos_levels), jnp.stack(wts_levels)


def _table_rows(pos, m):
  """Rows [B, S, M, K] of an image's [N*M, D] table: position * M + head."""
  return pos * m + jnp.arange(m, dtype=jnp.int32)[None, None, :, None]


def _gather_rows(table, rows):
  """table [B, N*M, D], rows [B, ...] -> [B, ..., D]. Per image (vmap), not from one flat table of
  the batch: a gather whose batch dimension is explicit stays local to each device when the batch
  is sharded, where a flat one made XLA all-gather every device's values."""
  return jax.vmap(lambda t, r: t.at[r].get(mode='promise_in_bounds'))(table, rows)


def _sample_summed(value, spatial_shapes, loc, attn):
  """The forward: a sum of K row gathers (see the module docstring)."""
  b, n, m, d = value.shape
  pos, wts = bilinear_terms(spatial_shapes, loc, attn)
  # Materialise indices and weights: fused into the gathers below, they would be recomputed for
  # every one of the D channels.
  pos, wts = jax.lax.optimization_barrier((pos, wts))
  rows = _table_rows(pos, m)   # the value as it is, no transpose
  table = value.reshape(b, n * m, d)

  def add_level(out, level):
    level_rows, level_wts = level
    for k in range(level_rows.shape[-1]):
      out = out + level_wts[..., k, None] * _gather_rows(table, level_rows[..., k])
    return out, None

  # A loop over levels, not one expression: XLA would otherwise fuse the caller's [B, S, M*D]
  # reshape into the sum, whose loop over M*D then recomputes every row index per channel and
  # cannot vectorise the row reads.
  # zeros_like keeps the value's varying axes under shard_map (the carry's type must match).
  out, _ = jax.lax.scan(add_level, jnp.zeros_like(value, shape=(b, pos.shape[2], m, d)),
                        (rows, wts.astype(value.dtype)))
  return out


def _sample_gathered(value, spatial_shapes, loc, attn):
  """The same sum with each level's rows gathered into [B, S, M, P*4, D]: what autodiff runs.

  Rows come from the same [N*M, D] tables, in the output's [B, S, M] order: no transposes of the
  value, the indices or the result (faster on CPU than gathering from a head-major copy).
  """
  b, n, m, d = value.shape
  table = value.reshape(b, n * m, d)
  out = 0.
  start = 0
  for lvl, (height, width) in enumerate(spatial_shapes):
    level = slice(lvl, lvl + 1)
    pos, wts = bilinear_terms([(height, width)], loc[:, :, :, level], attn[:, :, :, level])
    pos, wts = pos[0], wts[0]
    rows = _gather_rows(table, _table_rows(pos + start, m))
    out = out + jnp.einsum('bsmkd,bsmk->bsmd', rows, wts.astype(value.dtype))
    start += height * width
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sample(value, spatial_shapes, loc, attn):
  return _sample_summed(value, spatial_shapes, loc, attn)


def _sample_fwd(value, spatial_shapes, loc, attn):
  return jax.vjp(lambda v, lo, a: _sample_gathered(v, spatial_shapes, lo, a), value, loc, attn)


def _sample_bwd(spatial_shapes, vjp_fn, ct):
  return vjp_fn(ct)


_sample.defvjp(_sample_fwd, _sample_bwd)


def multi_scale_sample(value: jnp.ndarray, spatial_shapes: Sequence[tuple[int, int]],
                       loc: jnp.ndarray, attn: jnp.ndarray) -> jnp.ndarray:
  """Attention-weighted bilinear sampling of every level; zero padding, align_corners=False.

  value: [B, N, M, D] (N = sum of H*W over levels, M heads); loc: [B, S, M, L, P, 2] normalised
  (x, y) in [0, 1]; attn: [B, S, M, L, P]. Returns [B, S, M, D] =
  sum over levels l and points p of attn * value_l(loc).
  """
  return _sample(value, tuple(tuple(int(v) for v in hw) for hw in spatial_shapes), loc, attn)


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
    dense = lambda n, name: Dense(n, dtype=self.dtype, name=name)  # noqa: E731
    value = dense(self.dim, 'value_proj')(value_in).reshape(b, -1, m, d)
    offsets = dense(m * l * p * 2, 'sampling_offsets')(query).reshape(b, s, m, l, p, 2)
    logits = dense(m * l * p, 'attention_weights')(query).reshape(b, s, m, l * p)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(b, s, m, l, p)
    normalizer = jnp.array([(w, h) for h, w in spatial_shapes], jnp.float32)  # [L, 2] as (x, y)
    loc = reference[None, :, None, None, None, :] + offsets.astype(jnp.float32) / normalizer[
        None, None, None, :, None, :]                                          # [B, S, M, L, P, 2]
    out = multi_scale_sample(value, spatial_shapes, loc, attn)                 # [B, S, M, D]
    return dense(self.dim, 'output_proj')(out.reshape(b, s, self.dim))
