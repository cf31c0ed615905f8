"""COCOeval's matching and accumulation for video tracks, vectorised over flat track arrays: track
IoU (sum over frames of intersection / sum over frames of union), greedy matching per (video,
category) at every IoU threshold and ignore configuration, and interpolated precision / recall
(docs/method.md §5). The file-facing side (parsing, checking, summary) is ytvis_eval.py.
"""

import numpy as np
from pycocotools import mask as mask_utils

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)

class Tracks:
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


def track_ious(dts: Tracks, gts: Tracks, d_sel, g_sel, rles, frame_areas, d_total, g_total,
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

def rank_detections(dts: Tracks, d_score: np.ndarray,
                    gts: Tracks) -> tuple[np.ndarray, np.ndarray]:
  """rank [nD]: a detection's place among those of its (video, category) by decreasing score
  (stable: ties keep file order; MAX_DETS[-1] for unknown categories); g_local [nG]: a ground
  truth's place within its (video, category), in annotation order."""
  known = np.flatnonzero(dts.cat >= 0)
  order, rank_sorted = _rank_in_group([np.arange(len(d_score))[known], -d_score[known],
                                       dts.key[known]])
  rank = np.full(len(d_score), MAX_DETS[-1], np.int64)
  rank[known[order]] = rank_sorted
  g_known = np.flatnonzero(gts.cat >= 0)
  g_order, g_rank_sorted = _rank_in_group([g_known, gts.key[g_known]])
  g_local = np.zeros(len(gts.cat), np.int64)
  g_local[g_known[g_order]] = g_rank_sorted
  return rank, g_local

def match_tracks(dts: Tracks, gts: Tracks, g_crowd: np.ndarray, kept: np.ndarray,
                 rank: np.ndarray, g_local: np.ndarray, g_ignore: np.ndarray, ious_of):
  """COCO matching of the kept detections, batched over the (video, category) pairs that have
  both sides -> matched, matched to an ignored ground truth: bool [nD, S, T].

  kept [nD] bool, rank [nD], g_local [nG] from `rank_detections`; g_crowd [nG]; g_ignore [S, nG];
  ious_of(d_sel, g_sel) -> (detection, ground truth, IoU) of every overlapping pair of those
  detections and ground truths (`track_ious`)."""
  S, T = len(g_ignore), len(IOU_THRESHOLDS)
  matched = np.zeros((len(rank), S, T), bool)
  to_ignored = np.zeros((len(rank), S, T), bool)
  pair_keys = np.intersect1d(dts.key[kept], gts.key[gts.cat >= 0])
  if not len(pair_keys):
    return matched, to_ignored
  d_pair = np.searchsorted(pair_keys, dts.key)
  d_sel = np.flatnonzero(kept & (pair_keys[np.minimum(d_pair, len(pair_keys) - 1)] == dts.key))
  g_pair = np.searchsorted(pair_keys, gts.key)
  g_sel = np.flatnonzero((gts.cat >= 0)
                         & (pair_keys[np.minimum(g_pair, len(pair_keys) - 1)] == gts.key))
  e_d, e_g, e_iou = ious_of(d_sel, g_sel)
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
  return matched, to_ignored


def accumulate(dts: Tracks, d_score: np.ndarray, kept: np.ndarray, rank: np.ndarray,
               tp_hits: np.ndarray, fp_hits: np.ndarray, gts: Tracks, g_ignore: np.ndarray,
               num_cats: int) -> tuple[np.ndarray, np.ndarray]:
  """COCO accumulation per category over detections sorted by score (stable over the per-video
  lists, concatenated in video order, as COCOeval) -> precision [T, R, K, S] and recall of all
  areas at the smaller maxDets [T, K, 2] (AR1, AR10); -1 where a category has no ground truth."""
  S, T, K = len(g_ignore), len(IOU_THRESHOLDS), num_cats
  precision = -np.ones((T, len(RECALL_THRESHOLDS), K, S))
  recall = -np.ones((T, K, len(MAX_DETS) - 1))
  d_kept = np.flatnonzero(kept)
  acc = d_kept[np.lexsort((d_kept, dts.video[d_kept], -d_score[d_kept], dts.cat[d_kept]))]
  bounds = np.searchsorted(dts.cat[acc], np.arange(K + 1))
  g_known = np.flatnonzero(gts.cat >= 0)
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
  return precision, recall
