"""MinVIS association, T=36 frames, Q=100 and 200, C=256: jitted scan vs the original's per-frame
numpy + scipy loop. Embeddings drift slowly and queries keep their slots mostly (as a trained model's
do), with a few near-duplicate 'no object' queries.

Also prints a floor that no implementation computing the same cost matrices can beat on this
machine: the T-1 [Q, C] x [C, Q] similarity products alone, timed in numpy and counted in FLOPs at
the measured matmul peak, each as a fraction of the reference's total.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from test_tracking import scipy_loop  # noqa: E402

from timing import matmul_peak_flops, median_time, result_line  # noqa: E402

from minvis_jax import tracking  # noqa: E402


def video(t, q, c, seed):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(q, c))
  base[-q // 5:] = base[-1] + 0.05 * rng.normal(size=(q // 5, c))  # near-duplicate no-object
  frames = [base + 0.2 * rng.normal(size=base.shape) for _ in range(t)]
  return np.stack(frames).astype(np.float32)


def main():
  peak = matmul_peak_flops()
  ours_total, ref_total, products_total, flops_total = 0.0, 0.0, 0.0, 0.0
  for q in (100, 200):
    embds = video(36, q, 256, seed=q)
    dev = jax.device_put(embds)
    state, valid = tracking.init_state(q, embds.shape[-1]), np.ones(len(embds), bool)
    ours = median_time(lambda: jax.block_until_ready(tracking.associate_chunk(state, dev, valid)))
    ref = median_time(lambda: scipy_loop(embds))
    e = embds / np.linalg.norm(embds, axis=-1, keepdims=True)
    products = median_time(lambda: [e[t - 1] @ e[t].T for t in range(1, len(e))])
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
  print(result_line('association_T36_Q100_Q200', ours_total, ref_total))


if __name__ == '__main__':
  main()
