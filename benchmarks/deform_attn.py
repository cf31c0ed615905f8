"""Deformable-attention sampling per level: forward and forward+backward times, interleaved A/B.

Shapes of the R50 pixel decoder at 384x384 (levels 12x12, 24x24, 48x48; S = 3024 queries, 8 heads,
4 points, 32 channels). Candidates, each timed in turn in every round (medians over rounds):
  ours                  `sample_level` (tests/support): a sum of row gathers forward; under autodiff
                        the rows gathered into one array (custom_vjp)
  four_gathers          the earlier form (the reference): rows gathered into one array, forward too
  padded_wide_backward  narrow gathers from a once-padded map, one wide-row scatter backward
  wide                  one gather of a 4x-wide row (each position's 2x2 neighbourhood side by side)
  dense                 a dense bilinear-weight matrix [S, H*W] (tent functions) times the value
  custom_backward       ours forward, a hand-written backward: the weights' gradient as a sum over
                        channels of scalar gathers from the transposed table, one flat scatter-add

  python benchmarks/deform_attn.py [--batch 2] [--rounds 5] [--levels 12 24 48] [--dry-run]

Last line: RESULT with ours and four_gathers' forward+backward summed over the levels.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from timing import result_line

from minvis_jax import host_memory
from minvis_jax.models import deform_attn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.deform_levels import sample_level  # noqa: E402


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


def sample_padded_wide_backward(value: jnp.ndarray, height: int, width: int, loc: jnp.ndarray,
                 weight: jnp.ndarray) -> jnp.ndarray:
  """Lead measured and dropped: narrow gathers from a once-padded map (one base index per point),
  custom backward scattering one 4x-wide row per point (XLA:CPU scatters cost per index)."""
  b, m, _, d = value.shape
  table = jnp.pad(value.reshape(b, m, height, width, d),
                  ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  table = table.reshape(b, m, (height + 2) * (width + 2), d)
  base, wts = bilinear_corners(height, width, loc, weight)
  return sample_padded(table, width, base, wts)


def sample_wide(value, height, width, loc, weight):
  """Lead measured and dropped: a wide value table [(H+1)*(W+1), 4*D], one gather per point."""
  b, m, _, d = value.shape
  v = jnp.pad(value.reshape(b, m, height, width, d), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  v4 = jnp.concatenate([v[:, :, :-1, :-1], v[:, :, :-1, 1:], v[:, :, 1:, :-1], v[:, :, 1:, 1:]],
                       axis=-1).reshape(b, m, (height + 1) * (width + 1), 4 * d)
  base, wts = bilinear_corners(height, width, loc, weight)
  base = base - base // (width + 2)      # padded [(H+2)*(W+2)] index -> [(H+1)*(W+1)] index
  s, p = weight.shape[2:]
  g = jnp.take_along_axis(v4, base.reshape(b, m, s * p, 1), axis=2).reshape(b, m, s, p * 4, d)
  return jnp.einsum('bmskd,bmsk->bmsd', g, wts.reshape(b, m, s, p * 4))


def sample_dense(value, height, width, loc, weight):
  """Lead measured and dropped: bilinear weights as tent functions, a dense [S, H*W] matrix."""
  x = loc[..., 0] * width - 0.5
  y = loc[..., 1] * height - 0.5
  wx = jax.nn.relu(1 - jnp.abs(x[..., None] - jnp.arange(width, dtype=x.dtype)))
  wy = jax.nn.relu(1 - jnp.abs(y[..., None] - jnp.arange(height, dtype=y.dtype)))
  a = jnp.sum((wy * weight[..., None])[..., :, None] * wx[..., None, :], axis=3)
  b, m, s = a.shape[:3]
  return jnp.einsum('bmsn,bmnd->bmsd', a.reshape(b, m, s, height * width), value)


def _level_terms(height, width, loc, weight):
  """Head-major loc [B, M, S, P, 2], weight [B, M, S, P] -> `bilinear_terms` [B, S, M, P*4]."""
  pos, wts = deform_attn.bilinear_terms([(height, width)],
                                        loc.transpose(0, 2, 1, 3, 4)[:, :, :, None],
                                        weight.transpose(0, 2, 1, 3)[:, :, :, None])
  return pos[0], wts[0]


def sample_four_gathers(value, height, width, loc, weight):
  """The earlier form (and ours under autodiff): the rows gathered, then a reduction."""
  b, m, s, p = weight.shape
  pos, wts = _level_terms(height, width, loc, weight)
  idx = pos.transpose(0, 2, 1, 3).reshape(b, m, s * p * 4, 1)
  rows = jnp.take_along_axis(value, idx, axis=2).reshape(b, m, s, p * 4, -1)
  return jnp.einsum('bmskd,bmsk->bmsd', rows, wts.transpose(0, 2, 1, 3))


@jax.custom_vjp
def _rows_sum(table, rows, wts):
  """table [R, D], rows [Q, K], wts [Q, K] -> [Q, D]: the sum of weighted row gathers."""
  out = 0.
  for k in range(rows.shape[-1]):
    out = out + wts[:, k, None] * table.at[rows[:, k]].get(mode='promise_in_bounds')
  return out


def _rows_sum_bwd(residuals, ct):
  table, rows, wts = residuals
  d = table.shape[-1]
  # Scalar gathers from each channel's row of the transposed table (fast alone: ~25 ms for all
  # three levels; in the full graph XLA emits 32 unfused gathers and the step slows down).
  table_t, ct_t = table.T, ct.T
  d_wts = 0.
  for c in range(d):
    d_wts = d_wts + ct_t[c][:, None] * table_t[c].at[rows].get(mode='promise_in_bounds')
  d_table = jnp.zeros_like(table).at[rows.reshape(-1)].add(
      (wts[..., None] * ct[:, None, :]).reshape(-1, d), mode='promise_in_bounds')
  return d_table, None, d_wts


_rows_sum.defvjp(lambda t, r, w: (_rows_sum(t, r, w), (t, r, w)), _rows_sum_bwd)


def sample_custom_backward(value, height, width, loc, weight):
  """Lead measured and dropped: ours forward with a hand-written backward (see _rows_sum_bwd)."""
  b, m, n, d = value.shape
  s, p = weight.shape[2:]
  pos, wts = _level_terms(height, width, loc, weight)
  rows = pos.transpose(0, 2, 1, 3) + (jnp.arange(b * m, dtype=jnp.int32) * n).reshape(b, m, 1, 1)
  out = _rows_sum(value.reshape(b * m * n, d), rows.reshape(-1, p * 4),
                  wts.transpose(0, 2, 1, 3).reshape(-1, p * 4))
  return out.reshape(b, m, s, d)


CANDIDATES = {'ours': sample_level, 'four_gathers': sample_four_gathers,
              'padded_wide_backward': sample_padded_wide_backward, 'wide': sample_wide,
              'dense': sample_dense, 'custom_backward': sample_custom_backward}


def _time(fn, calls: int = 3) -> float:
  best = float('inf')
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--queries', type=int, default=3024)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--levels', type=int, nargs='+', default=[12, 24, 48])
  parser.add_argument('--candidates', nargs='+', default=list(CANDIDATES))
  parser.add_argument('--dry-run', action='store_true',
                      help='batch 1, 64 queries, levels 4x4 and 8x8, one round (tests)')
  args = parser.parse_args(argv)
  if args.dry_run:
    args.batch, args.queries, args.rounds, args.levels = 1, 64, 1, [4, 8]
  totals = {name: 0.0 for name in args.candidates}
  b, m, s, p, d = args.batch, 8, args.queries, 4, 32
  rng = np.random.default_rng(0)
  loc = jnp.asarray(rng.uniform(-0.05, 1.05, (b, m, s, p, 2)), jnp.float32)
  weight = jnp.asarray(rng.uniform(0, 1, (b, m, s, p)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(b, m, s, d)), jnp.float32)
  for side in args.levels:
    value = jnp.asarray(rng.normal(size=(b, m, side * side, d)), jnp.float32)
    fns = {}
    for name in args.candidates:
      f = _at_level(CANDIDATES[name], side)
      fwd = jax.jit(f)
      both = jax.jit(lambda v, l, w, c, f=f: jax.vjp(f, v, l, w)[1](c))
      fns[name] = (fwd, both)
    # Each candidate computes the same values and gradients (largest abs difference to ours).
    first = [fns[args.candidates[0]][0](value, loc, weight),
             *fns[args.candidates[0]][1](value, loc, weight, ct)]
    for name, (fwd, both) in fns.items():
      diff = [float(jnp.max(jnp.abs(a - b))) for a, b in
              zip([fwd(value, loc, weight), *both(value, loc, weight, ct)], first)]
      print(f'{side}x{side} {name}: max |difference| out, d_value, d_loc, d_weight: '
            + ' '.join(f'{x:.1e}' for x in diff), flush=True)
    times = {name: ([], []) for name in fns}
    for _ in range(args.rounds):
      for name, (fwd, both) in fns.items():
        times[name][0].append(_time(lambda: jax.block_until_ready(fwd(value, loc, weight))))
        times[name][1].append(
            _time(lambda: jax.block_until_ready(both(value, loc, weight, ct))))
    for name, (tf, tb) in times.items():
      row = {'level': f'{side}x{side}', 'candidate': name,
             'forward_ms': round(1e3 * statistics.median(tf), 1),
             'forward_backward_ms': round(1e3 * statistics.median(tb), 1)}
      print('LEVEL ' + json.dumps(row), flush=True)
      totals[name] += statistics.median(tb)
  if 'ours' in totals and 'four_gathers' in totals:
    levels = '_'.join(str(side) for side in args.levels)
    print(result_line(f'deform_attn_fwd_bwd_b{args.batch}_s{args.queries}_levels{levels}',
                      totals['ours'], totals['four_gathers']))


def _at_level(f, side):
  return lambda v, l, w: f(v, side, side, l, w)


if __name__ == '__main__':
  # Keep freed memory mapped on CPU (minvis_jax/host_memory.py).
  host_memory.reexec_keeping_freed_memory()
  main()
