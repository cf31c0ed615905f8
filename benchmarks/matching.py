"""Jitted linear_sum_assignment on 36 x [100, 100] costs vs scipy (optax's Hungarian for scale).

  python benchmarks/matching.py [--dry-run]   # --dry-run: 4 x [10, 10], one repeat
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from timing import median_time, result_line

from minvis_jax import matching


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dry-run', action='store_true', help='tiny sizes, one repeat (tests)')
  args = parser.parse_args(argv)
  batch, n, repeats = (4, 10, 1) if args.dry_run else (36, 100, 10)
  rng = np.random.default_rng(0)
  random_costs = rng.random((batch, n, n)).astype(np.float32)
  # Tracker-like costs: near-identity permutations (most row argmins distinct, a few collisions).
  near_identity = random_costs + 0.0
  near_identity -= 2.0 * np.eye(n, dtype=np.float32)[None]
  costs = jnp.asarray(random_costs)
  tracker = jnp.asarray(near_identity)

  lsa = matching.linear_sum_assignment
  variants = {
      'vmap': jax.jit(matching.batched_linear_sum_assignment),
      'lax.map': jax.jit(lambda c: jax.lax.map(lsa, c)),
      'optax_hungarian_vmap': jax.jit(jax.vmap(optax.assignment.hungarian_algorithm)),
  }
  results = {}
  for name, fn in variants.items():
    results[name] = median_time(lambda: jax.block_until_ready(fn(costs)), repeats)
    results[name + '_tracker'] = median_time(lambda: jax.block_until_ready(fn(tracker)),
                                            repeats)
  ref = median_time(lambda: [scipy.optimize.linear_sum_assignment(c) for c in random_costs],
                    repeats)
  ref_tracker = median_time(
      lambda: [scipy.optimize.linear_sum_assignment(c) for c in near_identity], repeats)
  for name, t in results.items():
    print(f'{name:28s} {t * 1e3:8.2f} ms')
  print(f'{"scipy":28s} {ref * 1e3:8.2f} ms')
  print(f'{"scipy_tracker":28s} {ref_tracker * 1e3:8.2f} ms')
  ours = results['vmap']
  print(result_line(f'linear_sum_assignment_{batch}x{n}x{n}', ours, ref))


if __name__ == '__main__':
  main()
