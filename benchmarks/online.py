"""Online vs offline MinVIS on CPU: the cost of a frame when results come out frame by frame.

Same weights (random), same generated clip, one CPU device, a frame per forward in both:
  ours  `online.OnlineTracker.process`, one frame at a time (the live forward, the association, the
        report rule's masks at the original size and their RLEs): each frame's latency, p50/p95
  ref   `predictor.VideoPredictor` on the whole clip (window 1, the CPU default), its wall time
        divided by the frames: the offline per-frame cost, masks and RLEs of the top-k included
The report threshold is set so that about as many tracks are reported a frame as the offline
result keeps (top-k): the median over the frames of the k-th highest running score, from the
warm-up run. Each run times both (offline first), after one warm-up run of each; the RESULT line
has the medians over the runs of online p50 and offline per frame.

  python benchmarks/online.py [--config minvis] [--frames 20] [--size 240x427] [--runs 2]
  python benchmarks/online.py --dry-run   # tiny model, 4 frames of 64x96

--sweep CHECKPOINT measures the report and retire rules instead (how configs/common.py's
inference.online_* defaults were chosen, docs/online.md): a trained checkpoint's online tracks on
generated synthetic valid splits (plain and occlusion-heavy) against the ground truth, frame by
frame (CLEAR MOT: a reported track matches an instance of its category at mask IoU >= 0.5, one to
one; MOTA = 1 - (misses + false tracks + id switches) / instances), for each pair of values.

  python benchmarks/online.py --sweep minvis_demo/train [--videos 12] [--frames 24]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.variables import random_variables  # noqa: E402
from timing import result_line  # noqa: E402

from minvis_jax import checkpoints  # noqa: E402
from minvis_jax import config_lib  # noqa: E402
from minvis_jax import host_memory  # noqa: E402
from minvis_jax import model_forward  # noqa: E402
from minvis_jax import online  # noqa: E402
from minvis_jax import predictor  # noqa: E402
from minvis_jax import tracking  # noqa: E402
from minvis_jax.data import synthetic  # noqa: E402
from minvis_jax.data import ytvis  # noqa: E402
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
  forward = model_forward.forward(ModelConfig.from_config(config.model))
  p = predictor.VideoPredictor(forward, variables, 1, config.inference.top_k,
                               tracking.tracker_from_config(config), jax.local_devices()[:1])
  start = time.perf_counter()
  tracks = p(predictor.preprocess(frames, config.data), predictor.valid_size(*size, config.data),
             size)
  return (time.perf_counter() - start) / len(frames), tracks


def run_online(config, variables, frames, rules: online.Rules) -> tuple[list[float], list[list]]:
  """(each frame's latency in seconds, each frame's reported scores) of the online tracker."""
  tracker = online.OnlineTracker(
      model_forward.frame_forward(ModelConfig.from_config(config.model), variables),
      tracking.tracker_from_config(config), online.input_spec_from_config(config.data), rules,
      config.inference.top_k)
  latencies, reported = [], []
  for frame in frames:
    start = time.perf_counter()
    [result] = tracker.process([frame])
    latencies.append(time.perf_counter() - start)
    reported.append([t['score'] for t in result.tracks])
  tracker.close()
  return latencies, reported


def _replay(outputs: list[dict]):
  """A forward that returns recorded per-frame outputs in order (the rules are swept on one
  forward pass per video)."""
  it = iter(outputs)
  return lambda images: next(it)


def _clear_mot(tracker: online.OnlineTracker, frames, video: ytvis.Video) -> np.ndarray:
  """[instances, misses, false tracks, id switches] of the tracker's online output on one video."""
  counts, last_id = np.zeros(4, int), {}
  for t, frame in enumerate(frames):
    [result] = tracker.process([frame])
    gt = [(inst.id, inst.category, ytvis.to_rle(inst.segmentations[t], video.height, video.width,
                                                 f'video {video.id}'))
          for inst in video.instances if inst.segmentations[t] is not None and not inst.iscrowd]
    tracks = result.tracks
    matched = []
    if gt and tracks:
      iou = mask_utils.iou([dict(tr['segmentation'], counts=tr['segmentation']['counts'].encode())
                            for tr in tracks], [g[2] for g in gt], [0] * len(gt))
      same = np.array([[tr['category'] == g[1] for g in gt] for tr in tracks])
      score = np.where(same & (iou >= 0.5), iou, 0.0)
      rows, cols = linear_sum_assignment(-score)
      matched = [(r, c) for r, c in zip(rows, cols) if score[r, c] > 0]
    for r, c in matched:
      instance, track_id = gt[c][0], tracks[r]['id']
      counts[3] += instance in last_id and last_id[instance] != track_id
      last_id[instance] = track_id
    counts[:3] += [len(gt), len(gt) - len(matched), len(tracks) - len(matched)]
  return counts


SCORES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
RETIRES = (1, 2, 3, 5, 10, 20)


def sweep(config, variables, where: str, videos: int, num_frames: int, scores=SCORES,
          retires=RETIRES) -> None:
  """The rules' MOTA on the synthetic valid splits, for a grid of values (see the docstring)."""
  model = ModelConfig.from_config(config.model)
  forward = model_forward.frame_forward(model, variables)
  spec, tracker_kind = online.input_spec_from_config(config.data), tracking.tracker_from_config(
      config)
  h, w = config.data.canvas
  recorded = []    # (video, frames, forward outputs per frame)
  with tempfile.TemporaryDirectory() as root:
    for occlusion in (False, True):
      synthetic.generate(root, 'valid', videos, num_frames, height=h, width=w, seed=11,
                         occlusion=occlusion)
      for video in ytvis.load_split('synthetic', root, 'valid').videos:
        frames = [ytvis.read_frame(p) for p in video.frame_paths]
        outputs = [jax.tree.map(np.asarray, forward(np.stack(list(predictor.preprocess(
            [f], config.data))))) for f in frames]
        recorded.append((occlusion, video, frames, outputs))
  print(f'{where}: {videos} plain + {videos} occlusion-heavy synthetic videos of {num_frames} '
        f'frames ({h}x{w})')
  print('report_score retire_frames | MOTA plain  occlusion  all | misses false id_switches')
  best = None
  for score in scores:
    for retire in retires:
      totals = {False: np.zeros(4, int), True: np.zeros(4, int)}
      for occlusion, video, frames, outputs in recorded:
        tracker = online.OnlineTracker(_replay(outputs), tracker_kind, spec,
                                       online.Rules(score, retire))
        totals[occlusion] += _clear_mot(tracker, frames, video)
      mota = {k: 1 - v[1:].sum() / v[0] for k, v in totals.items()}
      both = totals[False] + totals[True]
      mota_all = 1 - both[1:].sum() / both[0]
      print(f'{score:12.2f} {retire:13d} | {mota[False]:10.3f} {mota[True]:10.3f} {mota_all:5.3f}'
            f' | {both[1]:6d} {both[2]:5d} {both[3]:11d}')
      if best is None or mota_all > best[0]:
        best = (mota_all, score, retire)
  print(f'best: online_report_score={best[1]}, online_retire_frames={best[2]} (MOTA {best[0]:.3f})')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='minvis', help='shipped config (minvis: R50)')
  parser.add_argument('--frames', type=int, default=None, help='default 20 (--sweep: 24)')
  parser.add_argument('--size', default='240x427', help='frame HxW (resized as the config says)')
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--dry-run', action='store_true')
  parser.add_argument('--sweep', default='', metavar='CHECKPOINT',
                      help='measure the report/retire rules of a trained checkpoint instead')
  parser.add_argument('--videos', type=int, default=12, help='--sweep: videos per split')
  args = parser.parse_args()
  # Keep freed memory mapped on CPU (minvis_jax/host_memory.py), as the other benchmarks.
  host_memory.reexec_keeping_freed_memory()
  if args.sweep:
    config, variables = checkpoints.load_model(args.sweep, '')
    return sweep(config, variables, args.sweep, args.videos, args.frames or 24)
  args.frames = args.frames or 20
  if args.dry_run:
    args.config, args.frames, args.size, args.runs = 'tiny', 4, '64x96', 2
  config = config_lib.load_config(args.config)
  h, w = (int(v) for v in args.size.split('x'))
  # Frames resized to the frame's own short side: the test resolution is the clip's.
  config.data.min_size_test, config.data.max_size_test = min(h, w), max(h, w)
  variables = random_variables(config.model, seed=0)
  frames = clip(args.frames, h, w)
  run_offline(config, variables, frames)                        # warm-up (compiles)
  _, scores = run_online(config, variables, frames, online.Rules(0.0, 5))   # warm-up
  k = config.inference.top_k
  rules = online.Rules(float(np.median([sorted(s)[-k] if len(s) >= k else 0.0 for s in scores])),
                       5)
  run_online(config, variables, frames, rules)                  # warm-up with these rules
  print(f'{args.config}: {args.frames} frames of {h}x{w}, one CPU device '
        f'({jax.devices()[0].device_kind}), report score >= {rules.report_score:.4f} (the median '
        f'k-th running score, k = {k})')
  p50s, offline = [], []
  for run in range(args.runs):
    per_frame, _ = run_offline(config, variables, frames)
    latencies, reported = run_online(config, variables, frames, rules)
    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95))
    p50s.append(p50)
    offline.append(per_frame)
    shown = np.mean([len(s) for s in reported])
    print(f'run {run + 1}: online p50 {1000 * p50:.1f} ms, p95 {1000 * p95:.1f} ms a frame '
          f'({shown:.1f} tracks reported a frame); offline {1000 * per_frame:.1f} ms a frame; '
          f'online/offline {p50 / per_frame:.3f}')
  if args.dry_run:   # the sweep's code too, on this random model (a table of noise)
    config.data.canvas = (64, 96)
    sweep(config, variables, 'random tiny model', 1, 12, (0.3, 0.6), (1, 3))
  name = f'online_vs_offline_per_frame_{args.config}_{h}x{w}' + ('_dry_run' * args.dry_run)
  print(result_line(name, statistics.median(p50s), statistics.median(offline),
                    runs=[[round(a, 5), round(b, 5)] for a, b in zip(p50s, offline)]))


if __name__ == '__main__':
  main()
