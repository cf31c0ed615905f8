"""The 'ctvis' tracker (minvis_jax/tracking.py): a numpy loop of the same rule, chunked streaming,
a fixed-size state, births and retirements, re-identification after a gap, and its video-level
results through the predictor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from support import videos
from support.exported import assert_close_tracks
from support.tracks import assert_same_tracks
from minvis_jax import config_lib
from minvis_jax import exported
from minvis_jax import model_forward
from minvis_jax import online
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax import video_tracks


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


# ---------------------------------------------------------------------------------------------
# Video-level results through the predictor.

Q, C, K, SIZE = 4, 5, 2, 32


def _fake_apply(variables, images):
  """A stand-in model that reads its outputs from the pixels [N, 32, 32, 3]: embeddings and class
  logits from the first values (in row 0), query i's mask logits channel 2 at 1/4 size (from row
  2) plus a shift."""
  del variables
  n = images.shape[0]
  flat = images.reshape(n, -1)
  shift = (jnp.arange(Q) - 1.5)[None, :, None, None]
  return {'pred_embds': flat[:, :Q * C].reshape(n, Q, C),
          'pred_logits': flat[:, Q * C:Q * (C + K + 1)].reshape(n, Q, K + 1),
          'pred_masks': images[:, None, 2::4, 2::4, 2] + shift}


def _returning_clip():
  """The clip of `test_returning_object_keeps_its_track_where_minvis_switches` with two classes
  (A is class 0, B class 1) as the fake model's pixels -> (images [T, 32, 32, 3], embds, logits)."""
  a, b, n1, n2, n3 = 5 * np.eye(5)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(10, SIZE, SIZE, 3)).astype(np.float32)
  # Masks of blocks: 8x8 pixels of one value (2x2 at the model's resolution) survive the resize.
  images[..., 2] = 3 * np.kron(rng.normal(size=(10, 4, 4)), np.ones((8, 8)))
  embds, probs = [], []
  pa, pb, bg = [0.9, 0.04, 0.06], [0.01, 0.8, 0.19], [0.02, 0.03, 0.95]  # [class 0, 1, none]
  for t in range(10):
    if t < 3:
      embds.append([a, b, n1, n2]), probs.append([pa, pb, bg, bg])
    elif t < 7:
      embds.append([b, n3, n1, n2]), probs.append([pb, bg, bg, bg])
    else:
      embds.append([b, n3, a, n2]), probs.append([pb, bg, pa, bg])
  embds = (np.asarray(embds) + 0.05 * rng.normal(size=(10, Q, C))).astype(np.float32)
  logits = (np.log(probs) + 0.1 * rng.normal(size=(10, Q, K + 1))).astype(np.float32)
  flat = images.reshape(10, -1)
  flat[:, :Q * C] = embds.reshape(10, -1)
  flat[:, Q * C:Q * (C + K + 1)] = logits.reshape(10, -1)
  return images, embds, logits


def test_video_results_through_the_predictor():
  """VideoPredictor with 'ctvis': a track scores over the frames where it has a query, its mask is
  that query's there and empty elsewhere; windows of 3 equal one of 10; the YouTube-VIS results
  format. A's track (present in frames 0-2 and 7-9) is one result with A's masks, not two."""
  images, embds, logits = _returning_clip()
  tracker = ctvis(score=0.5, retire=6, max_tracks=6)
  index, _, _ = ctvis_loop(embds, softmax_max(logits), np.ones(10, bool), tracker.score,
                           tracker.match, tracker.retire_frames, tracker.max_tracks, tracker.cache)
  forward = predictor.Forward(_fake_apply, Q, C)
  runs = [predictor.VideoPredictor(forward, {}, window=w, top_k=3, tracker=tracker,
                                   devices=jax.devices()[:1])(images, (SIZE, SIZE), (SIZE, SIZE))
          for w in (10, 3)]
  assert_same_tracks(*runs)
  tracks = runs[0]
  # The numpy score of every (track, class) pair: softmax of the mean logits where present.
  want = []
  for m in np.flatnonzero((index >= 0).any(0)):
    present = np.flatnonzero(index[:, m] >= 0)
    mean = logits[present, index[present, m]].mean(0)
    p = np.exp(mean - mean.max())
    want += [(p[c] / p.sum(), m, c) for c in range(K)]
  want.sort(key=lambda x: -x[0])
  assert len(tracks) == 3
  np.testing.assert_allclose([t['score'] for t in tracks], [w[0] for w in want[:3]], rtol=1e-6)
  assert [t['category'] for t in tracks] == [w[2] for w in want[:3]]
  assert [w[1:] for w in want[:2]] == [(0, 0), (1, 1)]        # A's track class 0, B's class 1
  out = _fake_apply(None, images)
  for track, (_, m, _) in zip(tracks, want):
    for t, rle in enumerate(track['segmentations']):
      got = mask_utils.decode(dict(rle, counts=rle['counts'].encode()))
      if index[t, m] < 0:
        assert not got.any(), (m, t)
      else:
        low = np.asarray(out['pred_masks'][t, index[t, m]]).astype(np.float16).astype(np.float32)
        up = np.asarray(jax.image.resize(low, (SIZE, SIZE), 'bilinear', antialias=False)) > 0
        np.testing.assert_array_equal(got, up)
  np.testing.assert_array_equal(index[:, 0], [0, 0, 0, -1, -1, -1, -1, 2, 2, 2])
  results = predictor.results_for_video(tracks, 7, [11, 12])
  assert [r['category_id'] for r in results] == [11 + w[2] for w in want[:3]]
  assert all(set(r) == {'video_id', 'category_id', 'score', 'segmentations'} and
             r['video_id'] == 7 and len(r['segmentations']) == 10 for r in results)


class _ClipForward:
  """The online tracker's forward on `_returning_clip`: the fake model's outputs of the next
  frames (the tracker's preprocessed input is ignored)."""

  def __init__(self, images):
    self.images, self.t = images, 0

  def __call__(self, images):
    out = _fake_apply(None, self.images[self.t:self.t + len(images)])
    self.t += len(images)
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize('chunk', [1, 3])
def test_online_ids_follow_the_tracks_and_the_summary_is_offline(chunk):
  """Online with 'ctvis': A keeps its id across its 4 hidden frames (the tracker's retirement,
  not the online rule's 2 frames), B keeps its own, nothing else is reported; the end-of-stream
  result is the offline predictor's, bit for bit."""
  images, _, _ = _returning_clip()
  tracker = ctvis(score=0.5, retire=6, max_tracks=6)
  spec = online.InputSpec(SIZE, SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 32)
  stream = online.OnlineTracker(_ClipForward(images), tracker, spec, online.Rules(0.5, 2),
                                top_k=3, summary=True)
  frames = [np.zeros((SIZE, SIZE, 3), np.uint8)] * 10
  results = []
  for start in range(0, 10, chunk):
    results += stream.process(frames[start:start + chunk])
  ids = [[(t['id'], t['category']) for t in r.tracks] for r in results]
  assert ids == [[(1, 0), (2, 1)]] * 3 + [[(2, 1)]] * 4 + [[(1, 0), (2, 1)]] * 3
  assert stream.live_tracks == {0: 1, 1: 2}
  offline = predictor.VideoPredictor(predictor.Forward(_fake_apply, Q, C), {}, window=chunk,
                                     top_k=3, tracker=tracker, devices=jax.devices()[:1])(
      images, (SIZE, SIZE), (SIZE, SIZE))
  assert_same_tracks(stream.finish(), offline)


def test_track_book_drops_only_tracks_that_cannot_be_picked():
  """Many short tracks (a column reborn every few frames): the book keeps a bounded number of
  ended tracks, and its top-k equals the top-k over every track, computed without dropping any."""
  rng = np.random.default_rng(4)
  m, q, k1, frames = 6, 8, 4, 300
  book = video_tracks.TrackBook(m, top_k=3)
  everyone, live, kept = [], {}, []
  for t in range(frames):
    born = rng.uniform(size=m) < 0.3
    alive = np.ones(m, bool)
    index = np.where(rng.uniform(size=m) < 0.8, rng.permutation(q)[:m], -1)
    index[born] = rng.permutation(q)[:born.sum()]
    logits = rng.normal(size=(q, k1)).astype(np.float32) * 3
    for c in np.flatnonzero(born):
      live[c] = {'sum': np.zeros(k1), 'n': 0, 'queries': {}}
      everyone.append(live[c])
    for c, track in live.items():
      if index[c] >= 0:
        track['sum'] += logits[index[c]]
        track['n'] += 1
        track['queries'][t] = index[c]
    book.add(index, born, alive, logits)
    kept.append(len(book._ended))
  picks = book.select(3)
  pairs = []
  for i, track in enumerate(everyone):
    mean = track['sum'] / track['n']
    p = np.exp(mean - mean.max())
    pairs += [(p[c] / p.sum(), i, c) for c in range(k1 - 1)]
  pairs.sort(key=lambda x: -x[0])
  assert len(everyone) > 300 and max(kept) <= 4 * 3 + 1
  np.testing.assert_allclose(picks.scores, [p[0] for p in pairs[:3]], rtol=1e-12)
  assert list(picks.categories) == [p[2] for p in pairs[:3]]
  for t in (0, 150, 299):
    want = [everyone[p[1]]['queries'].get(t, -1) for p in pairs[:3]]
    np.testing.assert_array_equal(picks.rows(t), want)


def test_exported_manifest_keeps_the_tracker():
  for tracker in (ctvis(embedding='reid'), tracking.Tracker('memory', 0.6, 0.2)):
    assert tracking.from_manifest(tracking.to_manifest(tracker)) == tracker
  # A manifest written before the 'ctvis' keys: the defaults.
  old = {'kind': 'minvis', 'momentum': 0.7, 'min_score': 0.0}
  assert tracking.to_manifest(tracking.from_manifest(old)) == old
  assert tracking.from_manifest(old) == tracking.Tracker('minvis', 0.7, 0.0)


@pytest.mark.slow
def test_exported_model_runs_the_ctvis_tracker(tiny_exported):
  """An exported model's predictor (predictor.Forward of the artifact) with 'ctvis' in its
  manifest gives the live model's tracks."""
  path, config, variables = tiny_exported
  config = config.copy_and_resolve_references()
  config.inference.tracker = 'ctvis'
  config.inference.ctvis_score = 0.3
  artifact = exported.load(path)
  artifact.manifest['inference']['tracker'] = tracking.to_manifest(
      tracking.tracker_from_config(config))
  assert artifact.tracker().kind == 'ctvis'
  frames = videos.moving_square_frames(6)
  inputs = list(predictor.preprocess(frames, config.data))
  size = predictor.valid_size(64, 96, config.data)
  ours = artifact.video_predictor(window=2)(inputs, size, (64, 96))
  live = model_forward.from_config(config, variables)(inputs, size, (64, 96))
  assert len(live) == config.inference.top_k
  assert_close_tracks(predictor.results_for_video(live, 1, [1, 2, 3, 4]),
                      predictor.results_for_video(ours, 1, [1, 2, 3, 4]))
