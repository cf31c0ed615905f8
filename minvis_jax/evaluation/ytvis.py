"""The YouTube-VIS / OVIS video instance segmentation metric (SPEC 5), checked against pycocotools.

Track IoU = sum over frames of intersection / sum over frames of union; then COCO accumulation
(IoU 0.50:0.05:0.95, 101 recall points, maxDets 1/10/100) with YouTube-VIS's area ranges.
With OVIS ground truth (per-frame `occlusion` levels), also AP on the occlusion subsets.
"""

import json
import math
import os
import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from minvis_jax.data import ytvis as ytvis_data

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


def _where_list(items: list, limit: int = 20) -> str:
  items = sorted(set(items))
  return ', '.join(map(repr, items[:limit])) + (', ...' if len(items) > limit else '')


class _Masks:
  """Every non-empty frame segmentation of both sides as a pycocotools RLE (a flat list), checked
  against its frame before pycocotools sees it: pycocotools' IoU never returns on an RLE whose
  counts do not add up to its size."""

  def __init__(self):
    self.rles = []
    self._pixels = []  # [len(rles)] h * w of each mask's frame
    self._checked = 0  # rles[:_checked] are checked

  def add_track(self, segs: list, h: int, w: int, where, slots: list) -> None:
    """Appends a track's masks; per frame, its index in `rles` (-1: none) to slots; where(t) names
    frame t in errors."""
    hw, pixels = [h, w], h * w
    for t, s in enumerate(segs):
      if s is None:
        slots.append(-1)
        continue
      slots.append(len(self.rles))
      self._pixels.append(pixels)
      # The common case in few Python operations: compressed counts (checked in `check`) and the
      # frame's size as two ints.
      if type(s) is dict:
        size, counts = s.get('size'), s.get('counts')
        if (type(counts) is str and size == hw and type(size) is list and type(size[0]) is int
            and type(size[1]) is int):
          self.rles.append(s)
          continue
      self.rles.append(self._other(s, h, w, where(t)))

  def _other(self, seg, h: int, w: int, where: str) -> dict:
    if isinstance(seg, dict):
      if 'size' not in seg or 'counts' not in seg:
        raise ValueError(f'{where}: an RLE needs "size" and "counts", got keys {sorted(seg)}')
      ytvis_data.check_rle_size(seg['size'], h, w, where)
      counts = seg['counts']
      if isinstance(counts, list):
        return ytvis_data.uncompressed_rle(seg, h, w, where)
      if not isinstance(counts, (str, bytes)):
        raise ValueError(f'{where}: RLE "counts" must be a string or a list of run lengths, got '
                         f'{type(counts).__name__}')
      return {'size': [h, w], 'counts': counts}
    if isinstance(seg, list) and seg:  # polygons
      ytvis_data.check_polygons(seg, h, w, where)
      short = next((p for p in seg if len(p) < 6 or len(p) % 2), None)
      if short is not None:
        raise ValueError(f'{where}: a polygon needs at least 3 (x, y) points, got {len(short)} '
                         f'coordinates')
      return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    raise ValueError(f'{where}: a frame segmentation must be an RLE object, polygons or null, got '
                     f'{str(seg)[:80]}')

  def check(self, where) -> None:
    """Checks the counts of the masks added since the last check; where(i) names rles[i]. (Those
    made here from polygons or run-length lists are checked again: few, and valid.)"""
    new = self.rles[self._checked:]
    bad = np.flatnonzero(ytvis_data.bad_compressed_counts(
        [r['counts'] for r in new], np.asarray(self._pixels[self._checked:], np.int64)))
    if len(bad):
      i = self._checked + int(bad[0])
      problem = ytvis_data.compressed_counts_problem(self.rles[i]['counts'], self._pixels[i])
      raise ValueError(f'{where(i)}: malformed RLE: {problem}')
    self._checked = len(self.rles)


def _locate(slots: list, lengths: list, rle: int, where) -> tuple[str, int]:
  """(where(track), frame) of the track and frame whose mask is rles[rle]."""
  pos = slots.index(rle)
  track = int(np.searchsorted(np.cumsum(lengths), pos, 'right'))
  return where(track), pos - int(np.sum(lengths[:track]))


def _int(x) -> bool:
  return type(x) is int or ytvis_data.is_int(x)


def _field(record, key: str, where: str):
  if key not in record:
    raise ValueError(f'{where}: missing field {key!r}')
  return record[key]


def _ground_truth_videos(gt: dict, gt_name: str) -> dict:
  """video id -> (height, width, length) of the ground truth, checked."""
  raw = _field(gt, 'videos', gt_name)
  if not isinstance(raw, list):
    raise ValueError(f'{gt_name}: "videos" must be a list, got {type(raw).__name__}')
  videos = {}
  for j, v in enumerate(raw):
    where = f'{gt_name}: videos[{j}]'
    if not isinstance(v, dict):
      raise ValueError(f'{where}: expected an object, got {type(v).__name__}')
    vid = _field(v, 'id', where)
    if not _int(vid):
      raise ValueError(f'{where}: "id" must be an integer, got {vid!r}')
    if vid in videos:
      raise ValueError(f'{where}: duplicate video id {vid}')
    where = f'{gt_name}: videos[{j}] (id {vid})'
    size = []
    for key in ('height', 'width'):
      x = _field(v, key, where)
      if not _int(x) or x < 1:
        raise ValueError(f'{where}: {key!r} must be a positive integer, got {x!r}')
      size.append(int(x))
    ytvis_data.check_frame_pixels(*size, where)
    files = v.get('file_names')
    if files is not None and not isinstance(files, list):
      raise ValueError(f'{where}: "file_names" must be a list, got {type(files).__name__}')
    length = v.get('length')
    if length is None:  # YouTube-VIS files have it; the frames listed say the same
      if files is None:
        raise ValueError(f'{where}: missing field "length" (and no "file_names" to count)')
      length = len(files)
    elif not _int(length):
      raise ValueError(f'{where}: "length" must be an integer, got {length!r}')
    elif files is not None and len(files) != length:
      raise ValueError(f'{where}: "length" is {length} but "file_names" lists {len(files)} '
                       f'frames')
    if length < 1:
      raise ValueError(f'{where}: a video needs at least one frame, "length" is {length}')
    videos[vid] = (*size, int(length))
  return videos


def _category_ids(gt: dict, gt_name: str) -> list:
  raw = _field(gt, 'categories', gt_name)
  if not isinstance(raw, list):
    raise ValueError(f'{gt_name}: "categories" must be a list, got {type(raw).__name__}')
  ids = []
  for j, c in enumerate(raw):
    where = f'{gt_name}: categories[{j}]'
    if not isinstance(c, dict):
      raise ValueError(f'{where}: expected an object, got {type(c).__name__}')
    cid = _field(c, 'id', where)
    if not _int(cid):
      raise ValueError(f'{where}: "id" must be an integer, got {cid!r}')
    if cid in ids:
      raise ValueError(f'{where}: duplicate category id {cid}')
    ids.append(int(cid))
  return sorted(ids)


def _json_areas(areas, length: int, where) -> float:
  """Mean of the non-empty per-frame `areas` of a ground-truth track; NaN without them (the masks'
  areas are used then); 0 when none is positive. where() names the track in errors."""
  if areas is None:
    return math.nan
  if not isinstance(areas, list) or len(areas) != length:
    n = len(areas) if isinstance(areas, list) else type(areas).__name__
    raise ValueError(f'{where()}: "areas" must be a list of {length} per-frame areas or nulls, '
                     f'got {n}')
  vals = []
  for t, x in enumerate(areas):
    if x is None:
      continue
    if not (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and x >= 0):
      raise ValueError(f'{where()}: "areas" of frame {t} must be a non-negative number or null, '
                       f'got {x!r}')
    if x:
      vals.append(x)
  return math.fsum(vals) / len(vals) if vals else 0.0


def _score(score, where: str) -> float:
  if (not isinstance(score, (int, float, np.integer, np.floating))
      or isinstance(score, (bool, np.bool_))):
    raise ValueError(f'{where}: "score" must be a number, got {score!r}')
  if not math.isfinite(score):
    raise ValueError(f'{where}: "score" must be finite, got {score!r}')
  return float(score)


def occlusion_score(levels: list, where: str) -> float:
  """OVIS occlusion score of a ground-truth track: per-frame levels (strings of OCCLUSION_LEVELS or
  None where not annotated) -> mean of the ceil(n/2) largest of its n annotated levels."""
  if not isinstance(levels, list):
    raise ValueError(f'{where}: "occlusion" must be a list of per-frame levels')
  values = []
  for t, level in enumerate(levels):
    if level is None:
      continue
    if not isinstance(level, str) or level not in OCCLUSION_LEVELS:
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
  """The metric from loaded JSON: gt (YouTube-VIS dict), results (list of tracks).

  Every field read is checked first, every mask against its frame included (pycocotools never
  returns on an RLE whose runs miss the frame size): ValueError names the file (gt_name,
  results_name), the record and the field. Results or annotations whose category is not in the
  ground truth's categories are not scored (as the official evaluation) and warned about once.
  """
  if not isinstance(gt, dict):
    raise ValueError(f'{gt_name}: expected a YouTube-VIS JSON object, got {type(gt).__name__}')
  if 'annotations' not in gt:
    raise ValueError(f'{gt_name}: no "annotations": a split without ground truth cannot be scored '
                     '(submit the results to its evaluation server)')
  if not isinstance(results, list):
    raise ValueError(f'{results_name}: expected a JSON list of tracks, got '
                     f'{type(results).__name__}')
  videos = _ground_truth_videos(gt, gt_name)  # id -> (height, width, length)
  video_pos = {vid: i for i, vid in enumerate(videos)}
  cat_ids = _category_ids(gt, gt_name)
  cat_pos = {c: k for k, c in enumerate(cat_ids)}
  V, K = len(videos), len(cat_ids)
  anns = gt['annotations']
  if not isinstance(anns, list):
    raise ValueError(f'{gt_name}: "annotations" must be a list, got {type(anns).__name__}')
  for j, a in enumerate(anns):
    if not isinstance(a, dict):
      raise ValueError(f'{gt_name}: annotations[{j}]: expected an object, got '
                       f'{type(a).__name__}')
  # OVIS ground truth carries per-frame occlusion levels; then every annotation must have them.
  with_occ = sum('occlusion' in a for a in anns)
  has_occ = with_occ > 0
  if has_occ and with_occ < len(anns):
    j = next(j for j, a in enumerate(anns) if 'occlusion' not in a)
    raise ValueError(f'{gt_name}: annotations[{j}] (id {anns[j].get("id")}) has no "occlusion" '
                     f'levels but {with_occ} other annotations do')

  masks = _Masks()
  g_video, g_cat, g_slots, g_len, g_json_area, g_crowd, g_occ = [], [], [], [], [], [], []
  unknown = []

  def gt_where(j):
    vid = anns[j].get('video_id')
    return (f'{gt_name}: annotations[{j}] (id {anns[j].get("id")})'
            + (f' of video {vid}' if _int(vid) and vid in videos else ''))
  for j, a in enumerate(anns):
    try:
      vid, cid, segs = a['video_id'], a['category_id'], a['segmentations']
    except KeyError as e:
      raise ValueError(f'{gt_where(j)}: missing field {e.args[0]!r}') from None
    if not _int(vid) or vid not in videos:
      raise ValueError(f'{gt_where(j)}: "video_id" {vid!r} is not a video of "videos"')
    h, w, length = videos[vid]
    if not _int(cid):
      raise ValueError(f'{gt_where(j)}: "category_id" must be an integer, got {cid!r}')
    if cid not in cat_pos:
      unknown.append(cid)
    if not isinstance(segs, list) or len(segs) != length:
      n = len(segs) if isinstance(segs, list) else type(segs).__name__
      raise ValueError(f'{gt_where(j)}: "segmentations" must be a list of one segmentation or '
                       f'null per frame: got {n} for a video of {length} frames')
    crowd = a.get('iscrowd', 0)
    if not isinstance(crowd, (int, bool)) or crowd not in (0, 1):
      raise ValueError(f'{gt_where(j)}: "iscrowd" must be 0 or 1, got {crowd!r}')
    masks.add_track(segs, h, w, lambda t, j=j: f'{gt_where(j)}, frame {t}', g_slots)
    g_json_area.append(_json_areas(a.get('areas'), length, lambda: gt_where(j)))
    if has_occ:
      occ = a['occlusion']
      if isinstance(occ, list) and len(occ) != length:
        raise ValueError(f'{gt_where(j)}: "occlusion" has {len(occ)} levels for a video of '
                         f'{length} frames')
      g_occ.append(occlusion_score(occ, gt_where(j)))
    else:
      g_occ.append(0.0)
    g_video.append(video_pos[vid])
    g_cat.append(cat_pos.get(cid, -1))
    g_len.append(length)
    g_crowd.append(bool(crowd))
  masks.check(lambda rle: '{}, frame {}'.format(*_locate(g_slots, g_len, rle, gt_where)))
  if unknown:
    # Never scored, as in the official evaluation (SPEC 7); said, as a wrong id is likely a mistake.
    warnings.warn(f'{gt_name}: {len(unknown)} annotation(s) have a "category_id" that is not in '
                  f'"categories" ({_where_list(unknown)}); they are not scored', stacklevel=2)

  d_video, d_cat, d_slots, d_len, d_score, unknown = [], [], [], [], [], []

  def result_where(i):
    vid = results[i].get('video_id') if isinstance(results[i], dict) else None
    return (f'{results_name}: result {i}'
            + (f' (video {vid})' if _int(vid) and vid in videos else ''))
  for i, r in enumerate(results):
    if not isinstance(r, dict):
      raise ValueError(f'{results_name}: result {i}: expected an object with video_id, '
                       f'category_id, score, segmentations; got {type(r).__name__}')
    try:
      vid, cid, score, segs = r['video_id'], r['category_id'], r['score'], r['segmentations']
    except KeyError as e:
      raise ValueError(f'{result_where(i)}: missing field {e.args[0]!r}') from None
    if not _int(vid) or vid not in videos:
      raise ValueError(f'{results_name}: result {i} is for video {vid!r}, which the ground truth '
                       f'does not have')
    h, w, length = videos[vid]
    if not _int(cid):
      raise ValueError(f'{result_where(i)}: "category_id" must be an integer, got {cid!r}')
    if cid not in cat_pos:
      unknown.append(cid)
    if type(score) is not float or not math.isfinite(score):
      score = _score(score, result_where(i))
    if not isinstance(segs, list) or len(segs) != length:
      n = len(segs) if isinstance(segs, list) else type(segs).__name__
      raise ValueError(f'{result_where(i)}: "segmentations" must be a list of one RLE or null per '
                       f'frame: got {n} for a video of {length} frames')
    masks.add_track(segs, h, w, lambda t, i=i: f'{result_where(i)}, frame {t}', d_slots)
    d_video.append(video_pos[vid])
    d_cat.append(cat_pos.get(cid, -1))
    d_len.append(length)
    d_score.append(score)
  masks.check(lambda rle: '{}, frame {}'.format(*_locate(d_slots, d_len, rle, result_where)))
  if unknown:
    warnings.warn(f'{results_name}: {len(unknown)} result(s) have a "category_id" that is not in '
                  f'the ground truth\'s categories ({_where_list(unknown)}); they are not scored',
                  stacklevel=2)
  rles = masks.rles

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
    frame_base = np.r_[0, np.cumsum([videos[vid][2] for vid in videos])]
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
  return evaluate_dicts(gt, results, gt_name=gt_json_path, results_name=results_json_path)


def format_table(metrics: dict[str, Any]) -> str:
  """Two lines: metric names and values in percent ('-' where undefined)."""
  keys = [k for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10')
          + tuple(name for name, _ in OCCLUSION_RANGES) if k in metrics]
  widths = [max(6, len(k)) for k in keys]
  return ('  '.join(f'{k:>{w}}' for k, w in zip(keys, widths)) + '\n'
          + '  '.join(f'{100 * metrics[k]:{w}.2f}' if metrics[k] >= 0 else f'{"-":>{w}}'
                      for k, w in zip(keys, widths)))
