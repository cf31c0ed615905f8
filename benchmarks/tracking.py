"""Association modes on occlusion: 'minvis' vs 'memory' vs 'ctvis' (config.inference.tracker), on
the demo's tiny checkpoint, and with `--reid` the re-identification embeddings (docs/reid.md).

  python benchmarks/tracking.py --workdir /tmp/minvis_tracking [--sweep] [--steps 300,900] [--reid]
      [--trackers minvis,memory,ctvis]
  python benchmarks/tracking.py --dry-run   # random tiny weights, 2 videos of 12 frames, seed 1

--reid fine-tunes (or reuses) two reid checkpoints from each base checkpoint, `--reid_steps` steps
on the demo's training data with view pairs (data/pairs.py) and REID_RECIPE: 'reid detached'
(model.reid_detach: only the head trains, the detector stays bit-identical) and 'reid fine-tuned'
(everything trains). The table then has a row per checkpoint x embedding (inference.embedding) x
tracker (MinVIS's decoder embeddings on the base, the reid embeddings on the reid checkpoints,
and the fine-tuned detector's decoder embeddings with 'minvis': a control for its extra training),
and for each checkpoint and embedding the re-appearance statistics on the occlusion split: for
every ground-truth instance that comes back after 3 or more frames hidden or undetected in a
different query than before (detected = a query with mask IoU >= 0.5; the best one is its query),
the cosine of its embedding with its own before the gap and with what its new query held before
the gap, and the share of such gaps where its own is the nearer (also for the fine-tuned
detector's decoder embeddings, and the base's untrained mask-pooled pixel features as a content
reference). Then the slot agreement of the fine-tunes' training views and the goal checks against
MinVIS on the same base checkpoint.

1. Trains the demo's tiny model in WORKDIR/s{steps}/train for each of --steps (default the demo's
   300) exactly as `minvis-jax demo` does (its data), or reuses the checkpoint found there (the
   dry run uses random weights instead); the reid fine-tunes go beside it.
2. Writes held-out splits for each data seed (default 1, 2, 3): the standard synthetic valid split
   and the occlusion split (`synthetic --occlusion`), 30 videos of 24 frames each.
3. Runs MinVIS over each split with each tracker through the library's dataset predictor (the
   same path as `minvis-jax evaluate`).
4. Prints AP, AP50, AR10 (YouTube-VIS metric), identity switches per video and IDF1 (IDP, IDR)
   for each mode, split and seed, the means over seeds, and a last line `RESULT {json}` whose
   times are the seconds the 'memory' (`ours_s`; without it, the last other tracker of --trackers)
   and 'minvis' (`ref_s`) runs took over all splits (the first base checkpoint's decoder rows).

Identity metrics (minvis_jax/identity_eval.py, class-agnostic, a frame matches at mask IoU >= 0.5).
Identity switch: for each ground-truth instance, take in each frame where it is visible the track
with the highest mask IoU among the video's top-k tracks (frames where that IoU is < 0.5 count as
not detected and are skipped); every change of that track between consecutive detected frames
(across hidden frames too) is one switch. IDF1 (Ristani et al. 2016): the predicted tracks are the
results with score >= 0.5 (at most one class of a track can pass; fixed, not tuned); per video the
one-to-one assignment of ground-truth instances to them that maximises the frames where the pair
matches (IDTP); IDF1 = 2 IDTP / (ground-truth + predicted detections), IDP = IDTP / predicted,
IDR = IDTP / ground-truth detections, counts summed over the split's videos.

--sweep also runs, on a separate tuning seed (0), a grid of memory_momentum x memory_min_score and,
with 'ctvis' in --trackers, of ctvis_score x ctvis_match: defaults are chosen from it, never from
the reported seeds. The 'ctvis' values (--ctvis_score, --ctvis_match, --ctvis_retire_frames)
default to the config's.
Last measured: docs/tracking_study.md.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import numpy as np
from pycocotools import mask as mask_utils


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.variables import random_variables  # noqa: E402

import jax

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import evaluate
from minvis_jax import identity_eval
from minvis_jax import demo
from minvis_jax import predictor
from minvis_jax import tracking as tracking_lib
from minvis_jax import train
from minvis_jax.data import synthetic
from minvis_jax.data import ytvis
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig
from minvis_jax.models.mask2former import mask_pooled
from minvis_jax.ytvis_eval import evaluate_dicts

SPLITS = ('occlusion', 'standard')   # occlusion first: what a cut-short run must have
MIN_GAP = 3   # hidden or undetected frames before a re-appearance
CTVIS_KEYS = ('ctvis_score', 'ctvis_match', 'ctvis_retire_frames', 'ctvis_cache',
              'ctvis_max_tracks')
# The reid fine-tunes' settings beyond configs/common.py (chosen on tuning seed 0: docs/reid.md).
REID_RECIPE = {}


def fine_tune_reid(workdir: str, base_steps: int, steps: int, detach: bool,
                   recipe: dict | None = None):
  """(config, variables) of a reid checkpoint fine-tuned from the demo's one (WORKDIR/train at
  `base_steps`) for `steps` steps on the same training data with `recipe` ({config key: value},
  default REID_RECIPE), trained once in WORKDIR/reid_{detached,finetuned}_{steps}[_{tag}]."""
  config = config_lib.load_config('tiny')
  config.model.reid = True
  config.model.reid_detach = detach
  recipe = REID_RECIPE if recipe is None else recipe
  for key, value in recipe.items():
    section, name = key.split('.')
    config[section][name] = value
  config.init.checkpoint = os.path.join(workdir, 'train', 'checkpoints', str(base_steps),
                                        'variables')
  config.init.reinit_class_head = False
  config.data.manual_dir = os.path.abspath(os.path.join(workdir, 'data'))
  config.optim.decay_steps = (max(1, 2 * steps // 3),)
  config.eval.every_steps = 0
  config_lib.validate(config)
  tag = ''.join(f'_{k.split(".")[1]}={v}' for k, v in sorted(recipe.items())).replace('+', '-')
  out = os.path.join(workdir, f'reid_{"detached" if detach else "finetuned"}_{steps}{tag}')
  if not os.path.isdir(os.path.join(out, 'checkpoints', str(steps))):
    train.train(config, out, total_steps=steps)
  _, variables = checkpoints.load_for_inference(out)
  return config, variables


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(model_config: ModelConfig, embeddings: tuple[str, ...], variables, images):
  """images [T, H, W, 3] -> (mask logits [T, Q, H/4, W/4], {embedding: [T, Q, C]}) for each of
  `embeddings`: 'decoder' (pred_embds), 'reid' (pred_reid) or 'mask' (the pixel decoder's mask
  features pooled under each query's mask, untrained: what the objects look like)."""
  out, state = Mask2Former(model_config).apply(
      variables, images, capture_intermediates=True, mutable=['intermediates'])
  mask_features = state['intermediates']['pixel_decoder']['__call__'][0][0]
  found = {'decoder': lambda: out['pred_embds'], 'reid': lambda: out['pred_reid'],
           'mask': lambda: mask_pooled(out['pred_masks'], mask_features)}
  return out['pred_masks'], {e: found[e]() for e in embeddings}


# What a returning object's new query held before the gap: the object itself (a duplicate of its
# query then), another instance of its category or of another, or none (mask IoU >= 0.5).
SLOT_HELD = ('itself', 'same category', 'other category', 'no instance')


def _decode(seg: dict) -> np.ndarray:
  if isinstance(seg['counts'], list):
    seg = mask_utils.frPyObjects(seg, *seg['size'])
  return mask_utils.decode(seg).astype(bool)


def reappearances(config, variables, dataset, gt: dict, embeddings: tuple[str, ...]) -> dict:
  """Re-appearance statistics of each of `embeddings` (`_forward`) over `dataset` (module
  docstring): {embedding: {gaps, own_cos, slot_cos (means), own_nearest (percent of gaps),
  by_slot: {what the new query held before the gap (SLOT_HELD): [gaps, own nearest %]}}}."""
  model_config = ModelConfig.from_config(config.model)
  own = {e: [] for e in embeddings}
  slot = {e: [] for e in embeddings}
  held = []
  by_video = {}
  for ann in gt['annotations']:
    by_video.setdefault(ann['video_id'], []).append(ann)
  for video in dataset.videos:
    frames = [ytvis.read_frame(p) for p in video.frame_paths]
    h, w = frames[0].shape[:2]
    pred_masks, found = _forward(model_config, tuple(embeddings), variables,
                                 np.stack(list(predictor.preprocess(frames, config.data))))
    # Mask logits (at 1/4 of the padded input) -> the valid part -> the frame's size.
    hv, wv = predictor.valid_size(h, w, config.data)
    logits = pred_masks[:, :, :-(-hv // 4), :-(-wv // 4)]
    masks = np.asarray(jax.image.resize(logits, logits.shape[:2] + (h, w), 'bilinear') > 0)
    unit = {}
    for e, x in found.items():
      x = np.asarray(x, np.float64)
      unit[e] = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    anns = by_video.get(video.id, [])
    gt_masks = [[None if seg is None else _decode(seg) for seg in ann['segmentations']]
                for ann in anns]

    def best_iou(m, g):
      return (m & g).sum((-2, -1)) / np.maximum((m | g).sum((-2, -1)), 1)

    for a, ann in enumerate(anns):
      seen = []   # (frame, query) where the instance is detected
      for t, g in enumerate(gt_masks[a]):
        if g is None:
          continue
        iou = best_iou(masks[t], g)
        if iou.max() >= 0.5:
          seen.append((t, int(np.argmax(iou))))
      for (t1, q1), (t2, q2) in zip(seen, seen[1:]):
        if t2 - t1 - 1 >= MIN_GAP and q1 != q2:
          for e, x in unit.items():
            own[e].append(x[t2, q2] @ x[t1, q1])
            slot[e].append(x[t2, q2] @ x[t1, q2])
          # What q2 held at t1: the instance its mask covers best (IoU >= 0.5), if any.
          ious = [(best_iou(masks[t1, q2], m[t1]), b) for b, m in enumerate(gt_masks)
                  if m[t1] is not None]
          iou, b = max(ious, default=(0.0, -1))
          held.append(SLOT_HELD[3] if iou < 0.5 else SLOT_HELD[0] if b == a else SLOT_HELD[
              1 if anns[b]['category_id'] == ann['category_id'] else 2])
  stats = {}
  held = np.array(held)
  for e in embeddings:
    o, s = np.array(own[e]), np.array(slot[e])
    stats[e] = {'gaps': len(o), 'own_cos': float(o.mean()) if len(o) else float('nan'),
                'slot_cos': float(s.mean()) if len(o) else float('nan'),
                'own_nearest': 100 * float(np.mean(o > s)) if len(o) else float('nan'),
                'by_slot': {k: [int(np.sum(held == k)), 100 * float(np.mean((o > s)[held == k]))
                                if np.any(held == k) else None] for k in SLOT_HELD}}
  return stats


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


def score(config, variables, dataset, gt: dict, tracker: str, momentum: float | None = None,
          min_score: float | None = None, embedding: str = 'decoder', **inference) -> dict:
  """Runs MinVIS over `dataset` with `tracker` on `embedding` (and the memory's settings, default
  the config's; `inference`: other config.inference values, e.g. ctvis_score): {AP, AP50, AR10
  (percent), switches (per video), IDF1, IDP, IDR (percent; identity_eval), seconds (of the
  prediction)}."""
  config = config.copy_and_resolve_references()
  config.inference.tracker = tracker
  config.inference.embedding = embedding
  config.inference.update(inference)
  if momentum is not None:
    config.inference.memory_momentum = momentum
  if min_score is not None:
    config.inference.memory_min_score = min_score
  start = time.perf_counter()
  results = evaluate.predict_dataset(config, variables, dataset, progress=False)
  seconds = time.perf_counter() - start
  m = evaluate_dicts(gt, results, gt_name=dataset.json_path)
  ids = identity_eval.idf1(gt, results)
  return {'AP': 100 * m['AP'], 'AP50': 100 * m['AP50'], 'AR10': 100 * m['AR10'],
          'switches': identity_eval.id_switches(gt, results) / len(dataset.videos),
          **{k: 100 * ids[k] for k in ('IDF1', 'IDP', 'IDR')}, 'seconds': seconds}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/minvis_tracking')
  p.add_argument('--steps', default=None,
                 help="training steps of the base checkpoints, comma separated (default: the "
                      "demo's); each in WORKDIR/s{steps}")
  p.add_argument('--seeds', default='1,2,3', help='data seeds of the held-out splits')
  p.add_argument('--videos', type=int, default=30)
  p.add_argument('--frames', type=int, default=24)
  p.add_argument('--trackers', default=','.join(tracking_lib.TRACKERS),
                 help=f'config.inference.tracker values to compare, comma separated (some of '
                      f'{", ".join(tracking_lib.TRACKERS)})')
  p.add_argument('--sweep', action='store_true',
                 help='grid of memory_momentum x memory_min_score on tuning seed 0')
  p.add_argument('--reid', action='store_true',
                 help='also the reid checkpoints (detached, fine-tuned) and embeddings')
  p.add_argument('--reid_steps', type=int, default=300, help='fine-tuning steps of --reid')
  p.add_argument('--models', default='minvis,detached,finetuned',
                 help='which checkpoints of each base to score (with --reid): the base (minvis), '
                      'the reid detached and the reid fine-tuned one; e.g. to split the grid '
                      'over processes')
  p.add_argument('--reid_momentum', type=float, default=0.7,
                 help="the memory tracker's momentum on reid embeddings")
  p.add_argument('--reid_min_score', type=float, default=0.5,
                 help="the memory tracker's min_score on reid embeddings")
  p.add_argument('--ctvis_score', type=float, default=None,
                 help="inference.ctvis_score of the 'ctvis' runs (default: the config's)")
  p.add_argument('--ctvis_match', type=float, default=None,
                 help="inference.ctvis_match of the 'ctvis' runs (default: the config's)")
  p.add_argument('--ctvis_retire_frames', type=int, default=None,
                 help="inference.ctvis_retire_frames of the 'ctvis' runs (default: the config's)")
  p.add_argument('--dry-run', action='store_true',
                 help='random tiny weights, 2 videos of 12 frames, seed 1, in a temporary workdir')
  args = p.parse_args(argv)
  names = [n for n in args.trackers.split(',') if n]
  unknown = sorted(set(names) - set(tracking_lib.TRACKERS))
  if unknown:
    p.error(f'--trackers: unknown {",".join(unknown)}; choose among '
            f'{",".join(tracking_lib.TRACKERS)}')
  # minvis, the baseline of every goal, always runs.
  trackers = tuple(n for n in tracking_lib.TRACKERS if n in names or n == 'minvis')
  args.trackers = trackers
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    if args.dry_run:
      args.workdir, args.seeds, args.videos, args.frames, args.sweep = tmp, '1', 2, 12, False
      config = config_lib.load_config('tiny')
      config.model.reid = True
      config.model.reid_input = REID_RECIPE.get('model.reid_input', 'query')
      variables = random_variables(config.model)
      models = [('random', config, variables, ('decoder', 'reid'))]
      base_steps = [0]
    else:
      base_steps = ([int(s) for s in args.steps.split(',')] if args.steps
                    else [config_lib.load_config('tiny').total_steps])
      models = []
      wanted = args.models.split(',')
      for steps in base_steps:
        workdir = os.path.join(args.workdir, f's{steps}')
        config, variables = train_or_reuse(workdir, steps)
        if 'minvis' in wanted:
          models.append((f'minvis {steps}', config, variables, ('decoder',)))
        if not args.reid:
          continue
        for detach, name, label in ((True, 'detached', 'reid detached'),
                                    (False, 'finetuned', 'reid fine-tuned')):
          if name not in wanted:
            continue
          models.append((f'{label} {steps}',
                         *fine_tune_reid(workdir, steps, args.reid_steps, detach), ('reid',)))
          if detach:
            detector = {k: v for k, v in models[-1][2]['params'].items() if k != 'reid_head'}
            same = jax.tree.all(jax.tree.map(np.array_equal, detector, variables['params']))
            print(f'reid detached {steps}: detector bit-identical to the base checkpoint: {same}')
    print(f'checkpoints ready in {time.time() - t0:.0f} s', flush=True)
    return _report(args, trackers, models, base_steps, t0)


def _runs(label: str, embs: tuple[str, ...], trackers: tuple[str, ...]) -> list:
  """(embedding, tracker) rows of a checkpoint: each of its embeddings with each tracker and, for
  a reid fine-tune, its decoder embeddings with 'minvis' too: the control, MinVIS on the same
  detector (trained --reid_steps more steps on the view pairs), against which the reid rows'
  change is the embedding's."""
  runs = [(emb, name) for emb in embs for name in trackers]
  if label.startswith('reid fine-tuned') and ('decoder', 'minvis') not in runs:
    runs.append(('decoder', 'minvis'))
  return runs


def _memory(args, embedding: str):
  """(momentum, min_score) of the memory tracker on `embedding` (None: the config's)."""
  return (args.reid_momentum, args.reid_min_score) if embedding == 'reid' else (None, None)


def _ctvis(args) -> dict:
  """The config.inference values the command line sets for 'ctvis' (the others: the config's)."""
  values = {'ctvis_score': args.ctvis_score, 'ctvis_match': args.ctvis_match,
            'ctvis_retire_frames': args.ctvis_retire_frames}
  return {k: v for k, v in values.items() if v is not None}


def slot_agreement(workdir: str) -> float | None:
  """The mean logged `slot_agreement` of a reid fine-tune's training views (metrics.jsonl)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    values = [r['slot_agreement'] for r in map(json.loads, f) if 'slot_agreement' in r]
  return float(np.mean(values)) if values else None


def _report(args, trackers, models, base_steps, t0: float) -> int:
  """Scores every split, checkpoint, embedding and tracker, prints the tables, the goal checks
  and the RESULT line (see the docstring)."""
  _, config, variables, _ = models[0]
  momentum, min_score = config.inference.memory_momentum, config.inference.memory_min_score
  seeds = [int(s) for s in args.seeds.split(',')]

  def split(kind, seed):
    dataset = make_split(args.workdir, kind, seed, args.videos, args.frames, config)
    with open(dataset.json_path) as f:
      return dataset, json.load(f)

  if args.sweep:
    _sweep(args, models, split)
  rows = [(label, emb, name) for label, _, _, embs in models
          for emb, name in _runs(label, embs, trackers)]
  table = {kind: {row: [] for row in rows} for kind in SPLITS}
  # Re-appearance statistics: each model's tracked embeddings, the fine-tuned detector's decoder
  # embeddings and, as a content reference, the base checkpoints' untrained mask-pooled pixel
  # features.
  extra = {'minvis': ('mask',), 'random': ('mask',), 'reid fine-tuned': ('decoder',)}
  probe = {label: embs + next((v for k, v in extra.items() if label.startswith(k)), ())
           for label, _, _, embs in models}
  gaps = {(label, emb): [] for label, embs in probe.items() for emb in embs}
  for seed in seeds:
    for kind in SPLITS:
      dataset, gt = split(kind, seed)
      for label, cfg, var, embs in models:
        if kind == 'occlusion':
          for emb, r in reappearances(cfg, var, dataset, gt, probe[label]).items():
            gaps[label, emb].append(r)
            print(f're-appearances seed {seed} {label} {emb}: ' + json.dumps(r), flush=True)
        for emb, name in _runs(label, embs, trackers):
          r = score(cfg, var, dataset, gt, name, *_memory(args, emb), embedding=emb,
                    **_ctvis(args))
          table[kind][label, emb, name].append(r)
          print(f'{kind:>9} seed {seed} {label:>19} {emb:>7} {name:>6}: AP {r["AP"]:6.2f} '
                f'AP50 {r["AP50"]:6.2f} AR10 {r["AR10"]:6.2f} ID switches/video '
                f'{r["switches"]:.2f} IDF1 {r["IDF1"]:6.2f} IDP {r["IDP"]:6.2f} '
                f'IDR {r["IDR"]:6.2f}', flush=True)
  agreement = {}
  if not args.dry_run and args.reid:
    for steps in base_steps:
      for kind in ('detached', 'finetuned'):
        tag = ''.join(f'_{k.split(".")[1]}={v}' for k, v in sorted(REID_RECIPE.items()))
        agreement[f'{kind} {steps}'] = slot_agreement(os.path.join(
            args.workdir, f's{steps}', f'reid_{kind}_{args.reid_steps}{tag.replace("+", "-")}'))
  summary = _print_tables(args, seeds, table, gaps, momentum, min_score, agreement)
  summary.update(_goals(table, gaps, models, trackers))
  base, _, _, (emb, *_) = models[0]
  seconds = {name: sum(r['seconds'] for kind in SPLITS for r in table[kind][base, emb, name])
             for name in trackers}
  for kind in SPLITS:
    for name in trackers[1:]:
      per_seed = [m['AP'] - b['AP'] for m, b in zip(table[kind][base, emb, name],
                                                     table[kind][base, emb, 'minvis'])]
      summary[f'{kind}/{name}_minus_minvis_AP'] = [round(d, 2) for d in per_seed]
  ours = 'memory' if 'memory' in trackers else trackers[-1]
  print(f'finished in {time.time() - t0:.0f} s')
  print('RESULT ' + json.dumps({
      'name': 'tracking_memory_vs_minvis' + ('_dry_run' if args.dry_run else ''),
      'ours_s': round(seconds[ours], 4), 'ref_s': round(seconds['minvis'], 4),
      'ratio': round(seconds[ours] / seconds['minvis'], 3),
      'seconds': {name: round(v, 4) for name, v in seconds.items()},
      'momentum': momentum, 'min_score': min_score,
      'ctvis': {k: config.inference[k] for k in CTVIS_KEYS} | _ctvis(args), **summary}))
  return 0


def _goals(table, gaps, models, trackers) -> dict:
  """The targets, per base checkpoint, against its MinVIS (decoder embedding, 'minvis' tracker):
  own embedding nearest at >= 80 % of re-appearances; on occlusion at most half the ID switches
  and AP + 3; on standard AP at most 0.5 below. Printed for each reid row; returned as a dict."""
  out = {}
  print('\ngoals (vs MinVIS of the same base checkpoint; means over seeds)')
  mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
  base = None
  for label, _, _, embs in models:
    if label.startswith(('minvis', 'random')):
      base = label
      continue
    if base is None or base.split()[-1] != label.split()[-1]:
      continue   # its base checkpoint was not scored (--models)
    ref = {kind: table[kind][base, 'decoder', 'minvis'] for kind in SPLITS}
    for emb in embs:
      rs = gaps.get((label, emb), [])
      n = sum(r['gaps'] for r in rs)
      nearest = sum(r['own_nearest'] * r['gaps'] for r in rs if r['gaps']) / n if n else None
      for name in trackers:
        occ, std = table['occlusion'][label, emb, name], table['standard'][label, emb, name]
        d_ap = mean(occ, 'AP') - mean(ref['occlusion'], 'AP')
        sw = mean(occ, 'switches') / max(mean(ref['occlusion'], 'switches'), 1e-9)
        d_std = mean(std, 'AP') - mean(ref['standard'], 'AP')
        d_idf1 = mean(occ, 'IDF1') - mean(ref['occlusion'], 'IDF1')
        ok = {'own_nearest>=80': nearest is not None and nearest >= 80,
              'occ_switches<=half': sw <= 0.5, 'occ_AP>=+3': d_ap >= 3,
              'std_AP>=-0.5': d_std >= -0.5}
        out[f'goal/{label}/{emb}/{name}'] = {'occ_dAP': round(d_ap, 2),
                                            'occ_switch_ratio': round(sw, 3),
                                            'std_dAP': round(d_std, 2),
                                            'occ_dIDF1': round(d_idf1, 2), **ok}
        print(f'{label:>19} {emb:>7} {name:>7}: occlusion AP {d_ap:+.2f}, switches x{sw:.2f}, '
              f'IDF1 {d_idf1:+.2f}; '
              f'standard AP {d_std:+.2f}; ' + ', '.join(f'{k} {"yes" if v else "NO"}'
                                                         for k, v in ok.items()))
  return out


def _sweep(args, models, split) -> None:
  """memory_momentum x memory_min_score (and ctvis_score x ctvis_match) on tuning seed 0, per
  checkpoint and embedding."""
  grid = [(m, s) for m in (0.0, 0.5, 0.7, 0.9) for s in (0.0, 0.3, 0.5, 0.7)]
  ctvis_grid = [(s, m) for s in (0.05, 0.1, 0.3, 0.5) for m in (0.1, 0.3, 0.5)]
  for kind in SPLITS:
    dataset, gt = split(kind, 0)
    for label, cfg, var, embs in models:
      for emb in embs:
        base = score(cfg, var, dataset, gt, 'minvis', embedding=emb)
        print(f'sweep {kind} seed 0 {label} {emb}: minvis AP {base["AP"]:.2f} switches '
              f'{base["switches"]:.2f} IDF1 {base["IDF1"]:.2f}')
        for m, s in grid if 'memory' in args.trackers else ():
          r = score(cfg, var, dataset, gt, 'memory', m, s, embedding=emb)
          print(f'  memory momentum {m:.1f} min_score {s:.1f}: AP {r["AP"]:6.2f} '
                f'AP50 {r["AP50"]:6.2f} AR10 {r["AR10"]:6.2f} switches {r["switches"]:.2f} '
                f'IDF1 {r["IDF1"]:.2f}',
                flush=True)
        for s, m in ctvis_grid if 'ctvis' in args.trackers else ():
          r = score(cfg, var, dataset, gt, 'ctvis', embedding=emb,
                    **{**_ctvis(args), 'ctvis_score': s, 'ctvis_match': m})
          print(f'  ctvis score {s:.2f} match {m:.1f}: AP {r["AP"]:6.2f} '
                f'AP50 {r["AP50"]:6.2f} AR10 {r["AR10"]:6.2f} switches {r["switches"]:.2f} '
                f'IDF1 {r["IDF1"]:.2f}',
                flush=True)


def _print_tables(args, seeds, table, gaps, momentum, min_score, agreement) -> dict:
  """The means over seeds: tracking per split and row (and per seed), re-appearances per
  checkpoint/embedding, the slot agreement of the reid fine-tunes' views."""
  print(f'\nmean over seeds {seeds} ({args.videos} videos x {args.frames} frames each); memory: '
        f'momentum {momentum}, min_score {min_score} (reid: {args.reid_momentum}, '
        f'{args.reid_min_score})')
  print(f'{"split":>9} {"checkpoint":>19} {"embed":>7} {"tracker":>7} {"AP":>6} {"AP50":>6} '
        f'{"AR10":>6} {"IDsw/video":>10} {"IDF1":>6} {"IDP":>6} {"IDR":>6}   AP per seed')
  summary = {}
  for kind in SPLITS:
    for (label, emb, name), rs in table[kind].items():
      mean = {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if k != 'seconds'}
      summary[f'{kind}/{label}/{emb}/{name}'] = {
          **{k: round(v, 2) for k, v in mean.items()},
          'AP_per_seed': [round(r['AP'], 2) for r in rs],
          'switches_per_seed': [round(r['switches'], 2) for r in rs],
          'IDF1_per_seed': [round(r['IDF1'], 2) for r in rs]}
      print(f'{kind:>9} {label:>19} {emb:>7} {name:>7} {mean["AP"]:6.2f} {mean["AP50"]:6.2f} '
            f'{mean["AR10"]:6.2f} {mean["switches"]:10.2f} {mean["IDF1"]:6.2f} '
            f'{mean["IDP"]:6.2f} {mean["IDR"]:6.2f}   '
            + ' '.join(f'{r["AP"]:.2f}' for r in rs))
  print(f'\nre-appearances on the occlusion split (after >= {MIN_GAP} frames, in another query)')
  print(f'{"checkpoint":>19} {"embed":>7} {"gaps":>5} {"own cos":>8} {"slot cos":>8} '
        f'{"own nearest %":>13}   by what the new query held before the gap')
  for (label, emb), rs in gaps.items():
    n = sum(r['gaps'] for r in rs)
    mean = lambda k: (sum(r[k] * r['gaps'] for r in rs if r['gaps']) / n) if n else float('nan')  # noqa: E731
    own, slot, nearest = mean('own_cos'), mean('slot_cos'), mean('own_nearest')
    # None, not NaN, when there is no gap (the RESULT line stays strict JSON).
    summary[f'reappear/{label}/{emb}'] = {'gaps': n, 'own_cos': round(own, 3) if n else None,
                                          'slot_cos': round(slot, 3) if n else None,
                                          'own_nearest': round(nearest, 1) if n else None}
    by_slot = {}
    for k in SLOT_HELD:
      count = sum(r['by_slot'][k][0] for r in rs)
      hits = sum(r['by_slot'][k][0] * r['by_slot'][k][1] / 100 for r in rs if r['by_slot'][k][0])
      by_slot[k] = [count, round(100 * hits / count, 1) if count else None]
    summary[f'reappear/{label}/{emb}']['by_slot'] = by_slot
    print(f'{label:>19} {emb:>7} {n:5d} {own:8.3f} {slot:8.3f} {nearest:13.1f}   ' + '; '.join(
        f'{k}: {c} gaps, {"-" if v is None else f"{v:.1f}"} %' for k, (c, v) in by_slot.items()))
  if agreement:
    print('\nslot agreement of the training views (mean of the logged values): '
          + ', '.join(f'{k} {v:.3f}' if v is not None else f'{k} -' for k, v in agreement.items()))
    summary['slot_agreement'] = {k: None if v is None else round(v, 3)
                                 for k, v in agreement.items()}
  return summary


if __name__ == '__main__':
  sys.exit(main())
