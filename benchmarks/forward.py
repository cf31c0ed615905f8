"""Jitted R50 Mask2Former forward at 384x384, batch 1: ours vs HF PyTorch, same weights.

  python benchmarks/forward.py [--repeats 10] [--torch_device cuda] [--dtype bfloat16]

On a GPU machine JAX runs on its default device; `--torch_device cuda` puts HF there too (timings
synchronise the device). `--dry-run` (= `--model tiny --size 64 --repeats 1`) is the dry run of
benchmarks/device.sh and of the tests.
"""

import argparse
import os
import sys

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import converted  # noqa: E402
from timing import median_times, result_line  # noqa: E402

from minvis_jax import host_memory  # noqa: E402
from minvis_jax.models import Mask2Former  # noqa: E402
from minvis_jax.models import ModelConfig  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--size', type=int, default=384)
  parser.add_argument('--model', default='r50', choices=['r50', 'tiny'])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='compute dtype of both (HF under torch.autocast)')
  parser.add_argument('--torch_device', default='cpu')
  parser.add_argument('--dry-run', action='store_true',
                      help='tiny model at 64x64, one repeat (tests)')
  args = parser.parse_args(argv)
  if args.dry_run:
    args.model, args.size, args.repeats = 'tiny', 64, 1
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model, model_config, variables = converted(args.model)
  model_config.dtype = args.dtype
  device = torch.device(args.torch_device)
  model.to(device)
  variables = jax.device_put(variables)
  x = np.random.RandomState(0).randn(1, args.size, args.size, 3).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
  apply = jax.jit(Mask2Former(ModelConfig.from_config(model_config)).apply)
  xj = jax.device_put(x)

  def torch_forward():
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                         enabled=args.dtype == 'bfloat16'):
      model(pixel_values=xt)
    if device.type == 'cuda':
      torch.cuda.synchronize()
  # In turns (ours, HF, ours, ...), so that drifting load on a shared machine weighs on both alike.
  ours, theirs = median_times([lambda: jax.block_until_ready(apply(variables, xj)), torch_forward],
                              args.repeats)
  print(f'jax {ours:.3f} s ({jax.default_backend()})  torch {theirs:.3f} s ({device}) '
        f'(median of {args.repeats}, {args.dtype}, {len(os.sched_getaffinity(0))} threads)')
  suffix = '' if args.dtype == 'float32' else f'_{args.dtype}'
  print(result_line(f'forward_{args.model}_{args.size}_b1_{jax.default_backend()}{suffix}', ours,
                    theirs))
  return ours, theirs


if __name__ == '__main__':
  # Keep freed memory mapped on CPU (minvis_jax/host_memory.py); PyTorch in this process too.
  host_memory.reexec_keeping_freed_memory()
  main()
