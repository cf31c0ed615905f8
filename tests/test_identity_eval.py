"""IDF1 / IDP / IDR and ID switches (minvis_jax/identity_eval.py) on a case worked out by hand, at
the IoU threshold, and on random videos against py-motmetrics (when installed: the `test` extra)
and a brute force over every one-to-one assignment, both fed IoUs computed here on dense masks."""

import itertools

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from minvis_jax import identity_eval

H, W = 8, 8


def rle(mask):
  """Dense bool [H, W] -> compressed RLE (counts as str, as results and ground truth are)."""
  r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'size': r['size'], 'counts': r['counts'].decode()}


def box(r0, r1, c0, c1):
  m = np.zeros((H, W), bool)
  m[r0:r1, c0:c1] = True
  return m


EMPTY = np.zeros((H, W), bool)
A, B, BG = box(0, 2, 0, 4), box(4, 6, 0, 4), box(6, 8, 4, 8)   # 8 px each, disjoint


def dataset(gt_videos, pred_videos):
  """gt_videos / pred_videos: {video: [per instance / track: [T] dense mask or None]} (a
  prediction is (score, masks)) -> (ground truth dict, results list)."""
  gt = {'videos': [{'id': v} for v in gt_videos], 'annotations': []}
  for v, insts in gt_videos.items():
    for masks in insts:
      gt['annotations'].append({'video_id': v, 'category_id': 1, 'segmentations': [
          None if m is None else rle(m) for m in masks]})
  results = [{'video_id': v, 'category_id': 1, 'score': s,
              'segmentations': [rle(EMPTY if m is None else m) for m in masks]}
             for v, tracks in pred_videos.items() for s, masks in tracks]
  return gt, results


def test_hand_case():
  # Instance a visible in frames 0-3, b in 0-1 (hidden after). Track x follows a in frames 0-1 and
  # is empty after; y follows b in 0-1 then takes over a (a switch); z follows a throughout but
  # scores 0.3 (not a predicted track); w (0.6) is a false positive on background in frame 0.
  a = [A, A, A, A]
  b = [B, B, None, None]
  x = (0.9, [A, A, None, None])
  y = (0.8, [B, B, A, A])
  z = (0.3, [A, A, A, A])
  w = (0.6, [BG, None, None, None])
  gt, results = dataset({1: [a, b]}, {1: [x, y, z, w]})
  m = identity_eval.idf1(gt, results)
  # Overlaps: a-x 2, a-y 2, b-y 2, b-x 0 -> best one-to-one a-x + b-y = 4 IDTP.
  # Ground-truth detections 4 + 2 = 6; predicted detections 2 + 4 + 1 = 7 (z excluded).
  assert (m['IDTP'], m['gt_dets'], m['pred_dets'], m['pred_tracks']) == (4, 6, 7, 3)
  assert m['IDF1'] == pytest.approx(8 / 13)
  assert m['IDP'] == pytest.approx(4 / 7)
  assert m['IDR'] == pytest.approx(4 / 6)
  # With every result a track (threshold 0): z adds 4 predicted detections and takes a (4 IDTP),
  # y keeps b: 6 IDTP of 6 + 11.
  m0 = identity_eval.idf1(gt, results, min_score=0.0)
  assert (m0['IDTP'], m0['pred_dets'], m0['IDF1']) == (6, 11, pytest.approx(12 / 17))
  # ID switches over all results: a is best matched by x in 0-1 (x comes before z, a tie) and by
  # y or z in 2-3 (y comes first): one switch; b none.
  assert identity_eval.id_switches(gt, results) == 1


def test_iou_threshold_is_inclusive_and_videos_add_up():
  half = A | box(2, 4, 0, 4)                    # 16 px holding A's 8: IoU exactly 0.5
  under = A | box(2, 4, 0, 4) | box(4, 5, 0, 1)  # 17 px: IoU 8/17 < 0.5
  gt, results = dataset({1: [[A]], 2: [[A]]}, {1: [(0.9, [half])], 2: [(0.9, [under])]})
  m = identity_eval.idf1(gt, results)
  assert (m['IDTP'], m['gt_dets'], m['pred_dets']) == (1, 2, 2)
  assert m['IDF1'] == pytest.approx(0.5)


def test_no_predicted_track_or_no_ground_truth():
  gt, results = dataset({1: [[A, B]]}, {1: [(0.2, [A, B])]})
  assert identity_eval.idf1(gt, results)['IDF1'] == 0.0
  gt, results = dataset({1: []}, {1: [(0.9, [A, B])]})
  m = identity_eval.idf1(gt, results)
  assert (m['IDF1'], m['IDP'], m['pred_dets']) == (0.0, 0.0, 2)


def random_case(rng, videos=3, frames=5):
  """Random videos: instances on a 2 x 2 grid of cells, visible or hidden per frame; tracks that
  copy an instance's cell (maybe another's, maybe shifted by a pixel: IoU 0.6 or 0.33) or are
  empty, with random scores."""
  cells = [box(r, r + 4, c, c + 4) for r in (0, 4) for c in (0, 4)]
  gt_videos, pred_videos = {}, {}
  for v in range(videos):
    n_gt, n_pred = rng.integers(1, 4), rng.integers(1, 5)
    gt_videos[v] = [[cells[g] if rng.random() < 0.8 else None for _ in range(frames)]
                    for g in range(n_gt)]
    tracks = []
    for _ in range(n_pred):
      masks = []
      for _ in range(frames):
        u = rng.random()
        cell = cells[rng.integers(0, 4)]
        masks.append(None if u < 0.2 else cell if u < 0.7
                     else np.roll(cell, 1, axis=int(rng.integers(0, 2))) if u < 0.85
                     else np.roll(cell, 2, axis=1))
      tracks.append((float(rng.random()), masks))
    pred_videos[v] = tracks
  return gt_videos, pred_videos


def dense_iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def brute_force(gt_videos, pred_videos, min_score=0.5):
  """IDF1 by trying every one-to-one assignment per video, IoU on the dense masks."""
  idtp = gt_dets = pred_dets = 0
  for v, insts in gt_videos.items():
    tracks = [m for s, m in pred_videos[v] if s >= min_score]
    present = lambda m: m is not None and m.any()  # noqa: E731
    gt_dets += sum(present(m) for ms in insts for m in ms)
    pred_dets += sum(present(m) for ms in tracks for m in ms)
    hits = [[sum(present(g) and present(p) and dense_iou(g, p) >= 0.5 for g, p in zip(gs, ps))
             for ps in tracks] for gs in insts]
    slots = list(range(len(tracks))) + [None] * len(insts)
    idtp += max(sum(hits[g][p] for g, p in enumerate(perm) if p is not None)
                for perm in itertools.permutations(slots, len(insts)))
  return 2 * idtp / (gt_dets + pred_dets), idtp / pred_dets, idtp / gt_dets


@pytest.mark.parametrize('seed', range(20))
def test_random_against_brute_force(seed):
  gt_videos, pred_videos = random_case(np.random.default_rng(seed))
  m = identity_eval.idf1(*dataset(gt_videos, pred_videos))
  assert (m['IDF1'], m['IDP'], m['IDR']) == pytest.approx(brute_force(gt_videos, pred_videos))


@pytest.mark.parametrize('seed', range(20))
def test_random_against_motmetrics(seed):
  mm = pytest.importorskip('motmetrics')
  gt_videos, pred_videos = random_case(np.random.default_rng(seed))
  accs = []
  for v, insts in gt_videos.items():
    tracks = [m for s, m in pred_videos[v] if s >= 0.5]
    acc = mm.MOTAccumulator(auto_id=True)
    for f in range(len(insts[0])):
      g_ids = [g for g, ms in enumerate(insts) if ms[f] is not None and ms[f].any()]
      p_ids = [p for p, ms in enumerate(tracks) if ms[f] is not None and ms[f].any()]
      # Distance 1 - IoU, NaN (may not pair) below IoU 0.5.
      dist = [[1 - dense_iou(insts[g][f], tracks[p][f])
               if dense_iou(insts[g][f], tracks[p][f]) >= 0.5 else np.nan for p in p_ids]
              for g in g_ids]
      acc.update(g_ids, p_ids, np.array(dist, float).reshape(len(g_ids), len(p_ids)))
    accs.append(acc)
  summary = mm.metrics.create().compute_many(
      accs, metrics=['idf1', 'idp', 'idr'], names=[str(v) for v in gt_videos],
      generate_overall=True)
  ref = summary.loc['OVERALL']
  m = identity_eval.idf1(*dataset(gt_videos, pred_videos))
  assert (m['IDF1'], m['IDP'], m['IDR']) == pytest.approx(
      (ref['idf1'], ref['idp'], ref['idr']))
