"""The YouTube-VIS metric: equal to pycocotools COCOeval on single-frame videos, hand cases,
errors."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from support import json_edits, rle_codes
from support.references import YTVIS_AREAS
from support.references import coco_eval as _coco_eval
from support.references import cocoeval as _cocoeval
from support.references import rle as _rle
from support.references import single_frame_case as _random_case

from minvis_jax import ytvis_eval
from minvis_jax.ytvis_eval import evaluate, evaluate_dicts, format_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10']


@pytest.mark.parametrize('seed', range(40))
def test_single_frame_videos_equal_cocoeval(seed):
  gt, results = _random_case(seed)
  if not gt['annotations']:
    return
  ours = evaluate_dicts(gt, results)
  theirs = _cocoeval(gt, results)
  for k in KEYS:
    assert abs(ours[k] - theirs[k]) <= 1e-9, (k, ours[k], theirs[k])


def _video(masks):
  return [None if m is None else _rle(np.asarray(m, np.uint8)) for m in masks]


def test_multi_frame_iou_and_empty_frames():
  z = np.zeros((4, 4), np.uint8)
  a, b = z.copy(), z.copy()
  a[:2, :2] = 1        # 4 px
  b[:2, :] = 1         # 8 px
  gt = dict(videos=[dict(id=1, height=4, width=4, length=3)],
            categories=[dict(id=1, name='x')],
            annotations=[dict(id=1, video_id=1, category_id=1, iscrowd=0,
                              segmentations=_video([a, None, b]), areas=[4, None, 8])])
  # frame 0: I=4, U=4; frame 1: prediction only (4 px) -> U+=4; frame 2: I=4, U=8 -> IoU 8/16.
  res = [dict(video_id=1, category_id=1, score=0.9, segmentations=_video([a, a, a]))]
  m = evaluate_dicts(gt, res)
  assert m['AP50'] == pytest.approx(1.0) and m['AP75'] == 0.0
  assert m['AP'] == pytest.approx(0.1)  # matched only at IoU threshold 0.50 (exactly 0.5 counts)
  # Frames where both are empty add nothing: an extra empty frame does not change the IoU.
  res2 = [dict(video_id=1, category_id=1, score=0.9, segmentations=_video([a, z, b]))]
  m2 = evaluate_dicts(gt, res2)  # I = 4 + 8 = 12, U = 4 + 8 = 12 -> IoU 1
  assert m2['AP'] == pytest.approx(1.0)


def test_max_dets_and_area_ranges():
  big, small = np.zeros((300, 300), np.uint8), np.zeros((300, 300), np.uint8)
  big[:200, :200] = 1          # 40000 px: medium
  small[:10, :10] = 1          # small
  gt = dict(videos=[dict(id=1, height=300, width=300, length=2)],
            categories=[dict(id=1, name='x')],
            annotations=[dict(id=1, video_id=1, category_id=1, iscrowd=0,
                              segmentations=_video([big, None]), areas=[40000, None])])
  junk = [dict(video_id=1, category_id=1, score=0.99, segmentations=_video([small, small]))]
  good = [dict(video_id=1, category_id=1, score=0.5, segmentations=_video([big, None]))]
  m = evaluate_dicts(gt, junk + good)
  assert m['AR1'] == 0.0 and m['AR10'] == 1.0   # the good track is second by score
  # All areas: the small junk track is a false positive ranked first (precision 1/2).
  assert m['AP'] == pytest.approx(0.5)
  # Medium range: an unmatched detection outside the range is ignored.
  assert m['APm'] == pytest.approx(1.0)
  assert m['APs'] == -1.0 and m['APl'] == -1.0   # no ground truth there: undefined, as COCO


def test_bad_inputs_name_the_file(tmp_path):
  gt = dict(videos=[dict(id=1, height=4, width=4, length=2)], categories=[dict(id=1, name='x')],
            annotations=[])
  gt_path = tmp_path / 'gt.json'
  gt_path.write_text(json.dumps(gt))
  bad = tmp_path / 'res.json'
  bad.write_text('not json {')
  with pytest.raises(ValueError, match='res.json: not a JSON'):
    evaluate(str(gt_path), str(bad))
  one = np.ones((4, 4))
  for results, msg in [
      ([dict(video_id=7, category_id=1, score=1.0, segmentations=_video([one, one]))],
       'video 7, which the ground truth does not have'),
      ([dict(video_id=1, category_id=1, score=1.0, segmentations=_video([np.ones((5, 4)), one]))],
       r'result 0 \(video 1\), frame 0: mask size \[5, 4\] does not match the frame size \[4, 4\]'),
      ([dict(video_id=1, category_id=1, score=1.0, segmentations=_video([one]))],
       r'result 0 \(video 1\): "segmentations" must be a list .*got 1 for a video of 2 frames')]:
    bad.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=msg):
      evaluate(str(gt_path), str(bad))
  with pytest.raises(FileNotFoundError, match='missing.json'):
    evaluate(str(tmp_path / 'missing.json'), str(bad))


def test_empty_results_equal_cocoeval():
  gt, _ = _random_case(4)
  ours = evaluate_dicts(gt, [])
  theirs = _cocoeval(gt, [])
  for k in KEYS:
    assert abs(ours[k] - theirs[k]) <= 1e-9, (k, ours[k], theirs[k])


# ------------------------------------------------------------------------------------------------
# OVIS occlusion subsets.


OCC_KEYS = ['AP_slight', 'AP_moderate', 'AP_heavy']


def test_occlusion_score_most_occluded_half():
  score = ytvis_eval.occlusion_score
  assert score(['no_occlusion', 'no_occlusion'], 'a') == 0.0
  # [0, 0.25] -> the top ceil(2/2) = 1 level.
  assert score(['no_occlusion', 'slight_occlusion', None], 'a') == 0.25
  # [0, 0.25, 0.75] -> the top 2: (0.25 + 0.75) / 2.
  assert score(['slight_occlusion', 'severe_occlusion', 'no_occlusion'], 'a') == 0.5
  # [0, 0, 0, 0.75, 0.75] -> the top 3: 1.5 / 3.
  assert score([None, 'no_occlusion', 'severe_occlusion', 'no_occlusion', 'severe_occlusion',
                'no_occlusion'], 'a') == 0.5
  assert score(['severe_occlusion'], 'a') == 0.75
  with pytest.raises(ValueError,
                     match="gt.json: video 3 annotation 9: unknown occlusion level 'partial'"):
    score(['no_occlusion', 'partial'], 'gt.json: video 3 annotation 9')
  with pytest.raises(ValueError, match='no level on any frame'):
    score([None, None], 'x')


def test_occlusion_subsets_hand_computed():
  h = w = 16
  def box(y, x):
    m = np.zeros((h, w), np.uint8)
    m[y:y + 4, x:x + 4] = 1
    return m
  g1, g2, g3, junk = box(0, 0), box(0, 8), box(8, 0), box(8, 8)
  occ = {1: ['no_occlusion', 'slight_occlusion', None],                 # 0.25: slight and moderate
         2: ['slight_occlusion', 'severe_occlusion', 'no_occlusion'],   # 0.5: moderate and heavy
         3: ['severe_occlusion'] * 3}                                   # 0.75: heavy
  gt = dict(videos=[dict(id=1, height=h, width=w, length=3)], categories=[dict(id=1, name='x')],
            annotations=[dict(id=i, video_id=1, category_id=1, iscrowd=0,
                              segmentations=_video([m] * 3), areas=[16.0] * 3, occlusion=occ[i])
                         for i, m in ((1, g1), (2, g2), (3, g3))])
  res = [dict(video_id=1, category_id=1, score=s, segmentations=_video([m] * 3))
         for s, m in ((0.95, junk), (0.9, g1), (0.8, g3))]   # g2 is missed; junk overlaps nothing
  m = evaluate_dicts(gt, res)
  # slight: GT {g1}; detections FP, TP, (ignored: matches g3 outside the subset) -> precision 1/2.
  assert m['AP_slight'] == pytest.approx(0.5)
  # moderate: GT {g1, g2}; FP, TP (recall 1/2), ignored -> precision 1/2 up to recall 0.50.
  assert m['AP_moderate'] == pytest.approx(0.5 * 51 / 101)
  # heavy: GT {g2, g3}; FP, ignored (matches g1), TP -> precision 1/2 up to recall 0.50.
  assert m['AP_heavy'] == pytest.approx(0.5 * 51 / 101)
  # All ground truth: FP, TP, TP over 3 -> precision 2/3 up to recall 2/3 (0.00..0.66).
  assert m['AP'] == pytest.approx(2 / 3 * 67 / 101)
  # Without occlusion levels: the same YouTube-VIS metrics and no occlusion keys.
  for a in gt['annotations']:
    del a['occlusion']
  plain = evaluate_dicts(gt, res)
  assert set(plain) == set(KEYS)
  assert {k: m[k] for k in KEYS} == plain
  # Heavy subset empty of ground truth -> undefined (-1), as COCO's empty area ranges.
  for a, levels in zip(gt['annotations'], (['no_occlusion'] * 3,) * 3):
    a['occlusion'] = levels
  m = evaluate_dicts(gt, res)
  assert m['AP_heavy'] == -1.0 and m['AP_moderate'] == -1.0
  assert m['AP_slight'] == pytest.approx(m['AP'])


def _cocoeval_subset(gt, results, occ_scores, rng):
  """COCOeval (segm) where the area of a ground truth is its occlusion score and every detection's
  area lies in the range: ground truth outside `rng` is ignored, detections are never filtered."""
  ev = _coco_eval(gt, results, gt_areas=occ_scores, det_area=rng[0], area_ranges=[rng])
  p = ev.eval['precision'][:, :, :, 0, 2]
  return float(np.mean(p[p > -1])) if (p > -1).any() else -1.0


@pytest.mark.parametrize('seed', range(12))
def test_occlusion_subsets_equal_cocoeval_on_single_frame_videos(seed):
  gt, results = _random_case(seed)
  if not gt['annotations'] or not results:
    return
  rng = np.random.default_rng(100 + seed)
  levels = list(ytvis_eval.OCCLUSION_LEVELS)
  for a in gt['annotations']:
    a['occlusion'] = [levels[int(rng.integers(0, 3))]]
  scores = {a['id']: ytvis_eval.OCCLUSION_LEVELS[a['occlusion'][0]] for a in gt['annotations']}
  ours = evaluate_dicts(gt, results)
  for name, occ_rng in ytvis_eval.OCCLUSION_RANGES:
    theirs = _cocoeval_subset(gt, results, scores, occ_rng)
    assert abs(ours[name] - theirs) <= 1e-9, (name, ours[name], theirs)


def test_occlusion_bad_input_names_the_annotation(tmp_path):
  one = np.ones((4, 4))
  gt = dict(videos=[dict(id=1, height=4, width=4, length=1)], categories=[dict(id=1, name='x')],
            annotations=[dict(id=1, video_id=1, category_id=1, iscrowd=0,
                              segmentations=_video([one]), occlusion=['no_occlusion']),
                         dict(id=2, video_id=1, category_id=1, iscrowd=0,
                              segmentations=_video([one]))])
  gt_path = tmp_path / 'ovis.json'
  gt_path.write_text(json.dumps(gt))
  res_path = tmp_path / 'res.json'
  res_path.write_text('[]')
  with pytest.raises(ValueError,
                     match=r'ovis.json: annotations\[1\] \(id 2\) has no "occlusion" levels'):
    evaluate(str(gt_path), str(res_path))
  gt['annotations'][1]['occlusion'] = ['heavy']
  gt_path.write_text(json.dumps(gt))
  with pytest.raises(ValueError,
                     match=r"ovis.json: annotations\[1\] \(id 2\) of video 1: unknown occlusion "
                           r"level 'heavy'"):
    evaluate(str(gt_path), str(res_path))


def test_format_table_with_occlusion_and_undefined():
  table = format_table(dict(AP=0.5, AP50=0.75, APs=-1.0, AP_slight=0.125, AP_moderate=0.0,
                            AP_heavy=-1.0))
  names, values = table.splitlines()
  assert names.split() == ['AP', 'AP50', 'APs', 'AP_slight', 'AP_moderate', 'AP_heavy']
  assert values.split() == ['50.00', '75.00', '-', '12.50', '0.00', '-']


# ------------------------------------------------------------------------------------------------
# Multi-frame videos against an independent reference: COCOeval with videos as images and its
# computeIoU replaced by track IoU from decoded masks (the evaluator itself never decodes).

def _decoded(segs, h, w):
  return np.stack([np.zeros((h, w), bool) if s is None else mask_utils.decode(s).astype(bool)
                   for s in segs])


def _mean_nonzero(areas):
  vals = [a for a in areas if a]
  return float(np.mean(vals)) if vals else 0.0


class _TrackIoUEval(COCOeval):
  """COCOeval whose IoU is sum over frames of intersection / sum of union of the decoded masks."""

  def computeIoU(self, img_id, cat_id):
    g, d = self._gts[img_id, cat_id], self._dts[img_id, cat_id]
    order = np.argsort([-x['score'] for x in d], kind='mergesort')
    d = [d[i] for i in order][:self.params.maxDets[-1]]
    ious = np.zeros((len(d), len(g)))
    for i, x in enumerate(d):
      for j, y in enumerate(g):
        union = np.count_nonzero(x['masks'] | y['masks'])
        ious[i, j] = np.count_nonzero(x['masks'] & y['masks']) / union if union else 0.0
    return ious


def _coco_eval_tracks(gt, results, gt_areas=None, det_area=None, area_ranges=YTVIS_AREAS):
  """_TrackIoUEval run (evaluate + accumulate); areas: mean non-empty area of a track (ground
  truth: of the JSON `areas`), or gt_areas (annotation id -> area) and det_area (all detections)."""
  sizes = {v['id']: (v['height'], v['width']) for v in gt['videos']}
  images = [dict(id=v['id'], height=v['height'], width=v['width']) for v in gt['videos']]
  blank = {vid: _rle(np.zeros(hw)) for vid, hw in sizes.items()}  # unused by the IoU above
  anns = [dict(id=a['id'], image_id=a['video_id'], category_id=a['category_id'],
               iscrowd=a['iscrowd'], segmentation=blank[a['video_id']],
               area=gt_areas[a['id']] if gt_areas else _mean_nonzero(a['areas']),
               masks=_decoded(a['segmentations'], *sizes[a['video_id']]))
          for a in gt['annotations']]
  dets = []
  for i, r in enumerate(results):
    masks = _decoded(r['segmentations'], *sizes[r['video_id']])
    dets.append(dict(id=i + 1, image_id=r['video_id'], category_id=r['category_id'],
                     score=r['score'], segmentation=blank[r['video_id']], masks=masks,
                     area=_mean_nonzero(masks.sum((1, 2))) if det_area is None else det_area))
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt, coco_dt = COCO(), COCO()
    coco_gt.dataset = dict(images=images, annotations=anns, categories=gt['categories'])
    coco_dt.dataset = dict(images=images, annotations=dets, categories=gt['categories'])
    coco_gt.createIndex()
    coco_dt.createIndex()
    ev = _TrackIoUEval(coco_gt, coco_dt, 'segm')
    ev.params.areaRng = [list(r) for r in area_ranges]
    ev.params.areaRngLbl = ['all', 'small', 'medium', 'large'][:len(area_ranges)]
    ev.evaluate()
    ev.accumulate()
  return ev


def _moving_box(rng, h, w, length):
  """A box of 1/6 to all of the frame drifting a few pixels per frame; null on some frames."""
  bh, bw = int(rng.integers(h // 6, h + 1)), int(rng.integers(w // 6, w + 1))
  y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
  masks = []
  for _ in range(length):
    m = np.zeros((h, w), np.uint8)
    m[y:y + bh, x:x + bw] = 1
    masks.append(m if rng.random() < 0.85 else None)
    y = int(np.clip(y + rng.integers(-3, 4), 0, h - bh))
    x = int(np.clip(x + rng.integers(-3, 4), 0, w - bw))
  return masks


def _random_video_case(seed, crowded=False):
  """Videos of 1-4 frames and three sizes (all area ranges): frames without a mask (null) or with
  an empty one, crowd and duplicated ground truth (ties), shifted detections, tied scores, false
  positives; crowded: 105 more detections in one (video, category), beyond maxDets 100."""
  rng = np.random.default_rng(seed)
  n_cats = int(rng.integers(1, 4))
  videos, anns, results = [], [], []
  for v in range(1, int(rng.integers(1, 4)) + 1):
    h, w = [(48, 64), (140, 200), (270, 300)][int(rng.integers(0, 3))]
    length = int(rng.integers(1, 5))
    videos.append(dict(id=v, height=h, width=w, length=length))
    for _ in range(int(rng.integers(1, 4))):
      masks = _moving_box(rng, h, w, length)
      if rng.random() < 0.2:
        masks[0] = np.zeros((h, w), np.uint8)
      cat = int(rng.integers(1, n_cats + 1))
      for _ in range(2 if rng.random() < 0.2 else 1):
        anns.append(dict(id=len(anns) + 1, video_id=v, category_id=cat,
                         iscrowd=int(rng.random() < 0.15), segmentations=_video(masks),
                         areas=[None if m is None else float(m.sum()) for m in masks]))
      for _ in range(int(rng.integers(0, 3))):
        shift = (int(rng.integers(-h // 12, h // 12 + 1)), int(rng.integers(-w // 12, w // 12 + 1)))
        det = [None if m is None or rng.random() < 0.1 else np.roll(m, shift, axis=(0, 1))
               for m in masks]
        other = int(rng.integers(1, n_cats + 1))
        results.append(dict(video_id=v, score=float(rng.choice([0.5, 0.8, rng.random()])),
                            category_id=cat if rng.random() < 0.85 else other,
                            segmentations=_video(det)))
    for _ in range(int(rng.integers(0, 3)) + (105 if crowded and v == 1 else 0)):
      cat = 1 if crowded else int(rng.integers(1, n_cats + 1))
      results.append(dict(video_id=v, category_id=cat, score=float(rng.choice([0.5, 0.9])),
                          segmentations=_video(_moving_box(rng, h, w, length))))
  cats = [dict(id=c, name=f'c{c}') for c in range(1, n_cats + 1)]
  return dict(videos=videos, annotations=anns, categories=cats), results


@pytest.mark.parametrize('seed,crowded',
                         [(s, False) for s in range(14)] + [(100, True), (101, True)])
def test_multi_frame_videos_equal_track_iou_cocoeval(seed, crowded):
  gt, results = _random_video_case(seed, crowded)
  ours = evaluate_dicts(gt, results)
  ev = _coco_eval_tracks(gt, results)
  with contextlib.redirect_stdout(io.StringIO()):
    ev.summarize()
  for k, theirs in zip(KEYS, ev.stats):
    assert abs(ours[k] - theirs) <= 1e-9, (k, ours[k], theirs)


@pytest.mark.parametrize('seed', range(6))
def test_multi_frame_occlusion_subsets_equal_track_iou_cocoeval(seed):
  gt, results = _random_video_case(200 + seed)
  rng = np.random.default_rng(seed)
  levels = list(ytvis_eval.OCCLUSION_LEVELS)
  for a in gt['annotations']:
    a['occlusion'] = [levels[int(rng.integers(0, 3))] for _ in a['segmentations']]
  scores = {a['id']: ytvis_eval.occlusion_score(a['occlusion'], 'x') for a in gt['annotations']}
  ours = evaluate_dicts(gt, results)
  for name, occ_rng in ytvis_eval.OCCLUSION_RANGES:
    ev = _coco_eval_tracks(gt, results, gt_areas=scores, det_area=occ_rng[0],
                           area_ranges=[occ_rng])
    p = ev.eval['precision'][:, :, :, 0, 2]
    theirs = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
    assert abs(ours[name] - theirs) <= 1e-9, (name, ours[name], theirs)


def test_many_masks_equal_cocoeval():
  """Hundreds of masks in one call (pycocotools' area() fails past 255 in one list)."""
  gt = dict(videos=[], annotations=[], categories=[dict(id=c, name=f'c{c}') for c in (1, 2, 3)])
  results = []
  for seed in range(60):
    g, r = _random_case(seed)
    offset = len(gt['videos'])
    gt['videos'] += [dict(v, id=v['id'] + offset) for v in g['videos']]
    first_id = len(gt['annotations']) + 1
    gt['annotations'] += [dict(a, id=first_id + i, video_id=a['video_id'] + offset)
                          for i, a in enumerate(g['annotations'])]
    results += [dict(x, video_id=x['video_id'] + offset) for x in r]
  assert len(gt['annotations']) + len(results) > 300
  ours = evaluate_dicts(gt, results)
  theirs = _cocoeval(gt, results)
  for k in KEYS:
    assert abs(ours[k] - theirs[k]) <= 1e-9, (k, ours[k], theirs[k])


def test_ground_truth_frame_count_must_match_the_video():
  gt = dict(videos=[dict(id=1, height=4, width=4, length=2)], categories=[dict(id=1, name='x')],
            annotations=[dict(id=5, video_id=1, category_id=1, iscrowd=0,
                              segmentations=_video([np.ones((4, 4))]))])
  with pytest.raises(ValueError, match=r'gt.json: annotations\[0\] \(id 5\) of video 1: '
                                       r'"segmentations" .* got 1 for a video of 2 frames'):
    evaluate_dicts(gt, [], gt_name='gt.json')


def test_matching_ties_and_crowd_reuse():
  def row(a, b, r=0):
    m = np.zeros((2, 20), np.uint8)
    m[r, a:b] = 1
    return m
  def case(anns, dets):
    gt = dict(videos=[dict(id=1, height=2, width=20, length=1)], categories=[dict(id=1, name='x')],
              annotations=[dict(id=i + 1, video_id=1, category_id=1, iscrowd=c,
                                segmentations=_video([m]), areas=[float(m.sum())])
                           for i, (m, c) in enumerate(anns)])
    res = [dict(video_id=1, category_id=1, score=s, segmentations=_video([m])) for s, m in dets]
    ours = evaluate_dicts(gt, res)
    ev = _coco_eval_tracks(gt, res)
    with contextlib.redirect_stdout(io.StringIO()):
      ev.summarize()
    for k, theirs in zip(KEYS, ev.stats):
      assert abs(ours[k] - theirs) <= 1e-9, (k, ours[k], theirs)
    return ours
  # The first detection has IoU 0.6 with both ground truths and takes the later one (COCOeval's
  # loop), which leaves the earlier one to the second detection: two matches at IoU 0.5.
  m = case([(row(0, 6), 0), (row(4, 10), 0)], [(0.9, row(0, 10)), (0.8, row(0, 7))])
  assert m['AP50'] == 1.0
  # A crowd ground truth can absorb several detections (all ignored): the third is a clean TP.
  m = case([(row(0, 10), 1), (row(0, 10, 1), 0)],
           [(0.9, row(0, 10)), (0.8, row(0, 10)), (0.7, row(0, 10, 1))])
  assert m['AP'] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Bad input: never a hang, never a silent result; every error names the file, the record and the
# field.

H, W = 4, 4
SQUARE = np.zeros((H, W), np.uint8)
SQUARE[:2, :2] = 1                       # column-major runs: [0, 2, 2, 2, 10]


def _gt(**video):
  v = dict(id=1, height=H, width=W, length=2, file_names=['a/0.jpg', 'a/1.jpg'])
  v.update(video)
  return dict(videos=[v], categories=[dict(id=1, name='x'), dict(id=2, name='y')],
              annotations=[dict(id=7, video_id=1, category_id=1, iscrowd=0,
                                segmentations=[rle_codes.mask_rle(SQUARE)] * 2,
                                areas=[4.0, 4.0])])


def _result(**kw):
  r = dict(video_id=1, category_id=1, score=0.9,
           segmentations=[rle_codes.mask_rle(SQUARE), None])
  r.update(kw)
  return r


def _write(tmp_path, gt, results) -> tuple[str, str]:
  gt_path, res_path = tmp_path / 'gt.json', tmp_path / 'res.json'
  gt_path.write_text(json.dumps(gt))
  res_path.write_text(json.dumps(results))
  return str(gt_path), str(res_path)


# ------------------------------------------------------------------------------------------------
# Evaluator: malformed RLEs (pycocotools' IoU never returns on counts that miss the frame size).

def _compressed(counts) -> dict:
  return {'size': [H, W], 'counts': counts if isinstance(counts, str) else rle_codes.encode(counts)}


_HANG_CASES = [
    # (which side, frame segmentation, expected problem)
    ('results', _compressed([0, 2, 2, 2]), 'malformed RLE: the runs cover 6 pixels, the frame '
                                           'has 16'),
    ('results', _compressed([0, 2, 2, 2, 11]), 'malformed RLE: the runs cover 17 pixels'),
    ('results', _compressed([0, 2, 5, -1, 10]), 'malformed RLE: run 3 has a negative length'),
    ('results', _compressed('02208P'), 'malformed RLE: the counts string ends inside a run'),
    ('results', _compressed('0220 8'), "malformed RLE: character ' ' at position 4"),
    ('results', _compressed('PPPPPP0'), 'malformed RLE: run 0 of the counts is longer than 6'),
    ('results', _compressed(''), 'malformed RLE: the runs cover 0 pixels'),
    ('results', {'size': [H, W], 'counts': [0, 2, 2, 2]}, 'uncompressed RLE covers 6 pixels, '
                                                          'expected 16'),
    ('results', {'size': [H, W], 'counts': [0, 20, -4]}, 'uncompressed RLE has a negative run '
                                                         'length (-4)'),
    ('results', [[0, 0, 1, 0, math.nan, 1]], 'polygon coordinates must be finite numbers, got '
                                             'nan'),
    ('gt', _compressed([0, 2, 2, 2]), 'malformed RLE: the runs cover 6 pixels, the frame has 16'),
    ('gt', _compressed([0, 2, 2, 2, 10, 3]), 'malformed RLE: the runs cover 19 pixels'),
    ('gt', {'size': [H, W], 'counts': [0, 2, 2, 2]}, 'uncompressed RLE covers 6 pixels'),
]


@pytest.mark.timeout(120)
def test_malformed_masks_raise_instead_of_hanging(tmp_path):
  """In a subprocess with a timeout: on such masks pycocotools loops forever in C, where no
  in-process timeout can interrupt it."""
  paths = []
  for k, (side, seg, _) in enumerate(_HANG_CASES):
    gt, results = _gt(), [_result(), _result()]
    if side == 'gt':
      gt['annotations'][0]['segmentations'][1] = seg
    else:
      results[1]['segmentations'][1] = seg
    case = tmp_path / str(k)
    case.mkdir()
    paths.append(_write(case, gt, results))
  script = ('import json, sys\n'
            'from minvis_jax.ytvis_eval import evaluate\n'
            'for gt, res in json.loads(sys.argv[1]):\n'
            '  try:\n'
            '    evaluate(gt, res)\n'
            '    print("accepted", flush=True)\n'
            '  except ValueError as e:\n'
            '    print(str(e).replace("\\n", " "), flush=True)\n')
  try:
    out = subprocess.run([sys.executable, '-c', script, json.dumps(paths)], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
  except subprocess.TimeoutExpired as e:
    pytest.fail(f'the evaluator hangs on a malformed mask (output so far: {e.stdout!r})')
  lines = out.splitlines()
  assert len(lines) == len(_HANG_CASES)
  for (side, _, problem), (gt_path, res_path), line in zip(_HANG_CASES, paths, lines):
    where = (f'{gt_path}: annotations[0] (id 7) of video 1, frame 1' if side == 'gt' else
             f'{res_path}: result 1 (video 1), frame 1')
    assert line.startswith(f'{where}: {problem}'), (where, problem, line)


def test_valid_rles_of_every_kind_are_accepted():
  # Compressed str and bytes, tuple or numpy sizes, uncompressed counts: the same mask, the same
  # metrics (the track matches at IoU 0.5: its second frame is empty).
  gt = _gt()
  base = evaluate_dicts(gt, [_result()])
  assert base['AP50'] == pytest.approx(1.0) and base['AP'] == pytest.approx(0.1)
  counts = rle_codes.mask_rle(SQUARE)['counts']
  for seg in ({'size': [H, W], 'counts': [0, 2, 2, 2, 10]},
              {'size': (H, W), 'counts': counts.encode()},
              {'size': [np.int64(H), np.int64(W)], 'counts': counts}):
    assert evaluate_dicts(gt, [_result(segmentations=[seg, None])]) == base
  # Polygons (as pycocotools rasterises them).
  poly = [[0.0, 0.0, 1.5, 0.0, 1.5, 1.5, 0.0, 1.5]]
  m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W)))
  assert evaluate_dicts(gt, [_result(segmentations=[poly, None])]) == evaluate_dicts(
      gt, [_result(segmentations=[rle_codes.mask_rle(m), None])])


# ------------------------------------------------------------------------------------------------
# Evaluator: unknown categories are not scored (official), but said once per file.


def test_unknown_result_categories_warn_once_and_are_not_scored(tmp_path):
  gt = _gt()
  good = [_result()]
  stray = [_result(category_id=41), _result(category_id=99, score=0.95),
           _result(category_id=41, score=0.99)]
  gt_path, res_path = _write(tmp_path, gt, good + stray)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    metrics = evaluate(gt_path, res_path)
  assert len(caught) == 1
  assert str(caught[0].message) == (
      f'{res_path}: 3 result(s) have a "category_id" that is not in the ground truth\'s '
      'categories (41, 99); they are not scored')
  assert metrics == evaluate_dicts(gt, good)  # as if they were not there: the official scoring


def test_unknown_ground_truth_categories_warn_once_and_are_not_scored():
  gt = _gt()
  known = evaluate_dicts(gt, [_result()])
  for aid, cat in ((8, 5), (9, 5)):
    gt['annotations'].append(dict(gt['annotations'][0], id=aid, category_id=cat))
  with pytest.warns(UserWarning, match=r'gt\.json: 2 annotation\(s\) have a "category_id" that is '
                                       r'not in "categories" \(5\); they are not scored') as rec:
    metrics = evaluate_dicts(gt, [_result()], gt_name='gt.json')
  assert len(rec) == 1
  assert metrics == known


# ------------------------------------------------------------------------------------------------
# Evaluator: every field of a results file.


@pytest.mark.parametrize('score, problem', [
    (math.nan, '"score" must be finite, got nan'),
    (math.inf, '"score" must be finite, got inf'),
    (-math.inf, '"score" must be finite, got -inf'),
    (True, '"score" must be a number, got True'),
    ('0.5', '"score" must be a number, got \'0.5\''),
    (None, '"score" must be a number, got None'),
    ([0.5], '"score" must be a number, got [0.5]'),
])
def test_bad_scores(tmp_path, score, problem):
  gt_path, res_path = _write(tmp_path, _gt(), [_result(), _result(score=score)])
  with pytest.raises(ValueError) as e:
    evaluate(gt_path, res_path)
  assert str(e.value) == f'{res_path}: result 1 (video 1): {problem}'


def test_nan_score_in_the_json_text(tmp_path):
  # Python's json reads NaN; a NaN score would rank the track last and change AP.
  gt_path, res_path = _write(tmp_path, _gt(), [])
  with open(res_path, 'w') as f:
    f.write('[{"video_id": 1, "category_id": 1, "score": NaN, "segmentations": [null, null]}]')
  with pytest.raises(ValueError, match=r'res\.json: result 0 \(video 1\): "score" must be finite'):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('results, message', [
    ({'video_id': 1}, r'res\.json: expected a JSON list of tracks, got dict'),
    ([[1, 2]], r'res\.json: result 0: expected an object .*got list'),
    (['x'], r'res\.json: result 0: expected an object .*got str'),
    ([None], r'res\.json: result 0: expected an object .*got NoneType'),
])
def test_results_that_are_not_objects(tmp_path, results, message):
  gt_path, res_path = _write(tmp_path, _gt(), results)
  with pytest.raises(ValueError, match=message):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('field', ['video_id', 'category_id', 'score', 'segmentations'])
def test_results_missing_a_field(tmp_path, field):
  r = _result()
  del r[field]
  gt_path, res_path = _write(tmp_path, _gt(), [_result(), r])
  with pytest.raises(ValueError, match=rf"res\.json: result 1.*: missing field '{field}'"):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('change, message', [
    (dict(video_id=7), r"result 1 is for video 7, which the ground truth does not have"),
    (dict(video_id='1'), r"result 1 is for video '1', which the ground truth does not have"),
    (dict(video_id=True), r"result 1 is for video True, which the ground truth does not have"),
    (dict(video_id=[1]), r"result 1 is for video \[1\], which the ground truth does not have"),
    (dict(category_id='1'), r'result 1 \(video 1\): "category_id" must be an integer, got \'1\''),
    (dict(category_id=1.0), r'result 1 \(video 1\): "category_id" must be an integer, got 1.0'),
    (dict(category_id=None), r'result 1 \(video 1\): "category_id" must be an integer'),
    (dict(segmentations=None), r'result 1 \(video 1\): "segmentations" must be a list .*got '
                               r'NoneType'),
    (dict(segmentations={'size': [4, 4]}), r'result 1 \(video 1\): "segmentations" must be a list'),
    (dict(segmentations=[None]), r'result 1 \(video 1\): "segmentations" must be a list of one '
                                 r'RLE or null per frame: got 1 for a video of 2 frames'),
    (dict(segmentations=[None] * 3), r'result 1 \(video 1\): "segmentations" .*got 3 for a video '
                                     'of 2'),
])
def test_results_fields_of_the_wrong_kind(tmp_path, change, message):
  gt_path, res_path = _write(tmp_path, _gt(), [_result(), _result(**change)])
  with pytest.raises(ValueError, match=r'res\.json: ' + message):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('seg, problem', [
    (7, 'a frame segmentation must be an RLE object, polygons or null, got 7'),
    ('abc', 'a frame segmentation must be an RLE object, polygons or null, got abc'),
    ([], 'a frame segmentation must be an RLE object, polygons or null, got []'),
    ({}, 'an RLE needs "size" and "counts", got keys []'),
    ({'size': [H, W]}, 'an RLE needs "size" and "counts", got keys [\'size\']'),
    ({'size': [H, W], 'counts': 5}, 'RLE "counts" must be a string or a list of run lengths, got '
                                    'int'),
    ({'size': [H, W], 'counts': None}, 'RLE "counts" must be a string'),
    ({'size': [4.0, 4], 'counts': '02208'}, 'RLE "size" must be [height, width] (two integers), '
                                            'got [4.0, 4]'),
    ({'size': [True, 4], 'counts': '02208'}, 'RLE "size" must be [height, width]'),
    ({'size': '4x4', 'counts': '02208'}, 'RLE "size" must be [height, width]'),
    ({'size': [4], 'counts': '02208'}, 'RLE "size" must be [height, width]'),
    ({'size': [4, 5], 'counts': '02208'}, 'mask size [4, 5] does not match the frame size [4, 4]'),
    ({'size': [H, W], 'counts': [0, 2.0, 14]}, 'uncompressed RLE counts must be integers, got 2.0'),
    ({'size': [H, W], 'counts': [0, True, 15]}, 'uncompressed RLE counts must be integers, got '
                                                'True'),
    ([[0, 0, 1, 0, '1', 1]], 'polygon coordinates must be finite numbers, got \'1\''),
    ([[0, 0, 1, 0]], 'a polygon needs at least 3 (x, y) points, got 4 coordinates'),
    ([[0, 0, 1, 0, 1, 1, 2]], 'a polygon needs at least 3 (x, y) points, got 7 coordinates'),
    ([5, 6, 7], 'a polygon segmentation must be a list of coordinate lists'),
    ([[0, 0, 1, 0, 1e12, 1]], 'polygon point (1000000000000.0, 1) lies far outside the 4x4 frame'),
])
def test_frame_segmentations_of_the_wrong_kind(tmp_path, seg, problem):
  # (Masks the evaluator used to hang on: test_malformed_masks_raise_instead_of_hanging.)
  for side in ('results', 'gt'):
    gt, results = _gt(), [_result()]
    if side == 'gt':
      gt['annotations'][0]['segmentations'][1] = seg
      where = 'gt.json: annotations[0] (id 7) of video 1, frame 1'
    else:
      results[0]['segmentations'][1] = seg
      where = 'res.json: result 0 (video 1), frame 1'
    with pytest.raises(ValueError) as e:
      evaluate_dicts(gt, results, gt_name='gt.json', results_name='res.json')
    assert str(e.value).startswith(f'{where}: {problem}'), str(e.value)


# ------------------------------------------------------------------------------------------------
# Evaluator: every field of the ground truth.


def test_video_without_length_counts_its_file_names():
  gt = _gt()
  want = evaluate_dicts(gt, [_result()])
  del gt['videos'][0]['length']
  assert evaluate_dicts(gt, [_result()]) == want
  del gt['videos'][0]['file_names']
  with pytest.raises(ValueError, match=r'gt\.json: videos\[0\] \(id 1\): missing field "length" '
                                       r'\(and no "file_names" to count\)'):
    evaluate_dicts(gt, [_result()], gt_name='gt.json')


def _gt_problem(change) -> str:
  gt = _gt()
  change(gt)
  with pytest.raises(ValueError) as e:
    evaluate_dicts(gt, [_result()], gt_name='gt.json', results_name='res.json')
  return str(e.value)


_DELETE = json_edits.DELETE
_V, _A = ('videos', 0), ('annotations', 0)


@pytest.mark.parametrize('path, value, message', [
    (('annotations',), _DELETE, 'gt.json: no "annotations": a split without ground truth cannot '
                                'be scored'),
    (('videos',), _DELETE, "gt.json: missing field 'videos'"),
    (('videos',), {}, 'gt.json: "videos" must be a list, got dict'),
    (('categories',), _DELETE, "gt.json: missing field 'categories'"),
    (('categories', 0), 3, 'gt.json: categories[0]: expected an object, got int'),
    (('categories', 0, 'id'), '1', 'gt.json: categories[0]: "id" must be an integer, got \'1\''),
    (('categories', 1, 'id'), 1, 'gt.json: categories[1]: duplicate category id 1'),
    (('annotations',), {}, 'gt.json: "annotations" must be a list, got dict'),
    (('annotations', 0), [1], 'gt.json: annotations[0]: expected an object, got list'),
    (_V, 'v', 'gt.json: videos[0]: expected an object, got str'),
    ((*_V, 'id'), _DELETE, "gt.json: videos[0]: missing field 'id'"),
    ((*_V, 'id'), 1.5, 'gt.json: videos[0]: "id" must be an integer, got 1.5'),
    ((*_V, 'height'), 0, 'gt.json: videos[0] (id 1): \'height\' must be a positive integer, got 0'),
    ((*_V, 'width'), '4', 'gt.json: videos[0] (id 1): \'width\' must be a positive integer, got '
                          '\'4\''),
    ((*_V, 'width'), _DELETE, "gt.json: videos[0] (id 1): missing field 'width'"),
    ((*_V, 'length'), 3, 'gt.json: videos[0] (id 1): "length" is 3 but "file_names" lists 2 '
                         'frames'),
    ((*_V, 'length'), 2.0, 'gt.json: videos[0] (id 1): "length" must be an integer, got 2.0'),
    ((*_V, 'file_names'), 'a', 'gt.json: videos[0] (id 1): "file_names" must be a list, got str'),
    ((*_A, 'video_id'), 5, 'gt.json: annotations[0] (id 7): "video_id" 5 is not a video of '
                           '"videos"'),
    ((*_A, 'video_id'), _DELETE, "gt.json: annotations[0] (id 7): missing field 'video_id'"),
    ((*_A, 'category_id'), _DELETE, "gt.json: annotations[0] (id 7) of video 1: missing field "
                                    "'category_id'"),
    ((*_A, 'category_id'), [1], 'gt.json: annotations[0] (id 7) of video 1: "category_id" must be '
                                'an integer, got [1]'),
    ((*_A, 'segmentations'), _DELETE, "gt.json: annotations[0] (id 7) of video 1: missing field "
                                      "'segmentations'"),
    ((*_A, 'segmentations'), 'x', 'gt.json: annotations[0] (id 7) of video 1: "segmentations" '
                                  'must be a list of one segmentation or null per frame: got str '
                                  'for a video of 2 frames'),
    ((*_A, 'iscrowd'), 2, 'gt.json: annotations[0] (id 7) of video 1: "iscrowd" must be 0 or 1, '
                          'got 2'),
    ((*_A, 'iscrowd'), '0', 'gt.json: annotations[0] (id 7) of video 1: "iscrowd" must be 0 or 1'),
    ((*_A, 'areas'), [4.0], 'gt.json: annotations[0] (id 7) of video 1: "areas" must be a list of '
                            '2 per-frame areas or nulls, got 1'),
    ((*_A, 'areas'), [4.0, -1], 'gt.json: annotations[0] (id 7) of video 1: "areas" of frame 1 '
                                'must be a non-negative number or null, got -1'),
    ((*_A, 'areas'), [4.0, '4'], 'gt.json: annotations[0] (id 7) of video 1: "areas" of frame 1 '
                                 'must be a non-negative number or null, got \'4\''),
    ((*_A, 'occlusion'), ['no_occlusion', ['x']], 'gt.json: annotations[0] (id 7) of video 1: '
                                                  'unknown occlusion level [\'x\'] at frame 1'),
    ((*_A, 'occlusion'), ['no_occlusion'], 'gt.json: annotations[0] (id 7) of video 1: '
                                           '"occlusion" has 1 levels for a video of 2 frames'),
    ((*_V, 'width'), 2 ** 30, 'gt.json: videos[0] (id 1): a 4x1073741824 frame is larger than'),
])
def test_ground_truth_fields_of_the_wrong_kind(path, value, message):
  assert _gt_problem(json_edits.set_at(path, value)).startswith(message)


def test_duplicate_video_ids():
  def change(gt):
    gt['videos'].append(dict(gt['videos'][0]))
  assert _gt_problem(change) == 'gt.json: videos[1]: duplicate video id 1 (also videos[0])'


def test_ground_truth_that_is_not_an_object(tmp_path):
  gt_path, res_path = _write(tmp_path, [1, 2], [])
  with pytest.raises(ValueError, match=r'gt\.json: expected a YouTube-VIS JSON object, got list'):
    evaluate(gt_path, res_path)


def test_duplicate_annotation_ids_in_the_ground_truth_name_both_records():
  def change(gt):
    gt['annotations'].append(dict(gt['annotations'][0]))
  assert _gt_problem(change) == ('gt.json: annotations[1]: duplicate annotation id 7 (also '
                                 'annotations[0])')
