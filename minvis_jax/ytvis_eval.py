"""The YouTube-VIS / OVIS video instance segmentation metric (docs/method.md §5), checked against
pycocotools.

Track IoU = sum over frames of intersection / sum over frames of union; then COCO accumulation
(IoU 0.50:0.05:0.95, 101 recall points, maxDets 1/10/100) with YouTube-VIS's area ranges.
With OVIS ground truth (per-frame `occlusion` levels), also AP on the occlusion subsets.

`evaluate_dicts` parses and checks the ground truth and the results (every mask through
data/rle.py), then matches and accumulates them with cocoeval.py and summarises the metrics.
"""

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from minvis_jax import cocoeval
from minvis_jax.data import rle

# all, small, medium, large: YouTube-VIS ranges over the mean non-empty area of a track.
AREA_RANGES = ((0, 1e10), (0, 128 ** 2), (128 ** 2, 256 ** 2), (256 ** 2, 1e10))
# OVIS (docs/method.md §7): per-frame occlusion levels of a ground-truth track as the OVIS
# annotations spell them; a track's occlusion score is the mean level over its most occluded half
# of annotated frames.
OCCLUSION_LEVELS = {'no_occlusion': 0.0, 'slight_occlusion': 0.25, 'severe_occlusion': 0.75}
# Subsets by occlusion score, both ends inclusive as in the OVIS evaluator (which labels them
# light / medium / heavy; the OVIS paper reports them as AP_so / AP_mo / AP_ho). Detections are not
# filtered: a detection is ignored in a subset only when it matches a ground truth outside it.
OCCLUSION_RANGES = (('AP_slight', (0.0, 0.25)), ('AP_moderate', (0.25, 0.5)),
                    ('AP_heavy', (0.5, 1.0)))


def _where_list(items: list, limit: int = 20) -> str:
  items = sorted(set(items))
  return ', '.join(map(repr, items[:limit])) + (', ...' if len(items) > limit else '')


def _locate(slots: list, lengths: list, index: int, where) -> tuple[str, int]:
  """(where(track), frame) of the track and frame whose mask is rles[index]."""
  pos = slots.index(index)
  track = int(np.searchsorted(np.cumsum(lengths), pos, 'right'))
  return where(track), pos - int(np.sum(lengths[:track]))


def _int(x) -> bool:
  return type(x) is int or rle.is_int(x)


def _id_records(gt: dict, key: str, what: str, gt_name: str):
  """(where, record, id) of each object in the list gt[key]: checked to be objects whose "id" is
  an integer, unique in the list (each error names the file, the record and the field)."""
  raw = rle.field(gt, key, gt_name)
  if not isinstance(raw, list):
    raise ValueError(f'{gt_name}: "{key}" must be a list, got {type(raw).__name__}')
  seen = {}
  for j, record in enumerate(raw):
    where = f'{gt_name}: {key}[{j}]'
    if not isinstance(record, dict):
      raise ValueError(f'{where}: expected an object, got {type(record).__name__}')
    rid = rle.field(record, 'id', where)
    if not _int(rid):
      raise ValueError(f'{where}: "id" must be an integer, got {rid!r}')
    if rid in seen:
      raise ValueError(f'{where}: duplicate {what} id {rid} (also {key}[{seen[rid]}])')
    seen[rid] = j
    yield where, record, rid


def _ground_truth_videos(gt: dict, gt_name: str) -> dict:
  """video id -> (height, width, length) of the ground truth, checked."""
  videos = {}
  for where, v, vid in _id_records(gt, 'videos', 'video', gt_name):
    where = f'{where} (id {vid})'
    size = []
    for key in ('height', 'width'):
      x = rle.field(v, key, where)
      if not _int(x) or x < 1:
        raise ValueError(f'{where}: {key!r} must be a positive integer, got {x!r}')
      size.append(int(x))
    rle.check_frame_pixels(*size, where)
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
  return sorted(int(cid) for _, _, cid in _id_records(gt, 'categories', 'category', gt_name))


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


@dataclasses.dataclass
class _GroundTruth:
  """The parsed ground truth: its videos, categories and tracks with their per-track fields."""
  videos: dict              # video id -> (height, width, length), in file order
  cat_ids: list             # sorted category ids
  tracks: cocoeval.Tracks
  json_area: np.ndarray     # [nG] mean of the file's "areas"; NaN: from the masks
  crowd: np.ndarray         # [nG] bool
  occ: np.ndarray           # [nG] OVIS occlusion score (0 without occlusion levels)
  has_occ: bool             # OVIS ground truth with per-frame occlusion levels


def _annotation_list(gt: dict, gt_name: str) -> tuple[list, bool]:
  """(gt['annotations'], whether they carry OVIS occlusion levels), checked."""
  anns = gt['annotations']
  if not isinstance(anns, list):
    raise ValueError(f'{gt_name}: "annotations" must be a list, got {type(anns).__name__}')
  seen = {}
  for j, a in enumerate(anns):
    if not isinstance(a, dict):
      raise ValueError(f'{gt_name}: annotations[{j}]: expected an object, got '
                       f'{type(a).__name__}')
    aid = a.get('id')   # optional here; two records with one id are one track scored twice
    if aid is not None and aid in seen:
      raise ValueError(f'{gt_name}: annotations[{j}]: duplicate annotation id {aid!r} (also '
                       f'annotations[{seen[aid]}])')
    seen.setdefault(aid, j)
  # OVIS ground truth carries per-frame occlusion levels; then every annotation must have them.
  with_occ = sum('occlusion' in a for a in anns)
  if with_occ and with_occ < len(anns):
    j = next(j for j, a in enumerate(anns) if 'occlusion' not in a)
    raise ValueError(f'{gt_name}: annotations[{j}] (id {anns[j].get("id")}) has no "occlusion" '
                     f'levels but {with_occ} other annotations do')
  return anns, with_occ > 0


def _parse_ground_truth(gt: dict, gt_name: str, masks: rle.MaskList) -> _GroundTruth:
  """Checks every field of the ground truth and adds its masks to `masks` (checked)."""
  if not isinstance(gt, dict):
    raise ValueError(f'{gt_name}: expected a YouTube-VIS JSON object, got {type(gt).__name__}')
  if 'annotations' not in gt:
    raise ValueError(f'{gt_name}: no "annotations": a split without ground truth cannot be scored '
                     '(submit the results to its evaluation server)')
  videos = _ground_truth_videos(gt, gt_name)
  video_pos = {vid: i for i, vid in enumerate(videos)}
  cat_ids = _category_ids(gt, gt_name)
  cat_pos = {c: k for k, c in enumerate(cat_ids)}
  anns, has_occ = _annotation_list(gt, gt_name)
  rows, slots, unknown = [], [], []

  def where(j):
    vid = anns[j].get('video_id')
    return (f'{gt_name}: annotations[{j}] (id {anns[j].get("id")})'
            + (f' of video {vid}' if _int(vid) and vid in videos else ''))
  for j, a in enumerate(anns):
    try:
      vid, cid, segs = a['video_id'], a['category_id'], a['segmentations']
    except KeyError as e:
      raise ValueError(f'{where(j)}: missing field {e.args[0]!r}') from None
    _check_ids(vid, cid, videos, lambda j=j: where(j))
    h, w, length = videos[vid]
    _check_segmentations(segs, length, lambda j=j: where(j), 'segmentation')
    if cid not in cat_pos:
      unknown.append(cid)
    crowd = a.get('iscrowd', 0)
    if not isinstance(crowd, (int, bool)) or crowd not in (0, 1):
      raise ValueError(f'{where(j)}: "iscrowd" must be 0 or 1, got {crowd!r}')
    masks.add_track(segs, h, w, lambda t, j=j: f'{where(j)}, frame {t}', slots)
    json_area = _json_areas(a.get('areas'), length, lambda j=j: where(j))
    occ = _track_occlusion(a['occlusion'], length, where(j)) if has_occ else 0.0
    rows.append((video_pos[vid], cat_pos.get(cid, -1), length, json_area, bool(crowd), occ))
  lengths = [r[2] for r in rows]
  masks.check(lambda i: '{}, frame {}'.format(*_locate(slots, lengths, i, where)))
  if unknown:
    # Never scored, as in the official evaluation (docs/method.md §7); said, as a wrong id is
    # likely a mistake.
    warnings.warn(f'{gt_name}: {len(unknown)} annotation(s) have a "category_id" that is not in '
                  f'"categories" ({_where_list(unknown)}); they are not scored', stacklevel=3)
  video, cat, _, json_area, crowd, occ = (list(c) for c in zip(*rows)) if rows else ([],) * 6
  return _GroundTruth(videos, cat_ids, cocoeval.Tracks(video, cat, slots, lengths, len(videos)),
                      np.asarray(json_area, float), np.asarray(crowd, bool),
                      np.asarray(occ, float), has_occ)


def _check_ids(vid, cid, videos: dict, where) -> None:
  """A ground-truth track's video (None: not checked) is one of `videos`; a track's category id is
  an integer. where() names the track."""
  if vid is not None and (not _int(vid) or vid not in videos):
    raise ValueError(f'{where()}: "video_id" {vid!r} is not a video of "videos"')
  if not _int(cid):
    raise ValueError(f'{where()}: "category_id" must be an integer, got {cid!r}')


def _check_segmentations(segs, length: int, where, what: str) -> None:
  if not isinstance(segs, list) or len(segs) != length:
    n = len(segs) if isinstance(segs, list) else type(segs).__name__
    raise ValueError(f'{where()}: "segmentations" must be a list of one {what} or null per '
                     f'frame: got {n} for a video of {length} frames')


def _track_occlusion(occ, length: int, where: str) -> float:
  if isinstance(occ, list) and len(occ) != length:
    raise ValueError(f'{where}: "occlusion" has {len(occ)} levels for a video of {length} frames')
  return occlusion_score(occ, where)


def _parse_results(results: list, results_name: str, gt: _GroundTruth,
                   masks: rle.MaskList) -> tuple[cocoeval.Tracks, np.ndarray]:
  """(tracks, scores [nD]) of the results, every field checked; adds their masks to `masks`."""
  if not isinstance(results, list):
    raise ValueError(f'{results_name}: expected a JSON list of tracks, got '
                     f'{type(results).__name__}')
  videos = gt.videos
  video_pos = {vid: i for i, vid in enumerate(videos)}
  cat_pos = {c: k for k, c in enumerate(gt.cat_ids)}
  video, cat, slots, lengths, scores, unknown = [], [], [], [], [], []

  def where(i):
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
      raise ValueError(f'{where(i)}: missing field {e.args[0]!r}') from None
    if not _int(vid) or vid not in videos:
      raise ValueError(f'{results_name}: result {i} is for video {vid!r}, which the ground truth '
                       f'does not have')
    _check_ids(None, cid, videos, lambda i=i: where(i))
    if type(score) is not float or not math.isfinite(score):
      score = _score(score, where(i))
    h, w, length = videos[vid]
    _check_segmentations(segs, length, lambda i=i: where(i), 'RLE')
    if cid not in cat_pos:
      unknown.append(cid)
    masks.add_track(segs, h, w, lambda t, i=i: f'{where(i)}, frame {t}', slots)
    video.append(video_pos[vid])
    cat.append(cat_pos.get(cid, -1))
    lengths.append(length)
    scores.append(score)
  masks.check(lambda i: '{}, frame {}'.format(*_locate(slots, lengths, i, where)))
  if unknown:
    warnings.warn(f'{results_name}: {len(unknown)} result(s) have a "category_id" that is not in '
                  f'the ground truth\'s categories ({_where_list(unknown)}); they are not scored',
                  stacklevel=3)
  return cocoeval.Tracks(video, cat, slots, lengths, len(videos)), np.asarray(scores, float)


def _ignore_configs(gt: _GroundTruth, g_area: np.ndarray, d_area: np.ndarray):
  """The ignore configurations S: the area ranges, then (OVIS) the occlusion subsets over all
  areas -> detections outside each [nD, S], ignored ground truths [S, nG]."""
  def inside(x, rng):
    return (rng[0] <= x) & (x <= rng[1])
  occlusion = OCCLUSION_RANGES if gt.has_occ else ()
  ranges = list(AREA_RANGES) + [AREA_RANGES[0]] * len(occlusion)
  d_out = np.stack([~inside(d_area, rng) for rng in ranges], 1)
  g_ignore = np.stack([gt.crowd | ~inside(g_area, rng) for rng in AREA_RANGES]
                      + [gt.crowd | ~inside(g_area, AREA_RANGES[0]) | ~inside(gt.occ, rng)
                         for _, rng in occlusion])
  return d_out, g_ignore


def _summarize(precision: np.ndarray, recall: np.ndarray, has_occ: bool) -> dict[str, float]:
  """The metrics dict of COCO's summarize (means over the defined entries; -1: none defined)."""
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


def evaluate_dicts(gt: dict, results: list, *, gt_name: str = 'ground truth',
                   results_name: str = 'results') -> dict[str, float]:
  """The metric from loaded JSON: gt (YouTube-VIS dict), results (list of tracks).

  Every field read is checked first, every mask against its frame included (pycocotools never
  returns on an RLE whose runs miss the frame size): ValueError names the file (gt_name,
  results_name), the record and the field. Results or annotations whose category is not in the
  ground truth's categories are not scored (as the official evaluation) and warned about once.
  """
  masks = rle.MaskList()
  truth = _parse_ground_truth(gt, gt_name, masks)
  dts, d_score = _parse_results(results, results_name, truth, masks)
  gts = truth.tracks
  # Index -1 (no mask) reads the appended 0. pycocotools' area() fails on lists of more than 255
  # (a uint8 length array under numpy 2), hence the chunks.
  frame_areas = np.concatenate([np.asarray(mask_utils.area(masks.rles[i:i + 255]), float)
                                for i in range(0, len(masks.rles), 255)] + [np.zeros(1)])
  g_total, g_mask_area = gts.areas(frame_areas)
  d_total, d_area = dts.areas(frame_areas)
  g_area = np.where(np.isnan(truth.json_area), g_mask_area, truth.json_area)
  # Each (video, category) keeps its MAX_DETS[-1] best detections.
  rank, g_local = cocoeval.rank_detections(dts, d_score, gts)
  kept = rank < cocoeval.MAX_DETS[-1]
  d_out, g_ignore = _ignore_configs(truth, g_area, d_area)
  frame_base = np.r_[0, np.cumsum([length for _, _, length in truth.videos.values()])]

  def ious_of(d_sel, g_sel):
    return cocoeval.track_ious(dts, gts, d_sel, g_sel, masks.rles, frame_areas, d_total, g_total,
                               frame_base)
  matched, to_ignored = cocoeval.match_tracks(dts, gts, truth.crowd, kept, rank, g_local,
                                              g_ignore, ious_of)
  ignored = to_ignored | (~matched & d_out[:, :, None])
  precision, recall = cocoeval.accumulate(dts, d_score, kept, rank, matched & ~ignored,
                                         ~matched & ~ignored, gts, g_ignore, len(truth.cat_ids))
  return _summarize(precision, recall, truth.has_occ)


def evaluate(gt_json_path: str, results_json_path: str) -> dict[str, float]:
  """AP, AP50, AP75, APs, APm, APl, AR1, AR10 of a results file against YouTube-VIS ground truth,
  plus AP_slight, AP_moderate, AP_heavy when it is OVIS ground truth with occlusion levels.

  Values are in [0, 1]; -1 where undefined (no ground truth in that range), as in COCOeval.
  """
  gt = rle.load_json(gt_json_path, 'ground-truth')
  results = rle.load_json(results_json_path, 'results')
  return evaluate_dicts(gt, results, gt_name=gt_json_path, results_name=results_json_path)


def format_table(metrics: dict[str, Any]) -> str:
  """Two lines: metric names and values in percent ('-' where undefined)."""
  keys = [k for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10')
          + tuple(name for name, _ in OCCLUSION_RANGES) if k in metrics]
  widths = [max(6, len(k)) for k in keys]
  return ('  '.join(f'{k:>{w}}' for k, w in zip(keys, widths)) + '\n'
          + '  '.join(f'{100 * metrics[k]:{w}.2f}' if metrics[k] >= 0 else f'{"-":>{w}}'
                      for k, w in zip(keys, widths)))
