"""MinVIS association, T=36 frames, Q=100 and 200, C=256: jitted scan vs the original's per-frame
numpy + scipy loop. Embeddings drift slowly and queries keep their slots mostly (as a trained model's
do), with a few near-duplicate 'no object' queries.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from test_tracking import scipy_loop  # noqa: E402

from timing import median_time, result_line  # noqa: E402

from minvis_jax import tracking  # noqa: E402


def video(t, q, c, seed):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(q, c))
  base[-q // 5:] = base[-1] + 0.05 * rng.normal(size=(q // 5, c))  # near-duplicate no-object
  frames = [base + 0.2 * rng.normal(size=base.shape) for _ in range(t)]
  return np.stack(frames).astype(np.float32)


def main():
  ours_total, ref_total = 0.0, 0.0
  for q in (100, 200):
    embds = video(36, q, 256, seed=q)
    dev = jax.device_put(embds)
    ours = median_time(lambda: jax.block_until_ready(tracking.associate(dev)))
    ref = median_time(lambda: scipy_loop(embds))
    print(f'Q={q}: jitted {ours * 1e3:.2f} ms, scipy loop {ref * 1e3:.2f} ms, '
          f'ratio {ours / ref:.3f}')
    ours_total += ours
    ref_total += ref
  print(result_line('association_T36_Q100_Q200', ours_total, ref_total))


if __name__ == '__main__':
  main()
