"""Online vs offline MinVIS on CPU: the cost of a frame when results come out frame by frame.

Same weights (random), same generated clip, one CPU device, a frame per forward in both:
  ours  `online.OnlineTracker.process`, one frame at a time (the live forward, the association, the
        report rule's masks at the original size and their RLEs): each frame's latency, p50/p95
  ref   `predictor.VideoPredictor` on the whole clip (window 1, the CPU default), its wall time
        divided by the frames: the offline per-frame cost, masks and RLEs of the top-k included
The report threshold is the offline k-th track's score, so about as many tracks are reported a
frame as the offline result keeps. Each run times both (offline first), after one warm-up run of
each; the RESULT line has the medians over the runs of online p50 and offline per frame.

  python benchmarks/online.py [--config minvis] [--frames 20] [--size 240x427] [--runs 2]
  python benchmarks/online.py --dry-run   # tiny model, 4 frames of 64x96
"""

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.variables import random_variables  # noqa: E402
from timing import result_line  # noqa: E402

from minvis_jax import config_lib  # noqa: E402
from minvis_jax import live_model  # noqa: E402
from minvis_jax import online  # noqa: E402
from minvis_jax import predictor  # noqa: E402
from minvis_jax import tracking  # noqa: E402
from minvis_jax.models import ModelConfig  # noqa: E402


def clip(frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
  """uint8 [H, W, 3] frames: noise with three boxes moving across."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(frames):
    f = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for i, colour in enumerate(((220, 60, 30), (40, 200, 80), (60, 90, 230))):
      y, x = int(height * (0.1 + 0.25 * i)), int(width * (0.05 + 0.02 * t + 0.2 * i)) % width
      f[y:y + height // 5, x:x + width // 6] = colour
    out.append(f)
  return out


def run_offline(config, variables, frames) -> tuple[float, list[dict]]:
  """(seconds per frame, tracks) of the offline predictor on `frames`."""
  size = frames[0].shape[:2]
  p = predictor.VideoPredictor(ModelConfig.from_config(config.model), variables, 1,
                               config.inference.top_k, tracking.tracker_from_config(config),
                               jax.local_devices()[:1])
  start = time.perf_counter()
  tracks = p(predictor.preprocess(frames, config.data), predictor.valid_size(*size, config.data),
             size)
  return (time.perf_counter() - start) / len(frames), tracks


def run_online(config, variables, frames, rules: online.Rules) -> tuple[list[float], int]:
  """(each frame's latency in seconds, tracks reported over the clip) of the online tracker."""
  tracker = online.OnlineTracker(
      live_model.frame_forward(ModelConfig.from_config(config.model), variables),
      tracking.tracker_from_config(config), online.input_spec_from_config(config.data), rules,
      config.inference.top_k)
  latencies, reported = [], 0
  for frame in frames:
    start = time.perf_counter()
    [result] = tracker.process([frame])
    latencies.append(time.perf_counter() - start)
    reported += len(result.tracks)
  tracker.close()
  return latencies, reported


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='minvis', help='shipped config (minvis: R50)')
  parser.add_argument('--frames', type=int, default=20)
  parser.add_argument('--size', default='240x427', help='frame HxW (resized as the config says)')
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--dry-run', action='store_true')
  args = parser.parse_args()
  if args.dry_run:
    args.config, args.frames, args.size, args.runs = 'tiny', 4, '64x96', 2
  config = config_lib.load_config(args.config)
  h, w = (int(v) for v in args.size.split('x'))
  # Frames resized to the frame's own short side: the test resolution is the clip's.
  config.data.min_size_test, config.data.max_size_test = min(h, w), max(h, w)
  variables = random_variables(config.model, seed=0)
  frames = clip(args.frames, h, w)
  _, tracks = run_offline(config, variables, frames)            # warm-up (compiles)
  rules = online.Rules(report_score=tracks[-1]['score'], retire_frames=5)
  run_online(config, variables, frames, rules)                  # warm-up
  print(f'{args.config}: {args.frames} frames of {h}x{w}, one CPU device '
        f'({jax.devices()[0].device_kind}), report score >= {rules.report_score:.4f} '
        f'(the offline top-{len(tracks)}th)')
  p50s, offline = [], []
  for run in range(args.runs):
    per_frame, _ = run_offline(config, variables, frames)
    latencies, reported = run_online(config, variables, frames, rules)
    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95))
    p50s.append(p50)
    offline.append(per_frame)
    print(f'run {run + 1}: online p50 {1000 * p50:.1f} ms, p95 {1000 * p95:.1f} ms a frame '
          f'({reported / len(frames):.1f} tracks reported a frame); offline {1000 * per_frame:.1f} '
          f'ms a frame; online/offline {p50 / per_frame:.3f}')
  name = f'online_vs_offline_per_frame_{args.config}_{h}x{w}' + ('_dry_run' * args.dry_run)
  print(result_line(name, statistics.median(p50s), statistics.median(offline),
                    runs=[[round(a, 5), round(b, 5)] for a, b in zip(p50s, offline)]))


if __name__ == '__main__':
  main()
