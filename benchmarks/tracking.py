"""Association modes on occlusion: 'minvis' vs 'memory' (config.inference.tracker), on the demo's
tiny checkpoint.

  python benchmarks/tracking.py --workdir /tmp/minvis_tracking [--sweep] [--steps 1000]
  python benchmarks/tracking.py --dry-run   # random tiny weights, 2 videos of 12 frames, seed 1

1. Trains the demo's tiny model in WORKDIR/train exactly as `minvis-jax demo` does (its data, 300
   steps), or reuses the checkpoint found there (the dry run uses random weights instead).
2. Writes held-out splits for each data seed (default 1, 2, 3): the standard synthetic valid split
   and the occlusion split (`synthetic --occlusion`), 30 videos of 24 frames each.
3. Runs MinVIS over each split with each tracker through the library's dataset predictor (the
   same path as `minvis-jax evaluate`).
4. Prints AP, AP50, AR10 (YouTube-VIS metric) and identity switches per video for each mode, split
   and seed, the means over seeds, and a last line `RESULT {json}` whose times are the seconds the
   'memory' (`ours_s`) and 'minvis' (`ref_s`) runs took over all splits.

Identity switch: for each ground-truth instance, take in each frame where it is visible the track
with the highest mask IoU among the video's top-k tracks (frames where that IoU is < 0.5 count as
not detected and are skipped); every change of that track between consecutive detected frames
(across hidden frames too) is one switch.

--sweep also runs a grid of memory_momentum x memory_min_score on a separate tuning seed (0): the
defaults in configs/common.py were chosen from it, never from the reported seeds.
Last measured: docs/tracking_study.md.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from pycocotools import mask as mask_utils


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.variables import random_variables  # noqa: E402

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import evaluate
from minvis_jax import demo
from minvis_jax import train
from minvis_jax.data import synthetic
from minvis_jax.data import ytvis
from minvis_jax.ytvis_eval import evaluate_dicts

SPLITS = ('standard', 'occlusion')
TRACKERS = ('minvis', 'memory')


def train_or_reuse(workdir: str, steps: int | None = None, seed: int = 0):
  """(config, variables) of the demo's tiny checkpoint in WORKDIR/train, trained as the demo does
  (40 train videos of 12 frames, seed 0) unless a checkpoint of `steps` is already there."""
  config = config_lib.load_config('tiny')
  config.seed = seed
  steps = config.total_steps if steps is None else steps
  config.optim.decay_steps = (max(1, 2 * steps // 3),)
  config.data.manual_dir = data_dir = os.path.abspath(os.path.join(workdir, 'data'))
  height, width = config.data.canvas
  train_dir = os.path.join(workdir, 'train')
  if not os.path.isdir(os.path.join(train_dir, 'checkpoints', str(steps))):
    demo.make_data(data_dir, 40, 8, 12, height, width, seed)
    train.train(config, train_dir, total_steps=steps)
  _, variables = checkpoints.load_for_inference(train_dir)
  return config, variables


def make_split(workdir: str, kind: str, seed: int, videos: int, frames: int, config):
  """The held-out split `kind` of data seed `seed` (written once) as a VisDataset."""
  root = os.path.join(workdir, 'eval', f'{kind}_seed{seed}_{videos}x{frames}')
  if not os.path.exists(os.path.join(root, 'valid.json')):
    height, width = config.data.canvas
    synthetic.generate(root, 'valid', videos, frames, height, width, seed=seed,
                       occlusion=kind == 'occlusion')
  return ytvis.load_split('synthetic', root, 'valid')


def id_switches(gt: dict, results: list[dict], min_iou: float = 0.5) -> int:
  """Identity switches over all ground-truth instances (module docstring)."""
  by_video = {}
  for r in results:
    by_video.setdefault(r['video_id'], []).append(r)
  switches = 0
  for ann in gt['annotations']:
    tracks = by_video.get(ann['video_id'], [])
    last = None
    for f, seg in enumerate(ann['segmentations']):
      if seg is None or not tracks:
        continue
      ious = mask_utils.iou([tr['segmentations'][f] for tr in tracks], [seg], [0])[:, 0]
      best = int(np.argmax(ious))
      if ious[best] < min_iou:
        continue
      switches += int(last is not None and best != last)
      last = best
  return switches


def score(config, variables, dataset, gt: dict, tracker: str, momentum: float | None = None,
          min_score: float | None = None) -> dict:
  """Runs MinVIS over `dataset` with `tracker` (and the memory's settings, default the config's):
  {AP, AP50, AR10 (percent), switches (per video), seconds (of the prediction)}."""
  config = config.copy_and_resolve_references()
  config.inference.tracker = tracker
  if momentum is not None:
    config.inference.memory_momentum = momentum
  if min_score is not None:
    config.inference.memory_min_score = min_score
  start = time.perf_counter()
  results = evaluate.predict_dataset(config, variables, dataset, progress=False)
  seconds = time.perf_counter() - start
  m = evaluate_dicts(gt, results, gt_name=dataset.json_path)
  return {'AP': 100 * m['AP'], 'AP50': 100 * m['AP50'], 'AR10': 100 * m['AR10'],
          'switches': id_switches(gt, results) / len(dataset.videos), 'seconds': seconds}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/minvis_tracking')
  p.add_argument('--steps', type=int, default=None, help='training steps (default: the demo\'s)')
  p.add_argument('--seeds', default='1,2,3', help='data seeds of the held-out splits')
  p.add_argument('--videos', type=int, default=30)
  p.add_argument('--frames', type=int, default=24)
  p.add_argument('--sweep', action='store_true',
                 help='grid of memory_momentum x memory_min_score on tuning seed 0')
  p.add_argument('--dry-run', action='store_true',
                 help='random tiny weights, 2 videos of 12 frames, seed 1, in a temporary workdir')
  args = p.parse_args(argv)
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    if args.dry_run:
      args.workdir, args.seeds, args.videos, args.frames, args.sweep = tmp, '1', 2, 12, False
      config = config_lib.load_config('tiny')
      variables = random_variables(config.model)
    else:
      config, variables = train_or_reuse(args.workdir, args.steps)
    print(f'checkpoint ready in {time.time() - t0:.0f} s', flush=True)
    return _report(args, config, variables, t0)


def _report(args, config, variables, t0: float) -> int:
  """Scores every split and tracker, prints the table and the RESULT line (see the docstring)."""
  momentum, min_score = config.inference.memory_momentum, config.inference.memory_min_score
  seeds = [int(s) for s in args.seeds.split(',')]

  def split(kind, seed):
    dataset = make_split(args.workdir, kind, seed, args.videos, args.frames, config)
    with open(dataset.json_path) as f:
      return dataset, json.load(f)

  if args.sweep:
    grid = [(m, s) for m in (0.0, 0.5, 0.7, 0.9) for s in (0.0, 0.3, 0.5, 0.7)]
    for kind in SPLITS:
      dataset, gt = split(kind, 0)
      base = score(config, variables, dataset, gt, 'minvis')
      print(f'sweep {kind} seed 0: minvis AP {base["AP"]:.2f} switches {base["switches"]:.2f}')
      for m, s in grid:
        r = score(config, variables, dataset, gt, 'memory', m, s)
        print(f'  memory momentum {m:.1f} min_score {s:.1f}: AP {r["AP"]:6.2f} '
              f'AP50 {r["AP50"]:6.2f} AR10 {r["AR10"]:6.2f} switches {r["switches"]:.2f}',
              flush=True)

  table = {kind: {name: [] for name in TRACKERS} for kind in SPLITS}
  for seed in seeds:
    for kind in SPLITS:
      dataset, gt = split(kind, seed)
      for name in TRACKERS:
        r = score(config, variables, dataset, gt, name)
        table[kind][name].append(r)
        print(f'{kind:>9} seed {seed} {name:>6}: AP {r["AP"]:6.2f} AP50 {r["AP50"]:6.2f} '
              f'AR10 {r["AR10"]:6.2f} ID switches/video {r["switches"]:.2f}', flush=True)

  print(f'\nmean over seeds {seeds} ({args.videos} videos x {args.frames} frames each); memory: '
        f'momentum {momentum}, min_score {min_score}')
  print(f'{"split":>9} {"tracker":>7} {"AP":>6} {"AP50":>6} {"AR10":>6} {"IDsw/video":>10}')
  summary = {}
  for kind in SPLITS:
    for name in TRACKERS:
      rows = table[kind][name]
      mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != 'seconds'}
      summary[f'{kind}/{name}'] = {k: round(v, 2) for k, v in mean.items()}
      print(f'{kind:>9} {name:>7} {mean["AP"]:6.2f} {mean["AP50"]:6.2f} {mean["AR10"]:6.2f} '
            f'{mean["switches"]:10.2f}')
  for kind in SPLITS:
    per_seed = [m['AP'] - b['AP'] for m, b in zip(table[kind]['memory'], table[kind]['minvis'])]
    summary[f'{kind}/memory_minus_minvis_AP'] = [round(d, 2) for d in per_seed]
  seconds = {name: sum(r['seconds'] for kind in SPLITS for r in table[kind][name])
             for name in TRACKERS}
  print(f'finished in {time.time() - t0:.0f} s')
  print('RESULT ' + json.dumps({
      'name': 'tracking_memory_vs_minvis' + ('_dry_run' if args.dry_run else ''),
      'ours_s': round(seconds['memory'], 4), 'ref_s': round(seconds['minvis'], 4),
      'ratio': round(seconds['memory'] / seconds['minvis'], 3),
      'momentum': momentum, 'min_score': min_score, **summary}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
