"""Association modes on occlusion: 'minvis' vs 'memory' (config.inference.tracker), on the demo's
tiny checkpoint.

  PYTHONPATH=. python benchmarks/tracking.py --workdir /tmp/minvis_tracking [--sweep]

1. Trains the demo's tiny model in WORKDIR/train exactly as `minvis-jax demo` does (its data, 300
   steps), or reuses the checkpoint found there.
2. Writes held-out splits for each data seed (default 1, 2, 3): the standard synthetic valid split
   and the occlusion split (`synthetic --occlusion`), 30 videos of 24 frames each.
3. Runs the model once per video (windows of config.inference.window frames, as the predictor does)
   and associates the cached outputs with each tracker; the post-processing mirrors
   `VideoPredictor`, and the first video of each split is checked against `VideoPredictor` itself.
4. Prints AP, AP50, AR10 (YouTube-VIS metric) and identity switches per video for each mode, split
   and seed, the means over seeds, and a last line `RESULT {json}`.

Identity switch: for each ground-truth instance, take in each frame where it is visible the track
with the highest mask IoU among the video's top-k tracks (frames where that IoU is < 0.5 count as
not detected and are skipped); every change of that track between consecutive detected frames
(across hidden frames too) is one switch.

--sweep also runs a grid of memory_momentum x memory_min_score on a separate tuning seed (0): the
defaults in configs/common.py were chosen from it, never from the reported seeds.
Last measured: README "Tracking".
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import demo
from minvis_jax import evaluation
from minvis_jax import predictor as predictor_lib
from minvis_jax import tracking
from minvis_jax import train
from minvis_jax.data import synthetic
from minvis_jax.data import ytvis
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig

SPLITS = ('standard', 'occlusion')


def train_or_reuse(workdir: str, steps: int | None = None, seed: int = 0):
  """(config, variables) of the demo's tiny checkpoint in WORKDIR/train, trained as the demo does
  (40 train videos of 12 frames, seed 0) unless a checkpoint of `steps` is already there."""
  config = config_lib.load_config(demo.TINY_CONFIG)
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
  root = os.path.join(workdir, 'eval', f'{kind}_seed{seed}')
  if not os.path.exists(os.path.join(root, 'valid.json')):
    height, width = config.data.canvas
    synthetic.generate(root, 'valid', videos, frames, height, width, seed=seed,
                       occlusion=kind == 'occlusion')
  return ytvis.load_split('synthetic', root, 'valid')


def forward_fn(config):
  model = Mask2Former(ModelConfig.from_config(config.model))
  return jax.jit(lambda variables, images: model.apply(variables, images))


def forward_video(forward, variables, config, video) -> dict:
  """Model outputs of every frame of `video` (windows of inference.window frames, as in
  VideoPredictor): embds [T, Q, C], logits [T, Q, K+1], masks float16 [T, Q, h, w]."""
  frames = (ytvis.read_frame(p) for p in video.frame_paths)
  embds, logits, masks = [], [], []
  padded = None
  for batch, valid in predictor_lib._windows(predictor_lib.preprocess(frames, config.data),
                                            config.inference.window):
    out = forward(variables, jnp.asarray(batch))
    padded = batch.shape[1:3]
    embds.append(np.asarray(out['pred_embds'])[valid])
    logits.append(np.asarray(out['pred_logits'])[valid])
    masks.append(np.asarray(out['pred_masks'].astype(jnp.float16))[valid])
  size = (video.height, video.width)
  return {'embds': np.concatenate(embds), 'logits': np.concatenate(logits),
          'masks': np.concatenate(masks), 'padded_size': tuple(padded), 'out_size': size,
          'valid_size': predictor_lib.valid_size(*size, config.data)}


def tracks_from_outputs(out: dict, tracker: tracking.Tracker, top_k: int) -> list[dict]:
  """VideoPredictor's association and video post-processing on cached outputs (one call for the
  whole video: chunked calls give the same permutations, tests/test_tracking.py)."""
  t, q, c = out['embds'].shape
  _, perm = tracking.track_chunk(tracker, tracking.init_state(q, c), out['embds'], out['logits'],
                                 np.ones(t, bool))
  perm = np.asarray(perm)
  logits = np.take_along_axis(out['logits'], perm[..., None], axis=1)
  probs = jax.nn.softmax(jnp.asarray(logits.sum(0)) / t, axis=-1)[:, :-1]    # [Q, K]
  num_classes = probs.shape[1]
  k = min(top_k, probs.size)
  scores, flat = jax.lax.top_k(probs.reshape(-1), k)
  queries = perm[:, np.asarray(flat) // num_classes]                         # [T, k]
  resize = predictor_lib._mask_resizer(out['padded_size'], tuple(out['valid_size']),
                                       tuple(out['out_size']))
  segs = [[] for _ in range(k)]
  for f in range(t):
    binary = np.asarray(resize(jnp.asarray(out['masks'][f, queries[f]], jnp.float32)))
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for i, r in enumerate(rles):
      segs[i].append({'size': r['size'], 'counts': r['counts'].decode()})
  return [{'category': int(cat), 'score': float(s), 'segmentations': seg}
          for cat, s, seg in zip(np.asarray(flat) % num_classes, np.asarray(scores), segs)]


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


def score(gt: dict, dataset, outputs: list[dict], tracker, top_k: int) -> dict:
  results = []
  for video, out in zip(dataset.videos, outputs):
    results.extend(predictor_lib.results_for_video(tracks_from_outputs(out, tracker, top_k),
                                                   video.id, dataset.category_ids))
  m = evaluation.evaluate_dicts(gt, results, gt_name=dataset.json_path)
  return {'AP': 100 * m['AP'], 'AP50': 100 * m['AP50'], 'AR10': 100 * m['AR10'],
          'switches': id_switches(gt, results) / len(dataset.videos)}


def check_against_predictor(config, variables, dataset, out, tracker, top_k):
  """The benchmark's shortcut equals VideoPredictor on the first video."""
  video = dataset.videos[0]
  predictor = predictor_lib.VideoPredictor(ModelConfig.from_config(config.model), variables,
                                           config.inference.window, top_k, tracker)
  size = (video.height, video.width)
  frames = (ytvis.read_frame(p) for p in video.frame_paths)
  ref = predictor(predictor_lib.preprocess(frames, config.data),
                  predictor_lib.valid_size(*size, config.data), size)
  got = tracks_from_outputs(out, tracker, top_k)
  assert [t['category'] for t in got] == [t['category'] for t in ref], (tracker, dataset.json_path)
  np.testing.assert_allclose([t['score'] for t in got], [t['score'] for t in ref], rtol=1e-5)
  same = sum(a == b for g, r in zip(got, ref)
             for a, b in zip(g['segmentations'], r['segmentations']))
  total = sum(len(g['segmentations']) for g in got)
  assert same == total, f'{tracker}: {same}/{total} masks equal to VideoPredictor\'s'


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/minvis_tracking')
  p.add_argument('--steps', type=int, default=None, help='training steps (default: the demo\'s)')
  p.add_argument('--seeds', default='1,2,3', help='data seeds of the held-out splits')
  p.add_argument('--videos', type=int, default=30)
  p.add_argument('--frames', type=int, default=24)
  p.add_argument('--sweep', action='store_true',
                 help='grid of memory_momentum x memory_min_score on tuning seed 0')
  args = p.parse_args(argv)
  t0 = time.time()
  config, variables = train_or_reuse(args.workdir, args.steps)
  step = config.total_steps if args.steps is None else args.steps
  print(f'checkpoint ready in {time.time() - t0:.0f} s', flush=True)
  forward = forward_fn(config)
  top_k = config.inference.top_k
  default = tracking.tracker_from_config(config)
  trackers = {'minvis': default._replace(kind='minvis'), 'memory': default._replace(kind='memory')}
  seeds = [int(s) for s in args.seeds.split(',')]

  def outputs_of(kind, seed):
    dataset = make_split(args.workdir, kind, seed, args.videos, args.frames, config)
    with open(dataset.json_path) as f:
      gt = json.load(f)
    # The forward outputs are cached next to the split (per checkpoint step): reruns only associate.
    cache = os.path.join(os.path.dirname(dataset.json_path), f'outputs_step{step}.npz')
    if os.path.exists(cache):
      with np.load(cache, allow_pickle=True) as f:
        outs = list(f['outputs'])
    else:
      outs = [forward_video(forward, variables, config, v) for v in dataset.videos]
      np.savez(cache, outputs=np.array(outs, dtype=object))
    return dataset, gt, outs

  if args.sweep:
    grid = [(m, s) for m in (0.0, 0.5, 0.7, 0.9) for s in (0.0, 0.3, 0.5, 0.7)]
    for kind in SPLITS:
      dataset, gt, outs = outputs_of(kind, 0)
      base = score(gt, dataset, outs, trackers['minvis'], top_k)
      print(f'sweep {kind} seed 0: minvis AP {base["AP"]:.2f} switches {base["switches"]:.2f}')
      for m, s in grid:
        r = score(gt, dataset, outs, tracking.Tracker('memory', m, s), top_k)
        print(f'  memory momentum {m:.1f} min_score {s:.1f}: AP {r["AP"]:6.2f} '
              f'AP50 {r["AP50"]:6.2f} AR10 {r["AR10"]:6.2f} switches {r["switches"]:.2f}',
              flush=True)

  table = {kind: {name: [] for name in trackers} for kind in SPLITS}
  for seed in seeds:
    for kind in SPLITS:
      dataset, gt, outs = outputs_of(kind, seed)
      if seed == seeds[0]:
        for tracker in trackers.values():
          check_against_predictor(config, variables, dataset, outs[0], tracker, top_k)
      for name, tracker in trackers.items():
        r = score(gt, dataset, outs, tracker, top_k)
        table[kind][name].append(r)
        print(f'{kind:>9} seed {seed} {name:>6}: AP {r["AP"]:6.2f} AP50 {r["AP50"]:6.2f} '
              f'AR10 {r["AR10"]:6.2f} ID switches/video {r["switches"]:.2f}', flush=True)

  print(f'\nmean over seeds {seeds} ({args.videos} videos x {args.frames} frames each); memory: '
        f'momentum {default.momentum}, min_score {default.min_score}')
  print(f'{"split":>9} {"tracker":>7} {"AP":>6} {"AP50":>6} {"AR10":>6} {"IDsw/video":>10}')
  summary = {}
  for kind in SPLITS:
    for name in trackers:
      rows = table[kind][name]
      mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
      summary[f'{kind}/{name}'] = {k: round(v, 2) for k, v in mean.items()}
      print(f'{kind:>9} {name:>7} {mean["AP"]:6.2f} {mean["AP50"]:6.2f} {mean["AR10"]:6.2f} '
            f'{mean["switches"]:10.2f}')
  for kind in SPLITS:
    per_seed = [m['AP'] - b['AP'] for m, b in zip(table[kind]['memory'], table[kind]['minvis'])]
    summary[f'{kind}/memory_minus_minvis_AP'] = [round(d, 2) for d in per_seed]
  summary['momentum'], summary['min_score'] = default.momentum, default.min_score
  print(f'finished in {time.time() - t0:.0f} s')
  print('RESULT ' + json.dumps(summary))
  return 0


if __name__ == '__main__':
  sys.exit(main())
