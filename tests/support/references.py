"""Independent references that tests and benchmarks compare against: the original's per-frame
association loop (numpy + scipy), pycocotools' COCOeval over single-frame videos, and random
single-frame evaluation cases."""

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment


# YouTube-VIS area ranges (all, small, medium, large), docs/method.md §5.
YTVIS_AREAS = [[0, 1e10], [0, 128 ** 2], [128 ** 2, 256 ** 2], [256 ** 2, 1e10]]


def scipy_loop(embds: np.ndarray) -> np.ndarray:
  """The original MinVIS association, frame by frame with numpy and scipy.

  embds: [T, Q, C] per-frame query embeddings. Returns [T, Q] permutations: row t lists, for each
  track, the query of frame t that continues it (frame 0 is the identity).
  """
  unit = embds / np.linalg.norm(embds, axis=-1, keepdims=True)
  previous = unit[0]
  perms = [np.arange(unit.shape[1])]
  for t in range(1, len(unit)):
    _, cols = linear_sum_assignment(1 - previous @ unit[t].T)
    perms.append(cols)
    previous = unit[t][cols]
  return np.stack(perms)


def rle(mask: np.ndarray) -> dict:
  """[H, W] binary mask -> compressed RLE with a str `counts` (JSON-ready)."""
  r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  r['counts'] = r['counts'].decode()
  return r


def box_mask(rng, h: int, w: int) -> np.ndarray:
  """A random box of at least 4x4 pixels in an [h, w] uint8 mask."""
  m = np.zeros((h, w), np.uint8)
  y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
  m[y0:y0 + rng.integers(4, h - y0 + 1), x0:x0 + rng.integers(4, w - x0 + 1)] = 1
  return m


def single_frame_case(seed: int) -> tuple[dict, list[dict]]:
  """(ground truth, results) of 300x400 single-frame videos: jittered detections of the
  ground-truth boxes (some with the wrong class), false positives and tied scores."""
  rng = np.random.default_rng(seed)
  n_videos, n_cats = int(rng.integers(1, 6)), int(rng.integers(1, 4))
  h, w = 300, 400  # large enough for all three YouTube-VIS area ranges
  videos, anns, results = [], [], []
  for v in range(1, n_videos + 1):
    videos.append(dict(id=v, height=h, width=w, length=1, file_names=[f'{v}/0.jpg']))
    for _ in range(int(rng.integers(0, 4))):
      m = box_mask(rng, h, w)
      cat = int(rng.integers(1, n_cats + 1))
      anns.append(dict(id=len(anns) + 1, video_id=v, category_id=cat, iscrowd=0,
                       segmentations=[rle(m)], areas=[float(m.sum())]))
      if rng.random() < 0.8:  # a detection of it, shifted
        dm = np.roll(m, (int(rng.integers(-20, 20)), int(rng.integers(-20, 20))), axis=(0, 1))
        results.append(dict(video_id=v, category_id=cat if rng.random() < 0.8 else 1,
                            score=float(rng.choice([0.5, 0.7, rng.random()])),
                            segmentations=[rle(dm)]))
    for _ in range(int(rng.integers(0, 3))):  # false positives, tied scores
      results.append(dict(video_id=v, category_id=int(rng.integers(1, n_cats + 1)),
                          score=float(rng.choice([0.5, 0.9])),
                          segmentations=[rle(box_mask(rng, h, w))]))
  cats = [dict(id=c, name=f'c{c}') for c in range(1, n_cats + 1)]
  return dict(videos=videos, annotations=anns, categories=cats), results


def coco_eval(gt, results, gt_areas=None, det_area=None, area_ranges=YTVIS_AREAS):
  """pycocotools COCOeval (segm) over single-frame videos, run (evaluate + accumulate).

  gt_areas: annotation id -> area (default: the JSON's); det_area: one area for every detection
  (default: computed from its mask)."""
  images = [dict(id=v['id'], height=v['height'], width=v['width']) for v in gt['videos']]
  anns = [dict(id=a['id'], image_id=a['video_id'], category_id=a['category_id'], iscrowd=0,
               segmentation=a['segmentations'][0],
               area=gt_areas[a['id']] if gt_areas else a['areas'][0],
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
    if det_area is not None:
      for d in res.dataset['annotations']:
        d['area'] = det_area
    ev = COCOeval(coco, res, 'segm')
    ev.params.areaRng = [list(r) for r in area_ranges]
    ev.params.areaRngLbl = ['all', 'small', 'medium', 'large'][:len(area_ranges)]
    ev.evaluate()
    ev.accumulate()
  return ev


def cocoeval(gt: dict, results: list[dict]) -> dict:
  """COCOeval's summary of `coco_eval`: {AP, AP50, AP75, APs, APm, APl, AR1, AR10}."""
  ev = coco_eval(gt, results)
  with contextlib.redirect_stdout(io.StringIO()):
    ev.summarize()
  s = ev.stats
  return dict(AP=s[0], AP50=s[1], AP75=s[2], APs=s[3], APm=s[4], APl=s[5], AR1=s[6], AR10=s[7])
