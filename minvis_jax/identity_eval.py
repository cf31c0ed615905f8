"""Identity metrics of video instance segmentation results against YouTube-VIS ground truth, both
class-agnostic, on per-frame masks: ID switches and IDF1 / IDP / IDR (Ristani et al. 2016,
"Performance Measures and a Data Set for Multi-Target, Multi-Camera Tracking").

A predicted track *detects* a ground-truth instance in a frame when their masks have IoU >= 0.5
(`min_iou`); a frame where the instance's segmentation is null or empty is hidden.

ID switches (`id_switches`) look at every result of a video (its top-k tracks): in each frame
where an instance is visible, the track with the highest IoU among them is its track (frames where
that IoU is below `min_iou` are skipped); every change of that track between consecutive detected
frames (across hidden frames too) is one switch.

IDF1 (`idf1`) needs a set of predicted trajectories rather than ranked results: a result is a
predicted track when its score is at least `min_score` (0.5). One track's class scores are a
softmax that leaves some probability to "no object", so at most one (track, class) result of a
track passes 0.5 and no track counts twice; the threshold is fixed in advance, never tuned. Each
frame where a predicted track's mask is not empty is a predicted detection, each visible frame of
an instance a ground-truth detection. Per video, the one-to-one assignment between instances and
predicted tracks that maximises the ID true positives (IDTP: frames where the assigned pair
overlaps at IoU >= `min_iou`; unassigned ones have none) is found with `linear_sum_assignment`;
the counts are summed over videos and
IDP = IDTP / predicted detections, IDR = IDTP / ground-truth detections,
IDF1 = 2 IDTP / (ground-truth + predicted detections).
Checked against py-motmetrics and a brute force over all assignments (tests/test_identity_eval.py).
"""

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment


def _rle(seg):
  """A compressed RLE of `seg` (compressed or uncompressed RLE dict), or None when it is null."""
  if seg is None:
    return None
  if isinstance(seg['counts'], list):
    return mask_utils.frPyObjects(seg, *seg['size'])
  return seg


def _by_video(items: list[dict]) -> dict:
  out = {}
  for item in items:
    out.setdefault(item['video_id'], []).append(item)
  return out


def id_switches(gt: dict, results: list[dict], min_iou: float = 0.5) -> int:
  """Identity switches over all ground-truth instances of `gt` (module docstring)."""
  by_video = _by_video(results)
  switches = 0
  for ann in gt['annotations']:
    tracks = by_video.get(ann['video_id'], [])
    last = None
    for f, seg in enumerate(ann['segmentations']):
      if seg is None or not tracks:
        continue
      ious = mask_utils.iou([_rle(tr['segmentations'][f]) for tr in tracks], [_rle(seg)], [0])
      best = int(np.argmax(ious[:, 0]))
      if ious[best, 0] < min_iou:
        continue
      switches += int(last is not None and best != last)
      last = best
  return switches


def _present(segs: list) -> list:
  """Per frame, the compressed RLE of a non-empty mask, else None."""
  rles = [_rle(s) for s in segs]
  return [r if r is not None and mask_utils.area(r) > 0 else None for r in rles]


def video_overlaps(gt_segs: list[list], pred_segs: list[list], min_iou: float = 0.5):
  """For one video, `gt_segs` [G][T] and `pred_segs` [P][T] (RLE or None per frame) ->
  (overlap [G, P]: frames where the pair has IoU >= min_iou, ground-truth detections,
  predicted detections)."""
  gts = [_present(s) for s in gt_segs]
  preds = [_present(s) for s in pred_segs]
  overlap = np.zeros((len(gts), len(preds)), np.int64)
  frames = max([len(s) for s in gts + preds], default=0)
  for f in range(frames):
    g_idx = [g for g, s in enumerate(gts) if f < len(s) and s[f] is not None]
    p_idx = [p for p, s in enumerate(preds) if f < len(s) and s[f] is not None]
    if g_idx and p_idx:
      ious = mask_utils.iou([preds[p][f] for p in p_idx], [gts[g][f] for g in g_idx],
                            [0] * len(g_idx))   # [P', G']
      hit = np.asarray(ious).T >= min_iou
      overlap[np.ix_(g_idx, p_idx)] += hit
  gt_dets = sum(s is not None for segs in gts for s in segs)
  pred_dets = sum(s is not None for segs in preds for s in segs)
  return overlap, gt_dets, pred_dets


def idf1(gt: dict, results: list[dict], min_score: float = 0.5, min_iou: float = 0.5) -> dict:
  """IDF1, IDP, IDR (fractions) and the counts IDTP, gt_dets, pred_dets, pred_tracks of
  `results` (those with score >= min_score) against `gt` (module docstring). A metric whose
  denominator is 0 is 0."""
  preds = _by_video([r for r in results if r['score'] >= min_score])
  anns = _by_video(gt['annotations'])
  idtp = gt_dets = pred_dets = 0
  for video in {v['id'] for v in gt.get('videos', [])} | set(anns) | set(preds):
    overlap, g, p = video_overlaps([a['segmentations'] for a in anns.get(video, [])],
                                   [r['segmentations'] for r in preds.get(video, [])], min_iou)
    if overlap.size:
      rows, cols = linear_sum_assignment(overlap, maximize=True)
      idtp += int(overlap[rows, cols].sum())
    gt_dets += g
    pred_dets += p
  ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
  return {'IDF1': ratio(2 * idtp, gt_dets + pred_dets), 'IDP': ratio(idtp, pred_dets),
          'IDR': ratio(idtp, gt_dets), 'IDTP': idtp, 'gt_dets': gt_dets, 'pred_dets': pred_dets,
          'pred_tracks': sum(len(v) for v in preds.values())}
