"""Online association of per-frame queries into tracks (`config.inference.tracker`).

'minvis' (docs/method.md §1, the default): match each frame's queries to the previous, already
reordered frame. cost[i, j] = 1 - cos(previous track i, current query j), solved exactly on device
with `matching.linear_sum_assignment`. The state is only the last reordered embeddings, so a video
can be processed in chunks (windows, or live) with the same result as one call.

'memory' (beyond MinVIS; training-free, same checkpoints): each track i keeps an embedding memory
m_i (unit norm) instead of the last frame, so a track whose object is hidden for a few frames is not
overwritten by whatever query filled its slot meanwhile. For every valid frame t after the first:
  - score[j] = max over non-background classes of softmax(class logits[t, j]) (foreground score);
  - perm = argmin over permutations of sum_i 1 - cos(m_i, e[t, perm[i]])   (one full assignment);
  - x_i = e[t, perm[i]] / |e[t, perm[i]]|;
  - if score[perm[i]] >= min_score:  m_i <- normalise(momentum * m_i + (1 - momentum) * x_i)
    else m_i is kept (a track is only updated by a confidently foreground query).
The first valid frame sets m_i = x_i (the identity order). momentum = 0 and min_score = 0 is exactly
'minvis'. The memory depends on the previous frame's assignment, so frames are solved one after
the other (a scan), where 'minvis' solves all frame pairs of a chunk in one batch.
The defaults (configs/common.py) come from a sweep on the demo's checkpoint, where the choice
barely matters: those models' embeddings identify the query slot rather than the instance
(docs/tracking_study.md).
"""

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections

from minvis_jax import matching


TRACKERS = ('minvis', 'memory')
# What every tracker matches: the decoder's query embeddings (MinVIS) or the reid head's output.
EMBEDDINGS = ('decoder', 'reid')
_OUTPUT_KEY = {'decoder': 'pred_embds', 'reid': 'pred_reid'}


class Tracker(NamedTuple):
  """The association mode and its parameters (hashable: a static argument of jitted steps).

  kind: one of TRACKERS; momentum and min_score are read by 'memory' only; embedding: one of
  EMBEDDINGS.
  """
  kind: str
  momentum: float
  min_score: float
  embedding: str = 'decoder'


def tracker_from_config(config: ml_collections.ConfigDict) -> Tracker:
  """`config.inference` (tracker, memory_momentum, memory_min_score, embedding; checked by
  `config_lib.validate`) -> Tracker. A config without `embedding` (written before it) matches the
  decoder's embeddings."""
  inf = config.inference
  return Tracker(str(inf.tracker), float(inf.memory_momentum), float(inf.memory_min_score),
                 str(inf.get('embedding', 'decoder')))


def embedding_dim(tracker: Tracker, model_config) -> int:
  """The width of the embeddings `tracker` matches for a `models.ModelConfig`."""
  return model_config.reid_dim if tracker.embedding == 'reid' else model_config.hidden_dim


def select_embeddings(tracker: Tracker, outputs: dict) -> jnp.ndarray:
  """The model outputs' embeddings [T, Q, C] that `tracker` matches ('pred_embds' or
  'pred_reid')."""
  if tracker.embedding not in _OUTPUT_KEY:
    raise ValueError(f'unknown embedding {tracker.embedding!r}; choose one of {EMBEDDINGS}')
  key = _OUTPUT_KEY[tracker.embedding]
  if key not in outputs:
    raise ValueError(f"inference.embedding={tracker.embedding!r} needs a model with a reid head "
                     '(model.reid=True)')
  return outputs[key]


class TrackState(NamedTuple):
  prev: jnp.ndarray      # [Q, C] L2-normalised embeddings of the tracks, in track order: the last
                         # frame's ('minvis') or the memories ('memory')
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


def foreground_score(logits: jnp.ndarray) -> jnp.ndarray:
  """Class logits [..., K+1] (last = no object) -> max non-background probability [...]."""
  return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1], axis=-1)


@jax.jit
def associate_memory_chunk(state: TrackState, embds: jnp.ndarray, scores: jnp.ndarray,
                           valid: jnp.ndarray, momentum, min_score):
  """'memory' association: embds [T, Q, C], scores [T, Q] (foreground score of each query), valid
  [T] bool, momentum and min_score (scalars) -> (state, perm [T, Q]); same conventions as
  `associate_chunk`, update rule in the module docstring."""
  q = embds.shape[1]
  identity = jnp.arange(q, dtype=jnp.int32)
  # Frames with nothing to match (padding, or the first valid frame) get the solver's fastest
  # case instead of an all-equal cost (zero padding, or the zero state), its slowest.
  trivial = 1.0 - jnp.eye(q, dtype=jnp.float32)
  e = _normalise(embds.astype(jnp.float32))

  def frame(carry, inputs):
    memory, started = carry
    x, score, ok = inputs
    cost = jnp.where(started & ok, 1.0 - memory @ x.T, trivial)     # [Q (tracks), Q (this)]
    _, match = matching.linear_sum_assignment(cost)
    perm = jnp.where(ok & started, match, identity)
    x = x[perm]
    update = (score[perm] >= min_score)[:, None]
    mixed = _normalise(momentum * memory + (1.0 - momentum) * x)
    new = jnp.where(started, jnp.where(update, mixed, memory), x)
    return (jnp.where(ok, new, memory), started | ok), perm

  (memory, started), perm = lax.scan(frame, (state.prev, state.started),
                                     (e, scores.astype(jnp.float32), valid))
  return TrackState(memory, started), perm


def track_chunk(tracker: Tracker, state: TrackState, embds: jnp.ndarray, logits: jnp.ndarray,
                valid: jnp.ndarray):
  """The association of `tracker` over one chunk: embds [T, Q, C], class logits [T, Q, K+1],
  valid [T] -> (state, perm [T, Q]). Chunked calls give the same result as one call."""
  if tracker.kind == 'minvis':
    return associate_chunk(state, embds, valid)
  if tracker.kind == 'memory':
    return associate_memory_chunk(state, embds, foreground_score(logits), valid,
                                  jnp.float32(tracker.momentum), jnp.float32(tracker.min_score))
  raise ValueError(f'unknown tracker {tracker.kind!r}; choose one of {TRACKERS}')


def reorder(x: jnp.ndarray, perm: jnp.ndarray) -> jnp.ndarray:
  """x [T, Q, ...] -> x[t, perm[t]] for every frame: per-frame outputs in track order."""
  return jax.vmap(lambda a, p: a[p])(x, perm)
