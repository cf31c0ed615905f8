"""MinVIS association against a scipy loop, known permutations, and chunked streaming."""

import numpy as np
from scipy.optimize import linear_sum_assignment

from minvis_jax import tracking


def scipy_loop(embds):
  """The original per-frame association (numpy + scipy)."""
  e = embds / np.linalg.norm(embds, axis=-1, keepdims=True)
  prev = e[0]
  perms = [np.arange(e.shape[1])]
  for t in range(1, len(e)):
    _, cols = linear_sum_assignment(1 - prev @ e[t].T)
    perms.append(cols)
    prev = e[t][cols]
  return np.stack(perms)


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
    np.testing.assert_array_equal(np.asarray(tracking.associate(embds)), scipy_loop(embds))


def test_recovers_known_permutation_over_50_frames():
  embds, truth = drifting_video(50, 40, 32, seed=1, noise=0.05)
  perm = np.asarray(tracking.associate(embds))
  # Track i follows the base row that frame 0's query i held.
  base_of_track = np.empty(40, int)
  base_of_track[truth[0]] = np.arange(40)
  for t in range(50):
    np.testing.assert_array_equal(perm[t], truth[t][base_of_track])


def test_chunks_equal_one_call_and_padding_is_inert():
  embds, _ = drifting_video(20, 25, 16, seed=2)
  whole = np.asarray(tracking.associate(embds))
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
  perm = np.asarray(tracking.associate(embds, valid))
  np.testing.assert_array_equal(perm[valid], scipy_loop(embds[valid]))
  np.testing.assert_array_equal(perm[~valid], np.broadcast_to(np.arange(20), (6, 20)))
