"""MinVIS association, T=36 frames, Q=100 and 200, C=256: jitted scan vs the original's per-frame
numpy + scipy loop. Embeddings drift slowly and queries keep their slots mostly (as a trained
model's do), with a few near-duplicate 'no object' queries.

  python benchmarks/association.py [--dry-run]   # --dry-run: T=4, Q=10 and 20, C=16, one repeat

Also prints a floor that no implementation computing the same cost matrices can beat on this
machine: the T-1 [Q, C] x [C, Q] similarity products alone, timed in numpy and counted in FLOPs at
the measured matmul peak, each as a fraction of the reference's total.
"""

import argparse
import os
import sys

import jax
import numpy as np
from timing import matmul_peak_flops, median_time, result_line


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.references import scipy_loop  # noqa: E402

from minvis_jax import tracking


def video(t, q, c, seed):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(q, c))
  base[-q // 5:] = base[-1] + 0.05 * rng.normal(size=(q // 5, c))  # near-duplicate no-object
  frames = [base + 0.2 * rng.normal(size=base.shape) for _ in range(t)]
  return np.stack(frames).astype(np.float32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dry-run', action='store_true', help='tiny sizes, one repeat (tests)')
  args = parser.parse_args(argv)
  if args.dry_run:
    frames, queries, dim, repeats = 4, (10, 20), 16, 1
  else:
    frames, queries, dim, repeats = 36, (100, 200), 256, 10
  peak = matmul_peak_flops(n=256 if args.dry_run else 2048, repeats=repeats)
  ours_total, ref_total, products_total, flops_total = 0.0, 0.0, 0.0, 0.0
  for q in queries:
    embds = video(frames, q, dim, seed=q)
    dev = jax.device_put(embds)
    state, valid = tracking.init_state(q, embds.shape[-1]), np.ones(len(embds), bool)
    ours = median_time(lambda: jax.block_until_ready(tracking.associate_chunk(state, dev, valid)),
                       repeats)
    ref = median_time(lambda: scipy_loop(embds), repeats)
    e = embds / np.linalg.norm(embds, axis=-1, keepdims=True)
    products = median_time(lambda: [e[t - 1] @ e[t].T for t in range(1, len(e))], repeats)
    flops = 2 * (len(e) - 1) * q * q * e.shape[-1]
    print(f'Q={q}: jitted {ours * 1e3:.2f} ms, scipy loop {ref * 1e3:.2f} ms, '
          f'ratio {ours / ref:.3f}; similarity products alone: numpy {products * 1e3:.2f} ms '
          f'({products / ref:.2f} of the loop), at the matmul peak {flops / peak * 1e3:.2f} ms '
          f'({flops / peak / ref:.2f})')
    ours_total += ours
    ref_total += ref
    products_total += products
    flops_total += flops
  print(f'floor for any exact association on this machine (matmul peak {peak / 1e9:.0f} GFLOP/s): '
        f'ratio >= {flops_total / peak / ref_total:.2f} at peak, '
        f'{products_total / ref_total:.2f} at numpy speed')
  name = f'association_T{frames}_' + '_'.join(f'Q{q}' for q in queries)
  print(result_line(name, ours_total, ref_total))


if __name__ == '__main__':
  main()
