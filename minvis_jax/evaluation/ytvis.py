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
  """A per-frame segmentation (RLE dict or polygons, not None) -> an RLE dict pycocotools reads."""
  if isinstance(seg, dict):
    size, counts = seg.get('size'), seg.get('counts')
    if size is None or counts is None:
      raise ValueError(f'{where}: a segmentation must be an RLE dict, polygons or null')
    if list(size) != [h, w]:
      raise ValueError(f'{where}: mask size {list(size)} != video size {[h, w]}')
    if isinstance(counts, list):
      return mask_utils.frPyObjects(seg, h, w)
    return seg  # compressed counts, str or bytes: pycocotools reads the dict as it is
  if isinstance(seg, list):  # polygons
    return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  raise ValueError(f'{where}: a segmentation must be an RLE dict, polygons or null')


def _add_frames(segs: list, h: int, w: int, where: str, rles: list, slots: list):
  """Appends a track's masks to the flat `rles`; per frame, its index there (-1: none) to slots."""
  for s in segs:
    if s is None:
      slots.append(-1)
    else:
      slots.append(len(rles))
      rles.append(_rle(s, h, w, where))


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


class _Tracks:
  """Tracks of one side (ground truth or results) as flat arrays; track i's frame t has the mask
  rles[slots[start[i] + t]] (slot -1: none)."""

  def __init__(self, video, cat, slots, lengths, num_videos: int):
    self.video = np.asarray(video, np.int64)    # [N] position of the video in gt['videos']
    self.cat = np.asarray(cat, np.int64)        # [N] index of the sorted category ids, -1: unknown
    self.slots = np.asarray(slots, np.int64)    # [sum of lengths]
    self.lengths = np.asarray(lengths, np.int64)  # [N] frames of each track's video
    self.start = np.cumsum(self.lengths) - self.lengths
    self.key = np.where(self.cat >= 0, self.cat * num_videos + self.video, -1)  # (video, category)

  def areas(self, frame_areas: np.ndarray):
    """-> total area over frames [N], mean over frames with a non-empty mask [N] (0: none)."""
    per_slot = frame_areas[self.slots]  # frame_areas[-1] is 0: no mask
    track = np.repeat(np.arange(len(self.lengths)), self.lengths)
    total = np.bincount(track, weights=per_slot, minlength=len(self.lengths))
    count = np.bincount(track, weights=per_slot > 0, minlength=len(self.lengths))
    return total, np.where(count > 0, total / np.maximum(count, 1), 0.0)

  def frames(self, tracks: np.ndarray, frame_base: np.ndarray):
    """(frame key, track, slot) of every frame with a mask of `tracks`, sorted by frame key; the key
    frame_base[video] + t numbers the frames of all videos."""
    lengths = self.lengths[tracks]
    track = np.repeat(tracks, lengths)
    t = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    slot = self.slots[self.start[track] + t]
    key = frame_base[self.video[track]] + t
    has = slot >= 0
    order = np.argsort(key[has], kind='stable')
    return key[has][order], track[has][order], slot[has][order]


def _rank_in_group(keys: list) -> tuple[np.ndarray, np.ndarray]:
  """np.lexsort(keys) order (the last key first), and each sorted element's position within its
  group of equal last key."""
  order = np.lexsort(keys)
  group = keys[-1][order]
  new = np.ones(len(order), bool)
  new[1:] = group[1:] != group[:-1]
  pos = np.arange(len(order))
  return order, pos - np.maximum.accumulate(np.where(new, pos, 0))


def _track_ious(dts: _Tracks, gts: _Tracks, d_sel, g_sel, rles, frame_areas, d_total, g_total,
                frame_base):
  """Track IoUs of the detections d_sel and ground truths g_sel of the same (video, category):
  -> (detection [E], ground truth [E], IoU [E]) for the pairs that overlap in some frame.

  One pycocotools IoU call per frame of a video; pixel intersections follow from IoU and areas
  (I = IoU * (a + b) / (1 + IoU), exact for integer counts), so masks are never decoded."""
  d_key, d_track, d_slot = dts.frames(d_sel, frame_base)
  g_key, g_track, g_slot = gts.frames(g_sel, frame_base)
  common = np.intersect1d(d_key, g_key)
  d0, d1 = np.searchsorted(d_key, common, 'left'), np.searchsorted(d_key, common, 'right')
  g0, g1 = np.searchsorted(g_key, common, 'left'), np.searchsorted(g_key, common, 'right')
  d_rles = [rles[i] for i in d_slot.tolist()]
  g_rles = [rles[i] for i in g_slot.tolist()]
  zeros = [0] * int((g1 - g0).max(initial=0))
  blocks = [mask_utils.iou(d_rles[a:b], g_rles[c:d], zeros[:d - c])
            for a, b, c, d in zip(d0.tolist(), d1.tolist(), g0.tolist(), g1.tolist())]
  if not blocks:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
  iou = np.concatenate([b.ravel() for b in blocks])  # per block [detections, ground truths]
  nd, ng = d1 - d0, g1 - g0
  sizes = nd * ng
  block = np.repeat(np.arange(len(common)), sizes)
  e = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
  de, ge = d0[block] + e // ng[block], g0[block] + e % ng[block]
  same = dts.key[d_track[de]] == gts.key[g_track[ge]]  # the call also paired other categories
  de, ge, iou = de[same], ge[same], iou[same]
  s = frame_areas[d_slot[de]] + frame_areas[g_slot[ge]]
  inter = np.round(iou * s / (1.0 + iou))
  pair = d_track[de] * len(gts.key) + g_track[ge]
  pairs, inverse = np.unique(pair, return_inverse=True)
  inter = np.bincount(inverse.ravel(), weights=inter, minlength=len(pairs))
  d, g = pairs // len(gts.key), pairs % len(gts.key)
  union = d_total[d] + g_total[g] - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    return d, g, np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _match(ious: np.ndarray, g_ignore: np.ndarray, crowd: np.ndarray):
  """COCO's greedy matching (evaluateImg) of many (video, category) pairs at once, for every IoU
  threshold and every ignore configuration (area range / occlusion subset).

  ious [P, D, G]: detections by decreasing score, -1 pads; g_ignore [S, P, G]; crowd [P, G]
  -> matched, matched to an ignored ground truth: [S, P, T, D].
  Each detection takes the best free ground truth with IoU >= threshold, preferring ones not
  ignored; ties go to the later one in annotation order, as in COCOeval's loop."""
  S, P, G = g_ignore.shape
  D, T = ious.shape[1], len(IOU_THRESHOLDS)
  thr = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
  taken = np.zeros((S, P, T, G), bool)
  matched = np.zeros((S, P, T, D), bool)
  to_ignored = np.zeros((S, P, T, D), bool)
  ignored = g_ignore[:, :, None, :]
  reusable = crowd[None, :, None, :]  # a crowd ground truth can match several detections
  column = np.arange(G)
  for d in range(D):
    row = ious[:, None, d, :]  # [P, 1, G]
    if not (row >= thr[0]).any():
      continue
    ok = (row >= thr) & ~taken
    ok_kept = ok & ~ignored
    cand = np.where(ok_kept.any(-1, keepdims=True), ok_kept, ok)
    hit = cand.any(-1)
    best = G - 1 - np.where(cand, row, -1.0)[..., ::-1].argmax(-1)
    pick = (column == best[..., None]) & hit[..., None]
    matched[..., d] = hit
    to_ignored[..., d] = (pick & ignored).any(-1)
    taken |= pick & ~reusable
  return matched, to_ignored


def _precision(tp_hits: np.ndarray, fp_hits: np.ndarray, npig: np.ndarray) -> np.ndarray:
  """COCO accumulate for one category: detections [N] sorted by score, per configuration S and
  threshold T; tp_hits, fp_hits [N, S, T]; npig [S] (> 0) -> interpolated precision [S, T, R]."""
  n, S, T = tp_hits.shape
  R = len(RECALL_THRESHOLDS)
  if n == 0:
    return np.zeros((S, T, R))
  tp_count = np.cumsum(tp_hits, axis=0)
  tp = tp_count.astype(float)
  fp = np.cumsum(fp_hits, axis=0).astype(float)
  pr = tp / (fp + tp + np.spacing(1))
  pr = np.maximum.accumulate(pr[::-1], axis=0)[::-1].reshape(n, S * T).T  # [S*T, N]
  # COCO searches recall tp / npig for each recall threshold; tp is an integer count, so search the
  # smallest count q with q / npig >= threshold instead (the same floats), in every row at once.
  q = np.stack([np.searchsorted(np.arange(k + 1) / k, RECALL_THRESHOLDS, side='left')
                for k in npig.tolist()])
  q = np.repeat(np.minimum(q, n + 1), T, axis=0)  # [S*T, R]
  rows = np.arange(S * T)[:, None]
  counts = tp_count.reshape(n, S * T).T + rows * (n + 1)  # rows on disjoint increasing ranges
  idx = np.searchsorted(counts.ravel(), (q + rows * (n + 1)).ravel(), side='left').reshape(q.shape)
  idx -= rows * n
  valid = idx < n
  out = np.where(valid, np.take_along_axis(pr, np.minimum(idx, n - 1), axis=1), 0.0)
  return out.reshape(S, T, R)


def evaluate_dicts(gt: dict, results: list, *, gt_name: str = 'ground truth',
                   results_name: str = 'results') -> dict[str, float]:
  """The metric from loaded JSON: gt (YouTube-VIS dict), results (list of tracks)."""
  videos = {v['id']: v for v in gt['videos']}
  video_pos = {vid: i for i, vid in enumerate(videos)}
  cat_ids = sorted(c['id'] for c in gt['categories'])
  cat_pos = {c: k for k, c in enumerate(cat_ids)}
  V, K = len(videos), len(cat_ids)
  # OVIS ground truth carries per-frame occlusion levels; then every annotation must have them.
  with_occ = sum('occlusion' in a for a in gt['annotations'])
  has_occ = with_occ > 0
  if has_occ and with_occ < len(gt['annotations']):
    missing = next(a for a in gt['annotations'] if 'occlusion' not in a)
    raise ValueError(f'{gt_name}: annotation {missing.get("id")} has no "occlusion" levels but '
                     f'{with_occ} other annotations do')

  rles = []  # every non-empty frame segmentation of both sides, as pycocotools RLEs
  g_video, g_cat, g_slots, g_len, g_json_area, g_crowd, g_occ = [], [], [], [], [], [], []
  for a in gt['annotations']:
    v = videos.get(a['video_id'])
    if v is None:
      raise ValueError(f'{gt_name}: annotation {a.get("id")} names unknown video {a["video_id"]}')
    where = f'{gt_name}: video {v["id"]} annotation {a.get("id")}'
    segs = a['segmentations']
    if len(segs) != v['length']:
      raise ValueError(f'{where}: {len(segs)} frame segmentations for a video of '
                       f'{v["length"]} frames')
    _add_frames(segs, v['height'], v['width'], where, rles, g_slots)
    areas = a.get('areas')
    vals = [x for x in areas if x] if areas else []
    # Mean of the JSON's non-empty areas; without them (NaN here), of the masks'.
    g_json_area.append(math.fsum(vals) / len(vals) if vals else 0.0 if areas else math.nan)
    g_occ.append(occlusion_score(a['occlusion'], where) if has_occ else 0.0)
    g_video.append(video_pos[v['id']])
    g_cat.append(cat_pos.get(a['category_id'], -1))
    g_len.append(len(segs))
    g_crowd.append(bool(a.get('iscrowd', 0)))
  d_video, d_cat, d_slots, d_len, d_score = [], [], [], [], []
  for i, r in enumerate(results):
    v = videos.get(r.get('video_id'))
    if v is None:
      raise ValueError(f'{results_name}: result {i} is for video {r.get("video_id")!r}, '
                       f'which the ground truth does not have')
    segs = r.get('segmentations') or []
    if len(segs) != v['length']:
      raise ValueError(f'{results_name}: result {i} (video {v["id"]}): {len(segs)} frame '
                       f'segmentations for a video of {v["length"]} frames')
    _add_frames(segs, v['height'], v['width'], f'{results_name}: result {i} (video {v["id"]})',
                rles, d_slots)
    d_video.append(video_pos[v['id']])
    d_cat.append(cat_pos.get(r['category_id'], -1))
    d_len.append(len(segs))
    d_score.append(float(r['score']))

  gts = _Tracks(g_video, g_cat, g_slots, g_len, V)
  dts = _Tracks(d_video, d_cat, d_slots, d_len, V)
  d_score = np.asarray(d_score, float)
  g_crowd = np.asarray(g_crowd, bool)
  g_occ = np.asarray(g_occ, float)
  # Index -1 (no mask) reads the appended 0. pycocotools' area() fails on lists of more than 255
  # (a uint8 length array under numpy 2), hence the chunks.
  frame_areas = np.concatenate([np.asarray(mask_utils.area(rles[i:i + 255]), float)
                                for i in range(0, len(rles), 255)] + [np.zeros(1)])
  g_total, g_mask_area = gts.areas(frame_areas)
  d_total, d_area = dts.areas(frame_areas)
  g_json_area = np.asarray(g_json_area, float)
  g_area = np.where(np.isnan(g_json_area), g_mask_area, g_json_area)

  # Each (video, category) keeps its MAX_DETS[-1] best detections (stable: ties keep file order).
  nD, nG = len(d_score), len(g_crowd)
  index = np.arange(nD)
  known = np.flatnonzero(dts.cat >= 0)
  order, rank_sorted = _rank_in_group([index[known], -d_score[known], dts.key[known]])
  rank = np.full(nD, MAX_DETS[-1], np.int64)
  rank[known[order]] = rank_sorted
  kept = rank < MAX_DETS[-1]
  g_known = np.flatnonzero(gts.cat >= 0)
  g_order, g_rank_sorted = _rank_in_group([g_known, gts.key[g_known]])
  g_local = np.zeros(nG, np.int64)  # position within its (video, category), annotation order
  g_local[g_known[g_order]] = g_rank_sorted

  # Ignore configurations S: the area ranges, then (OVIS) the occlusion subsets over all areas.
  def inside(x, rng):
    return (rng[0] <= x) & (x <= rng[1])
  ranges = list(AREA_RANGES) + [AREA_RANGES[0]] * (len(OCCLUSION_RANGES) if has_occ else 0)
  d_out = np.stack([~inside(d_area, rng) for rng in ranges], 1)  # [nD, S]
  g_ignore = np.stack([g_crowd | ~inside(g_area, rng) for rng in AREA_RANGES]
                      + [g_crowd | ~inside(g_area, AREA_RANGES[0]) | ~inside(g_occ, rng)
                         for _, rng in (OCCLUSION_RANGES if has_occ else ())])  # [S, nG]
  S, T = len(ranges), len(IOU_THRESHOLDS)

  # Matching, batched over the (video, category) pairs that have both sides.
  matched = np.zeros((nD, S, T), bool)
  to_ignored = np.zeros((nD, S, T), bool)
  pair_keys = np.intersect1d(dts.key[kept], gts.key[g_known])
  if len(pair_keys):
    d_pair = np.searchsorted(pair_keys, dts.key)
    d_sel = np.flatnonzero(kept & (pair_keys[np.minimum(d_pair, len(pair_keys) - 1)] == dts.key))
    g_pair = np.searchsorted(pair_keys, gts.key)
    g_sel = np.flatnonzero((gts.cat >= 0)
                           & (pair_keys[np.minimum(g_pair, len(pair_keys) - 1)] == gts.key))
    frame_base = np.r_[0, np.cumsum([videos[vid]['length'] for vid in videos])]
    e_d, e_g, e_iou = _track_ious(dts, gts, d_sel, g_sel, rles, frame_areas, d_total, g_total,
                                  frame_base)
    num_d = np.bincount(d_pair[d_sel], minlength=len(pair_keys))
    num_g = np.bincount(g_pair[g_sel], minlength=len(pair_keys))
    # Pairs padded to powers of two, so one large pair does not pad all the others.
    pad_d = 2 ** np.ceil(np.log2(num_d)).astype(np.int64)
    pad_g = 2 ** np.ceil(np.log2(num_g)).astype(np.int64)
    buckets, bucket = np.unique(np.stack([pad_d, pad_g], 1), axis=0, return_inverse=True)
    bucket = bucket.ravel()
    slot_in_bucket = np.zeros(len(pair_keys), np.int64)
    for b, (Db, Gb) in enumerate(buckets.tolist()):
      pairs = np.flatnonzero(bucket == b)
      slot_in_bucket[pairs] = np.arange(len(pairs))
      valid = ((np.arange(Db) < num_d[pairs, None])[:, :, None]
               & (np.arange(Gb) < num_g[pairs, None])[:, None, :])
      ious = np.where(valid, 0.0, -1.0)
      e = bucket[d_pair[e_d]] == b
      ious[slot_in_bucket[d_pair[e_d[e]]], rank[e_d[e]], g_local[e_g[e]]] = e_iou[e]
      gb = g_sel[bucket[g_pair[g_sel]] == b]
      gid = np.full((len(pairs), Gb), -1)
      gid[slot_in_bucket[g_pair[gb]], g_local[gb]] = gb
      m, mi = _match(ious, np.where(gid >= 0, g_ignore[:, gid], True),
                     np.where(gid >= 0, g_crowd[gid], False))
      db = d_sel[bucket[d_pair[d_sel]] == b]
      at = (slot_in_bucket[d_pair[db]], rank[db])
      matched[db] = m.transpose(1, 3, 0, 2)[at]
      to_ignored[db] = mi.transpose(1, 3, 0, 2)[at]
  ignored = to_ignored | (~matched & d_out[:, :, None])
  tp_hits = matched & ~ignored
  fp_hits = ~matched & ~ignored

  # Accumulation per category over detections sorted by score (stable over the per-video lists,
  # concatenated in video order, as COCOeval).
  R = len(RECALL_THRESHOLDS)
  precision = -np.ones((T, R, K, S))
  recall = -np.ones((T, K, len(MAX_DETS) - 1))  # all areas, the smaller maxDets (AR1, AR10)
  d_kept = np.flatnonzero(kept)
  acc = d_kept[np.lexsort((d_kept, dts.video[d_kept], -d_score[d_kept], dts.cat[d_kept]))]
  bounds = np.searchsorted(dts.cat[acc], np.arange(K + 1))
  npig = np.stack([np.bincount(gts.cat[g_known], weights=~g_ignore[s, g_known], minlength=K)
                   for s in range(S)]).astype(np.int64)  # [S, K]
  for k in range(K):
    has_gt = npig[:, k] > 0
    if not has_gt.any():
      continue
    sel = acc[bounds[k]:bounds[k + 1]]
    p = _precision(tp_hits[sel][:, has_gt], fp_hits[sel][:, has_gt], npig[has_gt, k])
    precision[:, :, k, has_gt] = p.transpose(1, 2, 0)
    if has_gt[0]:
      for j, max_det in enumerate(MAX_DETS[:-1]):
        recall[:, k, j] = tp_hits[sel[rank[sel] < max_det], 0].sum(0) / npig[0, k]

  def mean(x):
    x = x[x > -1]
    return float(np.mean(x)) if x.size else -1.0

  t50, t75 = 0, 5
  occ = {name: mean(precision[..., len(AREA_RANGES) + o])
         for o, (name, _) in enumerate(OCCLUSION_RANGES)} if has_occ else {}
  return {
      'AP': mean(precision[:, :, :, 0]),
      'AP50': mean(precision[t50, :, :, 0]),
      'AP75': mean(precision[t75, :, :, 0]),
      'APs': mean(precision[:, :, :, 1]),
      'APm': mean(precision[:, :, :, 2]),
      'APl': mean(precision[:, :, :, 3]),
      'AR1': mean(recall[:, :, 0]),
      'AR10': mean(recall[:, :, 1]),
      **occ,
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
