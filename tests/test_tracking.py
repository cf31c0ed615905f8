"""MinVIS association against a scipy loop, known permutations, and chunked streaming."""

from typing import NamedTuple

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from support.references import scipy_loop
from minvis_jax import config_lib
from minvis_jax import model_forward
from minvis_jax import predictor
from minvis_jax import tracking


def associate(embds, valid=None):
  """embds [T, Q, C] (valid [T] bool, default all) -> perm [T, Q] in one chunk; frame 0 is the
  identity."""
  if valid is None:
    valid = np.ones(embds.shape[:1], bool)
  _, perm = tracking.associate_chunk(tracking.init_state(embds.shape[1], embds.shape[2]), embds,
                                     valid)
  return perm


def drifting_video(t, q, c, seed, noise=0.3):
  """Frames whose queries are shuffled noisy copies of slowly drifting base embeddings."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(q, c))
  frames, truth = [], []
  for _ in range(t):
    base = base + 0.1 * rng.normal(size=base.shape)
    p = rng.permutation(q)
    frames.append(base[p] + noise * rng.normal(size=base.shape))
    truth.append(np.argsort(p))  # query of this frame holding base row i
  return np.stack(frames).astype(np.float32), np.stack(truth)


def test_matches_scipy_loop_on_random_embeddings():
  for seed in range(3):
    embds = np.random.default_rng(seed).normal(size=(12, 30, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(associate(embds)), scipy_loop(embds))


def test_recovers_known_permutation_over_50_frames():
  embds, truth = drifting_video(50, 40, 32, seed=1, noise=0.05)
  perm = np.asarray(associate(embds))
  # Track i follows the base row that frame 0's query i held.
  base_of_track = np.empty(40, int)
  base_of_track[truth[0]] = np.arange(40)
  for t in range(50):
    np.testing.assert_array_equal(perm[t], truth[t][base_of_track])


def test_chunks_equal_one_call_and_padding_is_inert():
  embds, _ = drifting_video(20, 25, 16, seed=2)
  whole = np.asarray(associate(embds))
  state = tracking.init_state(25, 16)
  parts = []
  for start in range(0, 20, 7):  # windows of 7; the last one padded with invalid frames
    chunk = embds[start:start + 7]
    valid = np.arange(7) < len(chunk)
    chunk = np.concatenate([chunk, np.zeros((7 - len(chunk), 25, 16), np.float32)])
    state, perm = tracking.associate_chunk(state, chunk, valid)
    parts.append(np.asarray(perm)[valid])
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_reorder():
  x = np.arange(2 * 3).reshape(2, 3)
  perm = np.array([[2, 0, 1], [1, 2, 0]])
  np.testing.assert_array_equal(np.asarray(tracking.reorder(x, perm)), [[2, 0, 1], [4, 5, 3]])


def test_invalid_frames_anywhere_are_skipped():
  embds, _ = drifting_video(16, 20, 16, seed=4)
  valid = np.ones(16, bool)
  valid[[0, 1, 5, 6, 7, 15]] = False  # leading, middle and trailing gaps
  perm = np.asarray(associate(embds, valid))
  np.testing.assert_array_equal(perm[valid], scipy_loop(embds[valid]))
  np.testing.assert_array_equal(perm[~valid], np.broadcast_to(np.arange(20), (6, 20)))


# ---------------------------------------------------------------------------------------------
# 'memory' association.


def memory_loop(embds, scores, momentum, min_score, valid=None):
  """The 'memory' update rule (tracking.py's docstring) in numpy + scipy, frame by frame."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  t, q, _ = embds.shape
  valid = np.ones(t, bool) if valid is None else valid
  memory, perms = None, []
  for e, s, ok in zip(unit(embds.astype(np.float64)), scores, valid):
    if not ok:
      perms.append(np.arange(q))
      continue
    if memory is None:
      perm = np.arange(q)
      memory = e.copy()
    else:
      _, perm = linear_sum_assignment(1 - memory @ e.T)
      mixed = unit(momentum * memory + (1 - momentum) * e[perm])
      memory = np.where((s[perm] >= min_score)[:, None], mixed, memory)
    perms.append(perm)
  return np.stack(perms)


def softmax_max(logits):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True))[..., :-1].max(-1)


def random_video(t, q, c, k, seed):
  rng = np.random.default_rng(seed)
  embds, _ = drifting_video(t, q, c, seed, noise=0.8)
  logits = rng.normal(size=(t, q, k + 1)).astype(np.float32) * 2
  return embds, logits


def run_memory(embds, logits, valid, momentum, min_score, window=None):
  t, q, c = embds.shape
  tracker = tracking.Tracker('memory', momentum, min_score)
  state = tracking.init_state(q, c)
  window = window or t
  parts = []
  for start in range(0, t, window):
    chunk = slice(start, start + window)
    e, lg, ok = embds[chunk], logits[chunk], valid[chunk]
    pad = window - len(e)  # the last window padded with invalid frames, as the predictor does
    e = np.concatenate([e, np.zeros((pad,) + e.shape[1:], e.dtype)])
    lg = np.concatenate([lg, np.zeros((pad,) + lg.shape[1:], lg.dtype)])
    ok = np.concatenate([ok, np.zeros(pad, bool)])
    state, perm = tracking.track_chunk(tracker, state, e, lg, ok)
    parts.append(np.asarray(perm)[:window - pad])
  return np.concatenate(parts)


def test_memory_equals_numpy_reference_whole_and_chunked():
  for seed, (momentum, min_score) in enumerate([(0.5, 0.3), (0.8, 0.0), (0.9, 0.6)]):
    embds, logits = random_video(18, 12, 8, 4, seed)
    valid = np.ones(18, bool)
    valid[[0, 7, 8]] = False
    scores = softmax_max(logits)
    ref = memory_loop(embds, scores, momentum, min_score, valid)
    assert 0.2 < (scores >= min_score).mean() <= 1.0 or min_score == 0  # the gate does something
    for window in (None, 1, 5):
      got = run_memory(embds, logits, valid, momentum, min_score, window)
      np.testing.assert_array_equal(got, ref, err_msg=f'seed {seed} window {window}')
    # The memory is not the last frame: the result differs from 'minvis' on these inputs.
    assert (ref != scipy_loop_with_valid(embds, valid)).any()


def scipy_loop_with_valid(embds, valid):
  perm = np.broadcast_to(np.arange(embds.shape[1]), embds.shape[:2]).copy()
  perm[valid] = scipy_loop(embds[valid])
  return perm


def test_memory_without_momentum_or_gate_is_minvis():
  embds, logits = random_video(14, 16, 8, 3, seed=7)
  valid = np.ones(14, bool)
  got = run_memory(embds, logits, valid, 0.0, 0.0, window=4)
  np.testing.assert_array_equal(got, scipy_loop(embds))


def test_tracker_from_config():
  c = config_lib.load_config('tiny')
  assert tracking.tracker_from_config(c) == tracking.Tracker('minvis', 0.7, 0.0)
  config_lib.apply_overrides(c, ['inference.tracker="memory"', 'inference.memory_momentum=0.8'])
  assert tracking.tracker_from_config(c) == tracking.Tracker('memory', 0.8, 0.0)
  c.inference.memory_min_score = 0.4
  assert tracking.tracker_from_config(c).min_score == 0.4
  # The one gate for a tracker name is the config's validation.
  with pytest.raises(ValueError, match="inference.tracker='sort'"):
    config_lib.apply_overrides(c, ['inference.tracker="sort"'])


def test_hidden_instance_is_reidentified_by_memory_and_switched_by_minvis():
  """Object A (slot 0), object B (slot 1) and background queries over 9 frames; A is hidden in
  frames 3-5 (3 frames).

  While A is hidden a background query x fills A's track; after A returns, x stays as a background
  query (taking the place of n1). 'minvis' matches to the last frame, so x keeps A's track and A
  comes back under n1's track: a switch. 'memory' never wrote x into A's memory (x is below
  min_score) and re-identifies A. Query slots move between frames (np.roll), as they may in a model.
  """
  a, b, n1, n2, x = np.eye(6)[:5]
  frames, scores = [], []
  for t in range(9):
    slots = [a, b, n1, n2] if t < 3 else [x, b, n1, n2] if t < 6 else [a, b, x, n2]
    fg = [0.9 if t < 3 or t >= 6 else 0.05, 0.9, 0.05, 0.05]
    order = np.roll(np.arange(4), t)
    frames.append(np.stack(slots)[order] + 0.01 * np.random.default_rng(t).normal(size=(4, 6)))
    scores.append(np.array(fg)[order])
  embds = np.stack(frames).astype(np.float32)
  scores = np.stack(scores)
  # One class + background with these foreground probabilities.
  logits = np.log(np.stack([scores, 1 - scores], -1)).astype(np.float32)
  slot_query = np.stack([np.argsort(np.roll(np.arange(4), t)) for t in range(9)])  # [T, slot]
  a_query = slot_query[:, 0]                # A's query in the frames where it is visible
  visible = np.r_[0:3, 6:9]

  memory = run_memory(embds, logits, np.ones(9, bool), 0.5, 0.5)
  minvis = np.asarray(associate(embds))
  np.testing.assert_array_equal(memory, memory_loop(embds, scores, 0.5, 0.5))
  np.testing.assert_array_equal(minvis, scipy_loop(embds))
  # Track 0 starts as A in both modes (frame 0 is the identity, A is query 0).
  np.testing.assert_array_equal(memory[visible, 0], a_query[visible])      # re-identified
  np.testing.assert_array_equal(minvis[:3, 0], a_query[:3])
  assert (minvis[6:, 0] != a_query[6:]).all()                               # switched ...
  np.testing.assert_array_equal(minvis[6:, 2], a_query[6:])                # ... to n1's track
  # B is never lost by either.
  np.testing.assert_array_equal(memory[:, 1], slot_query[:, 1])
  np.testing.assert_array_equal(minvis[:, 1], slot_query[:, 1])


class _FakeConfig(NamedTuple):
  """The fields of a ModelConfig that VideoPredictor and _FakeModel read (hashable as the real
  one)."""
  num_queries: int
  hidden_dim: int
  num_classes: int
  fake: str
  reid: bool = False
  reid_dim: int = 0


class _FakeModel:
  """Stands in for Mask2Former in VideoPredictor: reads the per-frame outputs from the pixels, so
  a test can feed chosen embeddings and logits through the real windowed step."""

  def __init__(self, cfg):
    self.q, self.c, self.k = cfg.num_queries, cfg.hidden_dim, cfg.num_classes

  def apply(self, variables, images):
    del variables
    import jax.numpy as jnp
    t, h, w, _ = images.shape
    q, c, k = self.q, self.c, self.k
    flat = images.reshape(t, -1)
    shift = (jnp.arange(q) - q / 2)[None, :, None, None] * 0.3
    return {'pred_embds': flat[:, :q * c].reshape(t, q, c),
            'pred_logits': flat[:, q * c:q * (c + k + 1)].reshape(t, q, k + 1),
            'pred_masks': images[:, None, ::4, ::4, 2] + shift}


def test_video_predictor_uses_the_memory_tracker(monkeypatch):
  """VideoPredictor(tracker=memory) through its jitted windowed step: windows of 3 equal one window
  of 10, and the video scores are those of the numpy reference association (not minvis')."""
  monkeypatch.setattr(model_forward, 'Mask2Former', _FakeModel)
  q, c, k, t = 12, 8, 3, 10
  cfg = _FakeConfig(num_queries=q, hidden_dim=c, num_classes=k,
                    fake='test_video_predictor_uses_the_memory_tracker')
  embds, logits = random_video(t, q, c, k, seed=11)
  images = np.random.default_rng(0).normal(size=(t, 8, 8, 3)).astype(np.float32)
  flat = images.reshape(t, -1)
  flat[:, :q * c] = embds.reshape(t, -1)
  flat[:, q * c:q * (c + k + 1)] = logits.reshape(t, -1)
  scores = softmax_max(logits)
  tracker = tracking.Tracker('memory', 0.6, 0.4)

  def video_scores(perm):
    mean = np.take_along_axis(logits, perm[..., None], axis=1).mean(0)        # [Q, K+1]
    p = np.exp(mean - mean.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True))[:, :-1].ravel()
    top = np.argsort(-p, kind='stable')[:4]
    return list(top % k), p[top]

  cats, probs = video_scores(memory_loop(embds, scores, 0.6, 0.4))
  assert not np.allclose(probs, video_scores(scipy_loop(embds))[1], rtol=1e-3)
  runs = [predictor.VideoPredictor(model_forward.forward(cfg), {}, window=w, top_k=4,
                                   tracker=tracker)(images, (8, 8), (8, 8)) for w in (10, 3)]
  for tracks in runs:
    assert [tr['category'] for tr in tracks] == cats
    np.testing.assert_allclose([tr['score'] for tr in tracks], probs, rtol=1e-5)
  for a, b in zip(*runs):
    assert a['segmentations'] == b['segmentations']


@pytest.mark.slow
def test_evaluate_command_tracker_flag(tmp_path, monkeypatch):
  """`minvis-jax evaluate --set inference.tracker=memory` runs the memory tracker with the
  config's parameters."""
  from minvis_jax import checkpoints, cli, config_lib
  from minvis_jax.data import synthetic
  from support.variables import random_variables as _random_variables
  config = config_lib.load_config('tiny')
  config.inference.memory_min_score = 0.25
  ckpt = str(tmp_path / 'model')
  checkpoints.save_variables(ckpt, _random_variables(config.model, seed=1))
  checkpoints.save_config(ckpt, config)
  synthetic.generate(str(tmp_path / 'data'), 'valid', 1, 3, 64, 96, seed=0)
  seen = []
  real = tracking.track_chunk
  monkeypatch.setattr(tracking, 'track_chunk',
                      lambda tracker, *a: seen.append(tracker) or real(tracker, *a))
  argv = ['evaluate', '--checkpoint', ckpt, '--manual_dir', str(tmp_path / 'data'),
          '--out', str(tmp_path / 'eval'), '--window', '4']
  assert cli.main(argv + ['--set', 'inference.tracker=memory']) == 0
  assert seen and set(seen) == {tracking.Tracker('memory', 0.7, 0.25)}
  with pytest.raises(ValueError, match='inference.tracker'):  # not a tracker
    cli.main(argv + ['--set', 'inference.tracker=sort', '--debug'])
  with pytest.raises(ValueError, match='--tracker was renamed: use --set inference.tracker='):
    cli.main(argv + ['--tracker', 'memory', '--debug'])


def _track(tracker, outputs, window):
  """Every frame of `outputs` ([T, ...] arrays) through `track_chunk` in windows -> perm [T, Q]."""
  t, q = outputs['pred_logits'].shape[:2]
  embds = tracking.select_embeddings(tracker, outputs)
  state = tracking.init_state(q, embds.shape[-1])
  perms = []
  for start in range(0, t, window):
    e, lg = embds[start:start + window], outputs['pred_logits'][start:start + window]
    state, perm = tracking.track_chunk(tracker, state, e, lg, np.ones(len(e), bool))
    perms.append(np.asarray(perm))
  return np.concatenate(perms)


def test_returning_object_in_another_slot_is_reidentified_with_reid_embeddings():
  """Object A holds query 0 in frames 0-2, is hidden in frames 3-5 (query 0 then holds the
  background x) and comes back in query 2 (before: background n1) in frames 6-8, while x stays in
  query 0. As in the trained models, the decoder embedding identifies the query slot (one vector
  per query index, whatever it holds) and the reid embedding the instance.

  With 'decoder' embeddings every tracker follows the slots: A's track (0) ends on x. With 'reid'
  embeddings the memory tracker (x never enters A's memory: below min_score) gives A's track
  query 2 again; 'minvis' with reid follows x, the last content of A's track (no memory).
  """
  a, b, n1, n2, x = np.eye(5)
  rng = np.random.default_rng(0)
  content, fg = [], []
  for t in range(9):
    content.append([a, b, n1, n2] if t < 3 else [x, b, n1, n2] if t < 6 else [x, b, a, n2])
    fg.append([0.9 if t < 3 else 0.05, 0.9, 0.05 if t < 6 else 0.9, 0.05])
  noise = lambda: 0.02 * rng.normal(size=(9, 4, 5))  # noqa: E731
  reid = np.asarray(content) + noise()
  decoder = np.broadcast_to(np.eye(5)[[0, 1, 2, 3]], (9, 4, 5)) + noise()
  scores = np.asarray(fg)
  outputs = {'pred_embds': decoder.astype(np.float32), 'pred_reid': reid.astype(np.float32),
             'pred_logits': np.log(np.stack([scores, 1 - scores], -1)).astype(np.float32)}
  runs = {}
  for kind in ('minvis', 'memory'):
    for embedding in ('decoder', 'reid'):
      tracker = tracking.Tracker(kind, 0.5, 0.5, embedding)
      runs[kind, embedding] = _track(tracker, outputs, 9)
      np.testing.assert_array_equal(_track(tracker, outputs, 4), runs[kind, embedding])  # chunks
  a_query = np.array([0, 0, 0, -1, -1, -1, 2, 2, 2])
  np.testing.assert_array_equal(runs['memory', 'reid'][6:, 0], a_query[6:])   # re-identified
  np.testing.assert_array_equal(runs['memory', 'reid'][:3, 0], a_query[:3])
  np.testing.assert_array_equal(runs['memory', 'reid'][:, 1], np.ones(9))     # B kept
  for key in (('minvis', 'decoder'), ('memory', 'decoder'), ('minvis', 'reid')):
    np.testing.assert_array_equal(runs[key][6:, 0], [0, 0, 0])                # A's track on x
  # The memory run on reid embeddings is the numpy reference's.
  np.testing.assert_array_equal(runs['memory', 'reid'], memory_loop(reid, scores, 0.5, 0.5))


def test_reid_embedding_needs_a_reid_model():
  tracker = tracking.Tracker('minvis', 0.7, 0.0, 'reid')
  with pytest.raises(ValueError, match='model.reid=True'):
    tracking.select_embeddings(tracker, {'pred_embds': np.zeros((1, 2, 3))})
  c = config_lib.load_config('tiny')
  with pytest.raises(ValueError, match="inference.embedding='reid'.*no reid head"):
    config_lib.apply_overrides(c, ['inference.embedding="reid"'])
  c = config_lib.apply_overrides(c, ['model.reid=True', 'inference.embedding="reid"'])
  assert tracking.tracker_from_config(c) == tracking.Tracker('minvis', 0.7, 0.0, 'reid')
