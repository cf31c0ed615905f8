"""Jitted R50 Mask2Former forward at 384x384, batch 1, CPU: ours vs HF PyTorch, same weights.

  python benchmarks/forward.py [--repeats 10]
"""

import argparse
import os
import sys

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
import hf_reference as ref  # noqa: E402

from timing import median_time, result_line  # noqa: E402

from minvis_jax.models import Mask2Former  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--size', type=int, default=384)
  args = parser.parse_args()
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model, model_config, variables = ref.converted_r50()
  variables = jax.device_put(variables)
  x = np.random.RandomState(0).randn(1, args.size, args.size, 3).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  apply = jax.jit(Mask2Former(model_config).apply)
  xj = jax.device_put(x)
  ours = median_time(lambda: jax.block_until_ready(apply(variables, xj)), args.repeats)

  def torch_forward():
    with torch.no_grad():
      model(pixel_values=xt)
  theirs = median_time(torch_forward, args.repeats)
  print(f'jax {ours:.3f} s  torch {theirs:.3f} s  (median of {args.repeats}, '
        f'{os.cpu_count()} threads)')
  print(result_line(f'forward_r50_{args.size}_b1_cpu', ours, theirs))


if __name__ == '__main__':
  main()
