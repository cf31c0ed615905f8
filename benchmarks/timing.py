"""Shared by the benchmarks: medians after warm-up, and the RESULT line."""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time of fn() over `repeats` calls after `warmup` calls (compilation, caches)."""
  return median_times([fn], repeats, warmup)[0]


def median_times(fns, repeats: int = 10, warmup: int = 2) -> list[float]:
  """Median wall times of several functions after `warmup` rounds, called in turns (a, b, a, b, ...)
  so that the load of a shared machine, which drifts over minutes, weighs on each of them alike."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      fn()
      fn_times.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def result_line(name: str, ours_s: float, ref_s: float, **extra) -> str:
  """'RESULT {json}': the name, both times (4 significant digits, so that a dry run's microseconds
  stay positive) and their ratio, plus `extra` fields."""
  return 'RESULT ' + json.dumps({'name': name, 'ours_s': float(f'{ours_s:.4g}'),
                                 'ref_s': float(f'{ref_s:.4g}'), 'ratio': round(ours_s / ref_s, 3),
                                 **extra})


def matmul_peak_flops(n: int = 2048, repeats: int = 10, dtype='float32') -> float:
  """Measured FLOP/s of a jitted [n, n] @ [n, n] in `dtype` on the default device (n = 8192 on
  accelerators, where 2048 is too small to reach the peak)."""
  if jax.default_backend() != 'cpu':
    n = max(n, 8192)
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  mm = jax.jit(lambda x: x @ x)
  seconds = median_time(lambda: jax.block_until_ready(mm(a)), repeats)
  return 2 * n ** 3 / seconds


# Nominal dense peaks (FLOP/s; float32 = TF32 tensor cores, which XLA uses for float32 dots on
# these GPUs by default) from NVIDIA's data sheets, by a substring of `device_kind`.
_NOMINAL_PEAKS = (('H200', {'bfloat16': 989e12, 'float32': 495e12}),
                  ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
                  ('H100', {'bfloat16': 989e12, 'float32': 495e12}),
                  ('A100', {'bfloat16': 312e12, 'float32': 156e12}))


def nominal_peak_flops(device, dtype: str = 'float32') -> float | None:
  """The data-sheet peak of a known accelerator, else None (CPUs: use `matmul_peak_flops`)."""
  for key, peaks in _NOMINAL_PEAKS:
    if key in getattr(device, 'device_kind', ''):
      return peaks[dtype]
  return None
