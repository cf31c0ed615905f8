"""MinVIS online association: match each frame's queries to the previous, already reordered frame.

cost[i, j] = 1 - cos(previous track i, current query j), solved exactly on device with
`matching.linear_sum_assignment`. The state is only the last reordered embeddings, so a video can be
processed in chunks (windows, or live) with the same result as one call.
"""

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from minvis_jax import matching


class TrackState(NamedTuple):
  prev: jnp.ndarray      # [Q, C] L2-normalised embeddings of the tracks, in track order
  started: jnp.ndarray   # [] bool: whether any valid frame has been seen


def init_state(num_queries: int, dim: int) -> TrackState:
  return TrackState(jnp.zeros((num_queries, dim), jnp.float32), jnp.zeros((), bool))


def _normalise(x: jnp.ndarray) -> jnp.ndarray:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


@jax.jit
def associate_chunk(state: TrackState, embds: jnp.ndarray, valid: jnp.ndarray):
  """embds [T, Q, C], valid [T] bool -> (state, perm [T, Q]).

  perm[t, i] is the query of frame t that continues track i. The first valid frame defines the
  tracks (identity); invalid (padded) frames get the identity and leave the state unchanged.

  Matching frame t to the previous frame *reordered* only permutes the columns of the cost against
  the previous frame in its own query order, so all frame pairs are solved at once (one batched
  solve instead of T sequential ones) and the scan over frames just composes the permutations:
  perm[t] = match[t][perm[t_prev]]. With a unique optimum (any non-degenerate input) this is the
  original sequential association exactly; with ties it is another optimal one.
  """
  t, q, _ = embds.shape
  identity = jnp.arange(q, dtype=jnp.int32)
  e = _normalise(embds.astype(jnp.float32))
  # For frame t, the last valid frame before it, as an index into [state.prev, e_0, ..., e_T-1].
  last = lax.cummax(jnp.where(valid, jnp.arange(1, t + 1), 0))
  prev_index = jnp.concatenate([jnp.zeros(1, last.dtype), last[:-1]])
  prev = jnp.concatenate([state.prev[None], e])[prev_index]           # [T, Q, C]
  cost = 1.0 - jnp.einsum('tic,tjc->tij', prev, e)                     # [T, Q (prev), Q (this)]
  # Frames with nothing to match (padding, or no valid frame before them) get a trivial cost: an
  # all-equal one (the unstarted state is zeros) is the solver's slowest case and the batch would
  # wait for it.
  has_prev = valid & ((prev_index > 0) | state.started)
  cost = jnp.where(has_prev[:, None, None], cost, 1.0 - jnp.eye(q, dtype=cost.dtype))
  _, match = matching.batched_linear_sum_assignment(cost)              # [T, Q]

  # The carry maps tracks to the queries of the last valid frame (state.prev is in track order).
  def compose(carry, inputs):
    tracks, started = carry
    m, ok = inputs
    perm = jnp.where(started, m[tracks], identity)
    perm = jnp.where(ok, perm, identity)
    return (jnp.where(ok, perm, tracks), started | ok), perm

  (tracks, started), perm = lax.scan(compose, (identity, state.started), (match, valid))
  any_valid = jnp.any(valid)
  new_prev = jnp.where(any_valid, e[jnp.maximum(last[-1] - 1, 0)][tracks], state.prev)
  return TrackState(new_prev, started), perm


def associate(embds: jnp.ndarray, valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """embds [T, Q, C] (valid [T] bool, default all) -> perm [T, Q]; frame 0 is the identity."""
  if valid is None:
    valid = jnp.ones(embds.shape[:1], bool)
  _, perm = associate_chunk(init_state(embds.shape[1], embds.shape[2]), embds, valid)
  return perm


def reorder(x: jnp.ndarray, perm: jnp.ndarray) -> jnp.ndarray:
  """x [T, Q, ...] -> x[t, perm[t]] for every frame: per-frame outputs in track order."""
  return jax.vmap(lambda a, p: a[p])(x, perm)
