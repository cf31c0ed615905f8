"""Shared by the benchmarks: medians after warm-up, and the RESULT line."""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time of fn() over `repeats` calls after `warmup` calls (compilation, caches)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def result_line(name: str, ours_s: float, ref_s: float) -> str:
  return 'RESULT ' + json.dumps({'name': name, 'ours_s': round(ours_s, 5),
                                 'ref_s': round(ref_s, 5), 'ratio': round(ours_s / ref_s, 3)})


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Measured FLOP/s of a jitted f32 [n, n] @ [n, n] on the default device."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  seconds = median_time(lambda: jax.block_until_ready(mm(a)), repeats)
  return 2 * n ** 3 / seconds
