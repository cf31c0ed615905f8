"""The 'ctvis' tracker (minvis_jax/tracking.py): a numpy loop of the same rule, chunked streaming,
a fixed-size state, births and retirements, re-identification after a gap, and its video-level
results through the predictor."""

import numpy as np
import pytest

from minvis_jax import config_lib
from minvis_jax import tracking


def ctvis_loop(embds, scores, valid, min_score, match, retire, max_tracks, cache):
  """The 'ctvis' rule, frame by frame in float64 with Python loops -> (index [T, M], born [T, M],
  alive [T, M]); written from the rule in `associate_ctvis_chunk`'s docstring."""
  t, q, c = embds.shape
  memory = np.zeros((max_tracks, c))
  recent = [[] for _ in range(max_tracks)]       # the last `cache` matched embeddings
  count = np.zeros(max_tracks, int)
  alive = np.zeros(max_tracks, bool)
  unseen = np.zeros(max_tracks, int)
  out_index = np.full((t, max_tracks), -1)
  out_born = np.zeros((t, max_tracks), bool)
  out_alive = np.zeros((t, max_tracks), bool)
  for f in range(t):
    if not valid[f]:
      out_alive[f] = alive
      continue
    e, s = embds[f].astype(np.float64), scores[f].astype(np.float64)
    conf = [j for j in sorted(range(q), key=lambda j: (-s[j], j)) if s[j] >= min_score]
    live = [i for i in range(max_tracks) if alive[i]]
    sim = np.zeros((q, max_tracks))
    if conf and live:
      d = e @ memory[live].T                        # [Q, live]
      rows = np.exp(d - d.max(1, keepdims=True))
      rows /= rows.sum(1, keepdims=True)            # each query over the live tracks
      columns = np.exp(d - d.max(0, keepdims=True))
      columns /= columns.sum(0, keepdims=True)      # each track over all queries
      sim[np.ix_(conf, live)] = 0.5 * (rows + columns)[conf]
    index = np.full(max_tracks, -1)
    for j in conf:
      cands = [i for i in live if index[i] < 0 and sim[j, i] > match]
      if not cands:
        continue
      if len(cands) == 1:
        best = cands[0]
      else:
        best = max(cands, key=lambda i: (sim[j, i] * count[i], -i))
      index[best] = j
    for i in live:
      if index[i] >= 0:
        x = e[index[i]]
        cos = [x @ r / (np.linalg.norm(x) * np.linalg.norm(r)) for r in recent[i]]
        beta = max(0.0, float(np.mean(cos)))
        memory[i] = (1 - beta) * memory[i] + beta * x
        recent[i] = (recent[i] + [x])[-cache:]
        count[i] += 1
        unseen[i] = 0
      else:
        unseen[i] += 1
        if unseen[i] >= retire:
          alive[i] = False
    new = [j for j in conf if j not in index]
    free = [i for i in range(max_tracks) if not alive[i]]
    for j, i in zip(new, free):
      index[i] = j
      out_born[f, i] = True
      memory[i] = e[j]
      recent[i] = [e[j]]
      count[i], unseen[i], alive[i] = 1, 0, True
    out_index[f], out_alive[f] = index, alive
  return out_index, out_born, out_alive


def softmax_max(logits):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True))[..., :-1].max(-1)


def objects_video(t, q, c, k, seed, objects=6):
  """`objects` instances with distinctive drifting embeddings that appear, vanish and come back in
  random query slots; the other queries hold background (low foreground score, random
  embeddings). -> embds [T, Q, C], class logits [T, Q, K+1]."""
  rng = np.random.default_rng(seed)
  base = 3 * rng.normal(size=(objects, c))
  embds = rng.normal(size=(t, q, c))
  fg = rng.uniform(0.0, 0.3, size=(t, q))
  for f in range(t):
    base = base + 0.2 * rng.normal(size=base.shape)
    present = np.flatnonzero(rng.uniform(size=objects) < 0.7)
    slots = rng.permutation(q)[:len(present)]
    embds[f, slots] = base[present] + 0.3 * rng.normal(size=(len(present), c))
    fg[f, slots] = rng.uniform(0.5, 1.0, size=len(present))
  share = np.r_[0.8, np.full(k - 1, 0.2 / (k - 1))]   # class 0 holds most of the foreground
  logits = np.log(np.concatenate([fg[..., None] * share, 1 - fg[..., None]], -1))
  return embds.astype(np.float32), logits.astype(np.float32)


def run(tracker, embds, logits, valid=None, window=None):
  """`track_chunk` over windows of `window` frames (the last one padded with invalid frames, as
  the predictor does) -> (TrackFrames as numpy [T, M], final state)."""
  t, q, c = embds.shape
  valid = np.ones(t, bool) if valid is None else valid
  window = window or t
  state = tracking.initial_state(tracker, q, c)
  parts = []
  for start in range(0, t, window):
    chunk = slice(start, start + window)
    e, lg, ok = embds[chunk], logits[chunk], valid[chunk]
    pad = window - len(e)
    e = np.concatenate([e, np.zeros((pad,) + e.shape[1:], e.dtype)])
    lg = np.concatenate([lg, np.zeros((pad,) + lg.shape[1:], lg.dtype)])
    ok = np.concatenate([ok, np.zeros(pad, bool)])
    state, out = tracking.track_chunk(tracker, state, e, lg, ok)
    parts.append([np.asarray(x)[:window - pad] for x in out] if tracker.kind == 'ctvis' else
                 [np.asarray(out)[:window - pad]])
  out = [np.concatenate(x) for x in zip(*parts)]
  return (tracking.TrackFrames(*out) if tracker.kind == 'ctvis' else out[0]), state


def ctvis(score=0.35, match=0.3, retire=3, cache=4, max_tracks=8, embedding='decoder'):
  return tracking.Tracker('ctvis', 0.7, 0.0, embedding, score, match, retire, cache, max_tracks)


@pytest.mark.parametrize('seed,params', [
    (0, dict()),
    (1, dict(match=0.5, retire=2, max_tracks=5)),        # capacity runs out: births are refused
    (2, dict(score=0.2, match=0.1, retire=5, cache=2, max_tracks=12)),
])
def test_equals_numpy_reference_whole_and_in_chunks(seed, params):
  embds, logits = objects_video(30, 10, 6, 3, seed)
  valid = np.ones(30, bool)
  valid[[0, 9, 10, 29]] = False
  tracker = ctvis(**params)
  ref = ctvis_loop(embds, softmax_max(logits), valid, tracker.score, tracker.match,
                   tracker.retire_frames, tracker.max_tracks, tracker.cache)
  # The clip exercises every rule: matches, births after the first frame, retirements, reuse.
  index, born, alive = ref
  assert (index >= 0).sum() > born.sum() > born[1].sum() > 0
  assert (alive[:-1] & ~alive[1:]).any()
  assert born[:, born.any(0)].sum(0).max() >= 2        # a column holds a second track
  for window in (None, 1, 3, 7):
    got, _ = run(tracker, embds, logits, valid, window)
    for name, a, b in zip(tracking.TrackFrames._fields, got, ref):
      np.testing.assert_array_equal(a, b, err_msg=f'{name}, window {window}')


def test_state_size_does_not_depend_on_the_video_length():
  tracker = ctvis()
  sizes = []
  for t in (5, 40):
    embds, logits = objects_video(t, 10, 6, 3, seed=3)
    _, state = run(tracker, embds, logits, window=5)
    sizes.append([x.shape for x in state])
  assert sizes[0] == sizes[1]
  assert sizes[0][:2] == [(8, 6), (8, 4, 6)]       # [M, C], [M, K, C]
  # max_tracks 0: twice the queries.
  assert tracking.initial_state(ctvis(max_tracks=0), 10, 6).memory.shape == (20, 6)


def test_births_and_retirements():
  """Two objects: A in frames 0-3 and 7-8 (a gap of 3), B from frame 2; retire after 3 unseen
  frames with room for 2 tracks. A's track ends after frame 6; when A returns at frame 7 a new
  track begins in its old column (its identity does not come back), and C (frame 8) gets no
  column: both are taken. Against a single live track every confident query has S >= 0.5 (its
  softmax over one track is 1), so the greedy order decides, as in CTVIS: B scores below A when
  it appears (A's is the only track) and above A when A returns (B's is)."""
  a, b, cc, n = 4 * np.eye(4)
  q = 3
  frames, fg = [], []
  for t in range(9):
    row = [a if t < 4 or t >= 7 else n, b if t >= 2 else n, cc if t == 8 else n]
    frames.append(row)
    fg.append([0.9 if t < 4 or t >= 7 else 0.05, 0.85 if t in (2, 3) else 0.95 if t > 3 else 0.05,
               0.9 if t == 8 else 0.05])
  embds = np.asarray(frames, np.float32) + 0.01 * np.random.default_rng(0).normal(size=(9, q, 4))
  scores = np.asarray(fg)
  logits = np.log(np.stack([scores, 1 - scores], -1)).astype(np.float32)
  out, _ = run(ctvis(score=0.5, retire=3, max_tracks=2), embds, logits)
  np.testing.assert_array_equal(out.index[:, 0], [0, 0, 0, 0, -1, -1, -1, 0, 0])
  np.testing.assert_array_equal(out.index[:, 1], [-1, -1, 1, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(np.flatnonzero(out.born[:, 0]), [0, 7])
  np.testing.assert_array_equal(np.flatnonzero(out.born[:, 1]), [2])
  np.testing.assert_array_equal(out.alive[:, 0], [1, 1, 1, 1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(out.alive[:, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1])
  # A longer life: the gap of 3 frames is bridged, A keeps its track.
  out, _ = run(ctvis(score=0.5, retire=4, max_tracks=2), embds, logits)
  np.testing.assert_array_equal(out.index[:, 0], [0, 0, 0, 0, -1, -1, -1, 0, 0])
  np.testing.assert_array_equal(np.flatnonzero(out.born[:, 0]), [0])


def test_returning_object_keeps_its_track_where_minvis_switches():
  """A holds query 0 in frames 0-2, is hidden in frames 3-6, and returns in query 2 in frames 7-9;
  meanwhile B took query 0 at frame 3 (its old query was 1, which background then holds), and
  background fills the rest. Distinctive embeddings (one direction per instance). 'ctvis' keeps
  A's track (column 0) across the gap in its new query and B's track in B's; 'minvis' continues
  A's track with n3, the background that filled it during the gap, and A comes back under n1's
  track."""
  a, b, n1, n2, n3 = 5 * np.eye(5)
  slots, fg = [], []
  for t in range(10):
    if t < 3:
      slots.append([a, b, n1, n2]), fg.append([0.9, 0.9, 0.05, 0.05])
    elif t < 7:
      slots.append([b, n3, n1, n2]), fg.append([0.9, 0.05, 0.05, 0.05])
    else:
      slots.append([b, n3, a, n2]), fg.append([0.9, 0.05, 0.9, 0.05])
  rng = np.random.default_rng(1)
  embds = (np.asarray(slots) + 0.05 * rng.normal(size=(10, 4, 5))).astype(np.float32)
  scores = np.asarray(fg)
  logits = np.log(np.stack([scores, 1 - scores], -1)).astype(np.float32)
  out, _ = run(ctvis(score=0.5, retire=6, max_tracks=6), embds, logits, window=3)
  a_query = [0, 0, 0, -1, -1, -1, -1, 2, 2, 2]
  b_query = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(out.index[:, 0], a_query)
  np.testing.assert_array_equal(out.index[:, 1], b_query)
  assert out.born.sum() == 2 and out.born[0, :2].all()     # no track begins after frame 0
  minvis, _ = run(tracking.Tracker('minvis', 0.7, 0.0), embds, logits)
  np.testing.assert_array_equal(minvis[:, 1], b_query)       # B is kept by both
  np.testing.assert_array_equal(minvis[7:, 0], [1, 1, 1])   # A's track: n3
  np.testing.assert_array_equal(minvis[7:, 2], [2, 2, 2])   # A: n1's track


def test_tracker_from_config_and_validation():
  c = config_lib.load_config('tiny')
  assert tracking.tracker_from_config(c) == tracking.Tracker('minvis', 0.7, 0.0)
  c = config_lib.apply_overrides(c, ['inference.tracker="ctvis"', 'inference.ctvis_match=0.5',
                                     'inference.ctvis_max_tracks=30'])
  t = tracking.tracker_from_config(c)
  assert (t.kind, t.match, t.max_tracks, t.retire_frames) == ('ctvis', 0.5, 30, 20)
  assert tracking.num_tracks(t, 20) == 30
  assert tracking.num_tracks(t._replace(max_tracks=0), 20) == 40
  for bad, key in (('inference.ctvis_score=1.5', 'ctvis_score'),
                   ('inference.ctvis_match=-0.1', 'ctvis_match'),
                   ('inference.ctvis_retire_frames=0', 'ctvis_retire_frames'),
                   ('inference.ctvis_cache=0', 'ctvis_cache'),
                   ('inference.ctvis_max_tracks=-1', 'ctvis_max_tracks')):
    with pytest.raises(ValueError, match=f'inference.{key}=.*expected') as e:
      config_lib.apply_overrides(config_lib.load_config('tiny'), [bad])
    assert '\n' not in str(e.value)
