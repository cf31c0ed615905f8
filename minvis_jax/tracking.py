"""MinVIS online association: match each frame's queries to the previous, already reordered frame.

cost[i, j] = 1 - cos(previous track i, current query j), solved exactly on device with
`matching.linear_sum_assignment`. The state is only the last reordered embeddings, so a video can be
processed in chunks (windows, or live) with the same result as one call.
"""

from typing import NamedTuple

import jax
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
  """
  q = embds.shape[1]
  identity = jnp.arange(q, dtype=jnp.int32)

  def step(s: TrackState, inputs):
    e, ok = inputs
    e = _normalise(e.astype(jnp.float32))
    _, cols = matching.linear_sum_assignment(1.0 - s.prev @ e.T)
    perm = jnp.where(s.started, cols.astype(jnp.int32), identity)
    perm = jnp.where(ok, perm, identity)
    new = TrackState(jnp.where(ok, e[perm], s.prev), s.started | ok)
    return new, perm

  return jax.lax.scan(step, state, (embds, valid))


def associate(embds: jnp.ndarray, valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """embds [T, Q, C] (valid [T] bool, default all) -> perm [T, Q]; frame 0 is the identity."""
  if valid is None:
    valid = jnp.ones(embds.shape[:1], bool)
  _, perm = associate_chunk(init_state(embds.shape[1], embds.shape[2]), embds, valid)
  return perm


def reorder(x: jnp.ndarray, perm: jnp.ndarray) -> jnp.ndarray:
  """x [T, Q, ...] -> x[t, perm[t]] for every frame: per-frame outputs in track order."""
  return jax.vmap(lambda a, p: a[p])(x, perm)
