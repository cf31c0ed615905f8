"""The YouTube-VIS / OVIS video instance segmentation metric (SPEC 5), checked against pycocotools.

Track IoU = sum over frames of intersection / sum over frames of union; then COCO accumulation
(IoU 0.50:0.05:0.95, 101 recall points, maxDets 1/10/100) with YouTube-VIS's area ranges.
With OVIS ground truth (per-frame `occlusion` levels), also AP on the occlusion subsets.
"""

import json
import math
import os
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
# all, small, medium, large: YouTube-VIS ranges over the mean non-empty area of a track.
AREA_RANGES = ((0, 1e10), (0, 128 ** 2), (128 ** 2, 256 ** 2), (256 ** 2, 1e10))
# OVIS (SPEC 7): per-frame occlusion levels of a ground-truth track as the OVIS annotations spell
# them; a track's occlusion score is the mean level over its most occluded half of annotated frames.
OCCLUSION_LEVELS = {'no_occlusion': 0.0, 'slight_occlusion': 0.25, 'severe_occlusion': 0.75}
# Subsets by occlusion score, both ends inclusive as in the OVIS evaluator (which labels them
# light / medium / heavy; the OVIS paper reports them as AP_so / AP_mo / AP_ho). Detections are not
# filtered: a detection is ignored in a subset only when it matches a ground truth outside it.
OCCLUSION_RANGES = (('AP_slight', (0.0, 0.25)), ('AP_moderate', (0.25, 0.5)),
                    ('AP_heavy', (0.5, 1.0)))


def _load_json(path: str, what: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such {what} file')
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a JSON {what} file ({e})') from None


def _rle(seg, h: int, w: int, where: str):
  """A per-frame segmentation (RLE dict, polygons or None) -> compressed RLE or None."""
  if seg is None:
    return None
  if isinstance(seg, list):  # polygons
    return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  if not isinstance(seg, dict) or 'counts' not in seg or 'size' not in seg:
    raise ValueError(f'{where}: a segmentation must be an RLE dict, polygons or null')
  if list(seg['size']) != [h, w]:
    raise ValueError(f'{where}: mask size {list(seg["size"])} != video size {[h, w]}')
  if isinstance(seg['counts'], list):
    return mask_utils.frPyObjects(seg, h, w)
  counts = seg['counts']
  return {'size': [h, w], 'counts': counts.encode() if isinstance(counts, str) else counts}


def _mean_area(areas) -> float:
  vals = [a for a in areas if a]
  return float(np.mean(vals)) if vals else 0.0


def occlusion_score(levels: list, where: str) -> float:
  """OVIS occlusion score of a ground-truth track: per-frame levels (strings of OCCLUSION_LEVELS or
  None where not annotated) -> mean of the ceil(n/2) largest of its n annotated levels."""
  if not isinstance(levels, list):
    raise ValueError(f'{where}: "occlusion" must be a list of per-frame levels')
  values = []
  for t, level in enumerate(levels):
    if level is None:
      continue
    if level not in OCCLUSION_LEVELS:
      raise ValueError(f'{where}: unknown occlusion level {level!r} at frame {t}; expected one of '
                       f'{sorted(OCCLUSION_LEVELS)} or null')
    values.append(OCCLUSION_LEVELS[level])
  if not values:
    raise ValueError(f'{where}: "occlusion" has no level on any frame')
  top = sorted(values)[-math.ceil(len(values) / 2):]
  return sum(top) / len(top)


def _track_ious(dts: list, gts: list, length: int) -> np.ndarray:
  """[D, G] sum over frames of intersection / sum of union."""
  inter = np.zeros((len(dts), len(gts)))
  union = np.zeros((len(dts), len(gts)))
  for t in range(length):
    d_rles = [d['rles'][t] for d in dts]
    g_rles = [g['rles'][t] for g in gts]
    d_area = np.array([0.0 if r is None else float(mask_utils.area(r)) for r in d_rles])
    g_area = np.array([0.0 if r is None else float(mask_utils.area(r)) for r in g_rles])
    di = [i for i, r in enumerate(d_rles) if r is not None]
    gi = [j for j, r in enumerate(g_rles) if r is not None]
    both = np.zeros((len(dts), len(gts)))
    if di and gi:
      iou = np.asarray(mask_utils.iou([d_rles[i] for i in di], [g_rles[j] for j in gi],
                                      [0] * len(gi))).reshape(len(di), len(gi))
      s = d_area[di][:, None] + g_area[gi][None, :]
      both[np.ix_(di, gi)] = np.round(iou * s / (1.0 + iou))  # intersections are integers
    inter += both
    union += d_area[:, None] + g_area[None, :] - both
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _evaluate_pair(dts, gts, ious, area_rng, max_det, occ_rng=None):
  """COCO evaluateImg for one (video, category, area range[, OVIS occlusion range])."""
  g_ignore = np.array([g['iscrowd'] or not (area_rng[0] <= g['area'] <= area_rng[1])
                       or (occ_rng is not None and not occ_rng[0] <= g['occ'] <= occ_rng[1])
                       for g in gts], bool)
  g_order = np.argsort(g_ignore, kind='mergesort')
  g_ignore = g_ignore[g_order]
  crowd = np.array([gts[i]['iscrowd'] for i in g_order], bool)
  dts = dts[:max_det]
  ious = ious[:len(dts)][:, g_order] if len(gts) else ious[:len(dts)]
  T, D, G = len(IOU_THRESHOLDS), len(dts), len(gts)
  dt_matched = np.zeros((T, D), bool)
  dt_ignore = np.zeros((T, D), bool)
  if D and G:
    # Plain Python lists: this greedy loop is the evaluator's hot spot.
    iou_rows, ig, cr = ious.tolist(), g_ignore.tolist(), crowd.tolist()
    for ti, thr in enumerate(IOU_THRESHOLDS.tolist()):
      taken = [False] * G
      for di in range(D):
        row = iou_rows[di]
        best, m = min(thr, 1 - 1e-10), -1
        for gi in range(G):
          if taken[gi] and not cr[gi]:
            continue
          if m > -1 and not ig[m] and ig[gi]:
            break
          if row[gi] < best:
            continue
          best, m = row[gi], gi
        if m == -1:
          continue
        dt_ignore[ti, di] = ig[m]
        dt_matched[ti, di] = True
        taken[m] = True
  d_out = np.array([not (area_rng[0] <= d['area'] <= area_rng[1]) for d in dts], bool)
  dt_ignore |= ~dt_matched & d_out[None, :]
  return dict(scores=np.array([d['score'] for d in dts]), matched=dt_matched,
              dt_ignore=dt_ignore, gt_ignore=g_ignore)


def _accumulate(per_pair: list[dict], max_det: int):
  """precision [T, R], recall [T] over the (video) evaluations of one category/area, keeping each
  video's `max_det` best detections (matching itself ran once, with the largest maxDet)."""
  T, R = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
  scores = np.concatenate([e['scores'][:max_det] for e in per_pair])
  order = np.argsort(-scores, kind='mergesort')
  matched = np.concatenate([e['matched'][:, :max_det] for e in per_pair], axis=1)[:, order]
  ignore = np.concatenate([e['dt_ignore'][:, :max_det] for e in per_pair], axis=1)[:, order]
  npig = int(np.count_nonzero(~np.concatenate([e['gt_ignore'] for e in per_pair])))
  if npig == 0:
    return None, None
  tp = np.cumsum(matched & ~ignore, axis=1).astype(float)
  fp = np.cumsum(~matched & ~ignore, axis=1).astype(float)
  precision = np.zeros((T, R))
  recall = np.zeros(T)
  for t in range(T):
    nd = tp.shape[1]
    rc = tp[t] / npig
    pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
    recall[t] = rc[-1] if nd else 0.0
    pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr
    idx = np.searchsorted(rc, RECALL_THRESHOLDS, side='left')
    valid = idx < nd
    precision[t, valid] = pr[idx[valid]]
  return precision, recall


def evaluate_dicts(gt: dict, results: list, *, gt_name: str = 'ground truth',
                   results_name: str = 'results') -> dict[str, float]:
  """The metric from loaded JSON: gt (YouTube-VIS dict), results (list of tracks)."""
  videos = {v['id']: v for v in gt['videos']}
  cat_ids = sorted(c['id'] for c in gt['categories'])
  # OVIS ground truth carries per-frame occlusion levels; then every annotation must have them.
  with_occ = sum('occlusion' in a for a in gt['annotations'])
  has_occ = with_occ > 0
  if has_occ and with_occ < len(gt['annotations']):
    missing = next(a for a in gt['annotations'] if 'occlusion' not in a)
    raise ValueError(f'{gt_name}: annotation {missing.get("id")} has no "occlusion" levels but '
                     f'{with_occ} other annotations do')
  gts: dict[tuple, list] = {}
  for a in gt['annotations']:
    v = videos.get(a['video_id'])
    if v is None:
      raise ValueError(f'{gt_name}: annotation {a.get("id")} names unknown video {a["video_id"]}')
    where = f'{gt_name}: video {v["id"]} annotation {a.get("id")}'
    rles = [_rle(s, v['height'], v['width'], where) for s in a['segmentations']]
    areas = a.get('areas') or [None if r is None else float(mask_utils.area(r)) for r in rles]
    occ = occlusion_score(a['occlusion'], where) if has_occ else None
    gts.setdefault((v['id'], a['category_id']), []).append(dict(
        rles=rles, area=_mean_area(areas), iscrowd=bool(a.get('iscrowd', 0)), occ=occ))
  dts: dict[tuple, list] = {}
  for i, r in enumerate(results):
    v = videos.get(r.get('video_id'))
    if v is None:
      raise ValueError(f'{results_name}: result {i} is for video {r.get("video_id")!r}, '
                       f'which the ground truth does not have')
    where = f'{results_name}: result {i} (video {v["id"]})'
    segs = r.get('segmentations') or []
    if len(segs) != v['length']:
      raise ValueError(f'{where}: {len(segs)} frame segmentations for a video of '
                       f'{v["length"]} frames')
    rles = [_rle(s, v['height'], v['width'], where) for s in segs]
    areas = [None if x is None else float(mask_utils.area(x)) for x in rles]
    dts.setdefault((v['id'], r['category_id']), []).append(dict(
        rles=rles, area=_mean_area(areas), score=float(r['score'])))

  T, R, K, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(cat_ids), len(AREA_RANGES), len(
      MAX_DETS)
  precision = -np.ones((T, R, K, A, M))
  recall = -np.ones((T, K, A, M))
  occ_precision = -np.ones((T, R, K, len(OCCLUSION_RANGES)))  # all areas, maxDets 100
  for k, cat in enumerate(cat_ids):
    pairs = []
    for vid in videos:
      g = gts.get((vid, cat), [])
      d = dts.get((vid, cat), [])
      if not g and not d:
        continue
      order = np.argsort([-x['score'] for x in d], kind='mergesort')
      d = [d[i] for i in order][:MAX_DETS[-1]]
      ious = _track_ious(d, g, videos[vid]['length']) if d and g else np.zeros((len(d), len(g)))
      pairs.append((d, g, ious))
    if not pairs:
      continue
    for a, rng in enumerate(AREA_RANGES):
      evals = [_evaluate_pair(d, g, ious, rng, MAX_DETS[-1]) for d, g, ious in pairs]
      for m, max_det in enumerate(MAX_DETS):
        p, r = _accumulate(evals, max_det)
        if p is not None:
          precision[:, :, k, a, m] = p
          recall[:, k, a, m] = r
    for o, (_, rng) in enumerate(OCCLUSION_RANGES if has_occ else ()):
      evals = [_evaluate_pair(d, g, ious, AREA_RANGES[0], MAX_DETS[-1], rng)
               for d, g, ious in pairs]
      p, _ = _accumulate(evals, MAX_DETS[-1])
      if p is not None:
        occ_precision[:, :, k, o] = p

  def mean(x):
    x = x[x > -1]
    return float(np.mean(x)) if x.size else -1.0

  t50, t75 = 0, 5
  occ = {name: mean(occ_precision[..., o]) for o, (name, _) in enumerate(OCCLUSION_RANGES)}
  return {
      'AP': mean(precision[:, :, :, 0, 2]),
      'AP50': mean(precision[t50, :, :, 0, 2]),
      'AP75': mean(precision[t75, :, :, 0, 2]),
      'APs': mean(precision[:, :, :, 1, 2]),
      'APm': mean(precision[:, :, :, 2, 2]),
      'APl': mean(precision[:, :, :, 3, 2]),
      'AR1': mean(recall[:, :, 0, 0]),
      'AR10': mean(recall[:, :, 0, 1]),
      **(occ if has_occ else {}),
  }


def evaluate(gt_json_path: str, results_json_path: str) -> dict[str, float]:
  """AP, AP50, AP75, APs, APm, APl, AR1, AR10 of a results file against YouTube-VIS ground truth,
  plus AP_slight, AP_moderate, AP_heavy when it is OVIS ground truth with occlusion levels.

  Values are in [0, 1]; -1 where undefined (no ground truth in that range), as in COCOeval.
  """
  gt = _load_json(gt_json_path, 'ground-truth')
  results = _load_json(results_json_path, 'results')
  if not isinstance(gt, dict) or not {'videos', 'annotations', 'categories'} <= set(gt):
    raise ValueError(f'{gt_json_path}: expected a YouTube-VIS JSON with videos, annotations, '
                     f'categories')
  if not isinstance(results, list):
    raise ValueError(f'{results_json_path}: expected a JSON list of tracks')
  return evaluate_dicts(gt, results, gt_name=gt_json_path, results_name=results_json_path)


def format_table(metrics: dict[str, Any]) -> str:
  """Two lines: metric names and values in percent ('-' where undefined)."""
  keys = [k for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10')
          + tuple(name for name, _ in OCCLUSION_RANGES) if k in metrics]
  widths = [max(6, len(k)) for k in keys]
  return ('  '.join(f'{k:>{w}}' for k, w in zip(keys, widths)) + '\n'
          + '  '.join(f'{100 * metrics[k]:{w}.2f}' if metrics[k] >= 0 else f'{"-":>{w}}'
                      for k, w in zip(keys, widths)))
