"""Deformable-attention sampling per level: forward and forward+backward times, interleaved A/B.

Shapes of the R50 pixel decoder at 384x384 (levels 12x12, 24x24, 48x48; S = 3024 queries, 8 heads,
4 points, 32 channels). Candidates, each timed in turn in every round (medians over rounds):
  reference  four narrow gathers, autodiff backward (four narrow scatters): the old code
  ours       `deform_attn.sample_level`: narrow gathers from a once-padded map, one wide scatter
  wide       one gather of a 4x-wide row (each position's 2x2 neighbourhood side by side)
  dense      a dense bilinear-weight matrix [S, H*W] (tent functions) times the value

  python benchmarks/deform_attn.py [--batch 2] [--rounds 5] [--levels 12 24 48]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from minvis_jax.models import deform_attn


def sample_wide(value, height, width, loc, weight):
  """Lead measured and dropped: a wide value table [(H+1)*(W+1), 4*D], one gather per point."""
  b, m, _, d = value.shape
  v = jnp.pad(value.reshape(b, m, height, width, d), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  v4 = jnp.concatenate([v[:, :, :-1, :-1], v[:, :, :-1, 1:], v[:, :, 1:, :-1], v[:, :, 1:, 1:]],
                       axis=-1).reshape(b, m, (height + 1) * (width + 1), 4 * d)
  base, wts = deform_attn.bilinear_corners(height, width, loc, weight)
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


CANDIDATES = {'reference': deform_attn.sample_level_reference, 'ours': deform_attn.sample_level,
              'wide': sample_wide, 'dense': sample_dense}


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
  args = parser.parse_args(argv)
  b, m, s, p, d = args.batch, 8, args.queries, 4, 32
  rng = np.random.default_rng(0)
  loc = jnp.asarray(rng.uniform(-0.05, 1.05, (b, m, s, p, 2)), jnp.float32)
  weight = jnp.asarray(rng.uniform(0, 1, (b, m, s, p)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(b, m, s, d)), jnp.float32)
  for side in args.levels:
    value = jnp.asarray(rng.normal(size=(b, m, side * side, d)), jnp.float32)
    fns = {}
    for name in args.candidates:
      f = functools_partial(CANDIDATES[name], side)
      fwd = jax.jit(f)
      both = jax.jit(lambda v, l, w, c, f=f: jax.vjp(f, v, l, w)[1](c))
      jax.block_until_ready((fwd(value, loc, weight), both(value, loc, weight, ct)))
      fns[name] = (fwd, both)
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


def functools_partial(f, side):
  return lambda v, l, w: f(v, side, side, l, w)


if __name__ == '__main__':
  main()
