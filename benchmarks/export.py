"""The exported model (docs/export.md) against the live one: a video through the offline predictor,
R50 (configs/minvis.py, random weights) on 360x640 frames (input 384x640), plus the artifact's
size and the export and load times.

  python benchmarks/export.py [--frames 8] [--repeats 3]

ours: `exported.load(file).video_predictor()`; reference: the live Flax model's predictor
(`model_forward.from_config`), same weights, frames, window and tracker, timed in turns after a
warm-up. They must give the same tracks (checked). `--dry-run`: the tiny model on 64x96 frames.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support.variables import random_variables  # noqa: E402
from timing import median_times, result_line  # noqa: E402

from minvis_jax import config_lib  # noqa: E402
from minvis_jax import export  # noqa: E402
from minvis_jax import host_memory  # noqa: E402
from minvis_jax import exported  # noqa: E402
from minvis_jax import model_forward  # noqa: E402
from minvis_jax import predictor  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--frames', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dry-run', action='store_true', help='tiny model, 64x96, 2 frames')
  args = parser.parse_args(argv)
  config = config_lib.load_config('tiny' if args.dry_run else 'minvis')
  (h, w), name = ((64, 96), 'tiny') if args.dry_run else ((360, 640), 'r50')
  if args.dry_run:
    args.frames, args.repeats = 2, 1
  variables = random_variables(config.model, seed=0)
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 255, (h, w, 3), np.uint8) for _ in range(args.frames)]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.jax')
    start = time.perf_counter()
    export.write(path, config, variables, [(h, w)])
    export_s, size = time.perf_counter() - start, os.path.getsize(path)
    start = time.perf_counter()
    model = exported.load(path)
    load_s = time.perf_counter() - start
  inputs = list(predictor.preprocess(frames, config.data))
  valid = predictor.valid_size(h, w, config.data)
  live = model_forward.from_config(config, jax.device_put(variables))
  ours = model.video_predictor()
  results = {}

  def run(key, video_predictor):
    results[key] = video_predictor(inputs, valid, (h, w))
  ours_s, ref_s = median_times([lambda: run('ours', ours), lambda: run('live', live)],
                               args.repeats, warmup=1)
  same = all(a['category'] == b['category'] and abs(a['score'] - b['score']) < 1e-5
             and a['segmentations'] == b['segmentations']
             for a, b in zip(results['ours'], results['live']))
  print(f'{name}: {args.frames} frames of {h}x{w}: exported {ours_s:.3f} s, live {ref_s:.3f} s '
        f'(median of {args.repeats}); same tracks: {same}; file {size / 2**20:.1f} MiB, export '
        f'{export_s:.1f} s, load {load_s:.2f} s')
  if not same:
    raise SystemExit('the exported model gave other tracks than the live one')
  print(result_line(f'exported_video_{name}_{args.frames}f_{h}x{w}', ours_s, ref_s,
                    file_mib=round(size / 2**20, 1), export_s=round(export_s, 1),
                    load_s=round(load_s, 2)))


if __name__ == '__main__':
  host_memory.reexec_keeping_freed_memory()   # the same allocator as the other benchmarks
  main()
