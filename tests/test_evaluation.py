"""The YouTube-VIS metric: equal to pycocotools COCOeval on single-frame videos, hand cases, errors."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minvis_jax.evaluation import evaluate, evaluate_dicts

YTVIS_AREAS = [[0, 1e10], [0, 128 ** 2], [128 ** 2, 256 ** 2], [256 ** 2, 1e10]]
KEYS = ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10']


def _rle(mask):
  r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  r['counts'] = r['counts'].decode()
  return r


def _box_mask(rng, h, w):
  m = np.zeros((h, w), np.uint8)
  y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
  m[y0:y0 + rng.integers(4, h - y0 + 1), x0:x0 + rng.integers(4, w - x0 + 1)] = 1
  return m


def _random_case(seed):
  """Single-frame videos with jittered predictions of ground-truth boxes plus false positives."""
  rng = np.random.default_rng(seed)
  n_videos, n_cats = int(rng.integers(1, 6)), int(rng.integers(1, 4))
  h, w = 300, 400  # large enough for all three YouTube-VIS area ranges
  videos, anns, results = [], [], []
  for v in range(1, n_videos + 1):
    videos.append(dict(id=v, height=h, width=w, length=1, file_names=[f'{v}/0.jpg']))
    for _ in range(int(rng.integers(0, 4))):
      m = _box_mask(rng, h, w)
      cat = int(rng.integers(1, n_cats + 1))
      anns.append(dict(id=len(anns) + 1, video_id=v, category_id=cat, iscrowd=0,
                       segmentations=[_rle(m)], areas=[float(m.sum())]))
      if rng.random() < 0.8:  # a detection of it, shifted
        dm = np.roll(m, (int(rng.integers(-20, 20)), int(rng.integers(-20, 20))), axis=(0, 1))
        results.append(dict(video_id=v, category_id=cat if rng.random() < 0.8 else 1,
                            score=float(rng.choice([0.5, 0.7, rng.random()])),
                            segmentations=[_rle(dm)]))
    for _ in range(int(rng.integers(0, 3))):  # false positives, tied scores
      results.append(dict(video_id=v, category_id=int(rng.integers(1, n_cats + 1)),
                          score=float(rng.choice([0.5, 0.9])), segmentations=[_rle(_box_mask(rng, h, w))]))
  cats = [dict(id=c, name=f'c{c}') for c in range(1, n_cats + 1)]
  return dict(videos=videos, annotations=anns, categories=cats), results


def _cocoeval(gt, results):
  images = [dict(id=v['id'], height=v['height'], width=v['width']) for v in gt['videos']]
  anns = [dict(id=a['id'], image_id=a['video_id'], category_id=a['category_id'], iscrowd=0,
               segmentation=a['segmentations'][0], area=a['areas'][0],
               bbox=list(mask_utils.toBbox(a['segmentations'][0]))) for a in gt['annotations']]
  coco = COCO()
  coco.dataset = dict(images=images, annotations=anns, categories=gt['categories'])
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
    dets = [dict(image_id=r['video_id'], category_id=r['category_id'], score=r['score'],
                 segmentation=r['segmentations'][0]) for r in results]
    res = coco.loadRes(dets) if dets else COCO()
    if not dets:
      res.dataset = dict(images=images, annotations=[], categories=gt['categories'])
      res.createIndex()
    ev = COCOeval(coco, res, 'segm')
    ev.params.areaRng = YTVIS_AREAS
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  s = ev.stats
  return dict(AP=s[0], AP50=s[1], AP75=s[2], APs=s[3], APm=s[4], APl=s[5], AR1=s[6], AR10=s[7])


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
  a = z.copy(); a[:2, :2] = 1        # 4 px
  b = z.copy(); b[:2, :] = 1         # 8 px
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
  big = np.zeros((300, 300), np.uint8); big[:200, :200] = 1          # 40000 px: medium
  small = np.zeros((300, 300), np.uint8); small[:10, :10] = 1         # small
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
       r'mask size \[5, 4\] != video size \[4, 4\]'),
      ([dict(video_id=1, category_id=1, score=1.0, segmentations=_video([one]))],
       '1 frame segmentations for a video of 2 frames')]:
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
