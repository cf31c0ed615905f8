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

Both keep exactly Q tracks, one per query slot, for the whole video: their output is a permutation
of the queries per frame. 'ctvis' (after CTVIS's and IDOL's trackers) has tracks that begin and end:
at most M = `max_tracks` columns, each free or holding one live track, with a fixed-size state, so
it jits and its memory does not grow with the video. For every valid frame (rule in
`associate_ctvis_chunk`): confident queries (foreground score >= `score`) are matched to the live
tracks' memories by bi-softmax on raw dot products, greedily in score order, accepted above
`match`; unmatched confident queries start tracks in free columns; a track unmatched for
`retire_frames` frames in a row ends, and its column may start another track later (a new track:
its identity never returns). Its output per frame is `TrackFrames`: the query continuing each
column (-1 where it has none) and which columns began a track.
"""

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections

from minvis_jax import matching


TRACKERS = ('minvis', 'memory', 'ctvis')
# Trackers whose output is a permutation of the Q queries per frame (one track per query slot).
PERMUTING = ('minvis', 'memory')
# What every tracker matches: the decoder's query embeddings (MinVIS) or the reid head's output.
EMBEDDINGS = ('decoder', 'reid')
_OUTPUT_KEY = {'decoder': 'pred_embds', 'reid': 'pred_reid'}


class Tracker(NamedTuple):
  """The association mode and its parameters (hashable: a static argument of jitted steps).

  kind: one of TRACKERS; momentum and min_score are read by 'memory' only; embedding: one of
  EMBEDDINGS. The rest is read by 'ctvis' only (module docstring, `associate_ctvis_chunk`): score,
  the foreground score of a confident query; match, the bi-softmax a match must exceed;
  retire_frames, unmatched frames in a row that end a track; cache, the embeddings a track keeps
  for its fusion weight; max_tracks, the columns M (0: twice the queries). The defaults are
  configs/common.py's (for configs and exported models written before the keys existed).
  """
  kind: str
  momentum: float
  min_score: float
  embedding: str = 'decoder'
  score: float = 0.1
  match: float = 0.3
  retire_frames: int = 20
  cache: int = 10
  max_tracks: int = 0


def tracker_from_config(config: ml_collections.ConfigDict) -> Tracker:
  """`config.inference` (tracker, memory_momentum, memory_min_score, embedding, ctvis_*; checked
  by `config_lib.validate`) -> Tracker. A key missing (a config written before it) takes the
  Tracker's default: the decoder's embeddings, configs/common.py's ctvis values."""
  inf, d = config.inference, Tracker('', 0.0, 0.0)
  return Tracker(str(inf.tracker), float(inf.memory_momentum), float(inf.memory_min_score),
                 str(inf.get('embedding', d.embedding)), float(inf.get('ctvis_score', d.score)),
                 float(inf.get('ctvis_match', d.match)),
                 int(inf.get('ctvis_retire_frames', d.retire_frames)),
                 int(inf.get('ctvis_cache', d.cache)),
                 int(inf.get('ctvis_max_tracks', d.max_tracks)))


def to_manifest(tracker: Tracker) -> dict:
  """The fields of `tracker` an exported model records (docs/export.md): kind, momentum and
  min_score always, the embedding when not the decoder's, the 'ctvis' values for 'ctvis'."""
  out = {'kind': tracker.kind, 'momentum': tracker.momentum, 'min_score': tracker.min_score}
  if tracker.embedding != 'decoder':
    out['embedding'] = tracker.embedding
  if tracker.kind == 'ctvis':
    out.update(score=tracker.score, match=tracker.match, retire_frames=tracker.retire_frames,
               cache=tracker.cache, max_tracks=tracker.max_tracks)
  return out


def from_manifest(fields: dict) -> Tracker:
  """`to_manifest`'s dict -> Tracker (a field it lacks takes the Tracker's default)."""
  d = Tracker('', 0.0, 0.0)
  return Tracker(str(fields['kind']), float(fields['momentum']), float(fields['min_score']),
                 str(fields.get('embedding', d.embedding)), float(fields.get('score', d.score)),
                 float(fields.get('match', d.match)),
                 int(fields.get('retire_frames', d.retire_frames)),
                 int(fields.get('cache', d.cache)), int(fields.get('max_tracks', d.max_tracks)))


def num_tracks(tracker: Tracker, num_queries: int) -> int:
  """Track columns of `tracker`'s output: Q for the permuting trackers, M for 'ctvis'."""
  if tracker.kind in PERMUTING:
    return num_queries
  return tracker.max_tracks or 2 * num_queries


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


# ---------------------------------------------------------------------------------------------
# 'ctvis': tracks that begin and end.


class CtvisState(NamedTuple):
  """The 'ctvis' state: M track columns, each free or holding one live track; fixed size."""
  memory: jnp.ndarray   # [M, C] float32 each track's fused embedding (raw, as the model gives it)
  cache: jnp.ndarray    # [M, K, C] float32 its last K matched embeddings, a ring (entry n % K)
  count: jnp.ndarray    # [M] int32 frames the track has been matched in, its birth included
  alive: jnp.ndarray    # [M] bool the column holds a live track (else it is free)
  unseen: jnp.ndarray   # [M] int32 frames in a row the track has not been matched
  birth: jnp.ndarray    # [M] int32 the valid frame the column's track began in (-1: never used)
  frame: jnp.ndarray    # [] int32 valid frames seen


class TrackFrames(NamedTuple):
  """'ctvis' output over T frames and M columns."""
  index: jnp.ndarray    # [T, M] int32 the query continuing each column's track; -1: none
  born: jnp.ndarray     # [T, M] bool a new track began in the column at this frame
  alive: jnp.ndarray    # [T, M] bool the column holds a live track after this frame


def init_ctvis_state(num_tracks: int, cache: int, dim: int) -> CtvisState:
  m = num_tracks
  return CtvisState(jnp.zeros((m, dim), jnp.float32), jnp.zeros((m, cache, dim), jnp.float32),
                    jnp.zeros(m, jnp.int32), jnp.zeros(m, bool), jnp.zeros(m, jnp.int32),
                    jnp.full(m, -1, jnp.int32), jnp.zeros((), jnp.int32))


def initial_state(tracker: Tracker, num_queries: int, dim: int):
  """The association state of `tracker` before the first frame, for Q queries of width C."""
  if tracker.kind in PERMUTING:
    return init_state(num_queries, dim)
  return init_ctvis_state(num_tracks(tracker, num_queries), tracker.cache, dim)


def bi_softmax(dots: jnp.ndarray, queries: jnp.ndarray, tracks: jnp.ndarray) -> jnp.ndarray:
  """dots [Q, M], queries [Q] bool (those that may match), tracks [M] bool (the live ones) -> S
  [Q, M]: the mean of each query's softmax over the live tracks and each track's softmax over all
  Q queries of the frame; 0 outside queries x tracks."""
  x = jnp.where(tracks[None, :], dots, -jnp.inf)
  top = jnp.max(x, axis=1, keepdims=True)
  e = jnp.where(tracks[None, :], jnp.exp(x - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  over_tracks = e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), 1e-30)
  over_queries = jax.nn.softmax(dots, axis=0)
  return jnp.where(queries[:, None] & tracks[None, :], 0.5 * (over_tracks + over_queries), 0.0)


@jax.jit
def associate_ctvis_chunk(state: CtvisState, embds: jnp.ndarray, scores: jnp.ndarray,
                          valid: jnp.ndarray, min_score, match, retire_frames):
  """'ctvis' association: embds [T, Q, C], scores [T, Q] (foreground score of each query), valid
  [T] bool, min_score, match (floats) and retire_frames (int) -> (state, TrackFrames).

  For every valid frame, with e_j the queries' embeddings and m_i the live tracks' memories:
  1. confident queries: score[j] >= min_score; only they are matched or start tracks.
  2. S = bi_softmax of the raw dot products e_j . m_i (as the reid head is trained, docs/reid.md,
     and as CTVIS and IDOL match): each confident query's softmax over the live tracks, averaged
     with each track's softmax over all Q queries. Over all queries, not only the confident ones:
     CTVIS keeps every query above 0.01 there, and with a single confident query in a frame a
     softmax over the confident ones would be 1 for every track.
  3. greedy, confident queries in descending score (ties: lower index first): the query takes the
     free-to-match track with the largest S; if several have S > match, the largest S x count
     (the track's matched frames: older tracks win, IDOL's frame weighting); accepted if
     S > match. Greedy, not `matching.linear_sum_assignment`: it is what CTVIS and IDOL do (CTVIS
     reports an optimal assignment about 3 AP lower), and a confident query claims first.
  4. a matched track: beta = max(0, mean cosine of e with its cached embeddings) and
     m <- (1 - beta) m + beta e (CTVIS's similarity-guided fusion: an embedding unlike the
     track's recent ones, e.g. an occluder's, barely moves it); e enters the cache, which keeps
     the last K (the state stays [M, K, C] however long the video). A fused memory rather than
     the last embeddings matched one by one: one dot product per track, and CTVIS trains its
     embeddings against this memory.
  5. an unmatched live track: unseen += 1; at retire_frames it ends (column free).
  6. unmatched confident queries, in descending score, start tracks in the free columns, lowest
     first, while there are any (memory = cache = e, count 1).
  Invalid (padded) frames change nothing and output index -1, born False.
  """
  q = embds.shape[1]
  m, k = state.cache.shape[:2]
  cols = jnp.arange(m, dtype=jnp.int32)
  e_all = embds.astype(jnp.float32)
  highest = lax.Precision.HIGHEST

  def frame(st: CtvisState, inputs):
    e, s, ok = inputs
    conf = s >= min_score
    order = jnp.argsort(-s, stable=True).astype(jnp.int32)               # [Q] by score
    dots = jnp.einsum('qc,mc->qm', e, st.memory, precision=highest)
    sim = bi_softmax(dots, conf, st.alive)                                # [Q, M]

    def greedy(i, carry):
      index, taken = carry
      j = order[i]
      row = jnp.where(taken, 0.0, sim[j])
      over = row > match
      weight = jnp.where(jnp.sum(over) > 1, st.count.astype(jnp.float32), 1.0)
      best = jnp.argmax(jnp.where(over, row * weight, -1.0))
      hit = conf[j] & jnp.any(over) & (cols == best)
      return jnp.where(hit, j, index), taken | hit

    index, matched = lax.fori_loop(0, q, greedy, (jnp.full(m, -1, jnp.int32),
                                                  jnp.zeros(m, bool)))
    # The matched tracks' memory and cache.
    x = e[jnp.maximum(index, 0)]                                           # [M, C]
    filled = jnp.minimum(st.count, k)
    cos = jnp.einsum('mkc,mc->mk', _normalise(st.cache), _normalise(x), precision=highest)
    mean_cos = jnp.sum(jnp.where(jnp.arange(k) < filled[:, None], cos, 0.0), axis=1) / (
        jnp.maximum(filled, 1))
    beta = jnp.maximum(mean_cos, 0.0)[:, None]
    memory = jnp.where(matched[:, None], (1.0 - beta) * st.memory + beta * x, st.memory)
    slot = (jnp.arange(k) == (st.count % k)[:, None])[..., None]           # [M, K, 1]
    cache = jnp.where(matched[:, None, None] & slot, x[:, None], st.cache)
    count = st.count + matched
    unseen = jnp.where(matched, 0, st.unseen + st.alive)
    alive = st.alive & (unseen < retire_frames)
    # Births: the n-th unmatched confident query (by score) goes to the n-th free column.
    used = jnp.zeros(q, bool).at[jnp.where(matched, index, q)].set(True, mode='drop')
    new = (conf & ~used)[order]
    births = order[jnp.argsort(~new, stable=True)]                          # [Q] new ones first
    rank = jnp.cumsum(~alive) - 1
    born = ~alive & (rank < jnp.sum(new))
    newq = births[jnp.clip(rank, 0, q - 1)]
    y = e[newq]
    index = jnp.where(born, newq, index)
    memory = jnp.where(born[:, None], y, memory)
    cache = jnp.where(born[:, None, None], jnp.where(jnp.arange(k)[:, None] == 0, y[:, None], 0.0),
                      cache)
    new_state = CtvisState(memory, cache, jnp.where(born, 1, count), alive | born,
                           jnp.where(born, 0, unseen), jnp.where(born, st.frame, st.birth),
                           st.frame + 1)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, st)
    out = TrackFrames(jnp.where(ok, index, -1), born & ok, new_state.alive)
    return new_state, out

  return lax.scan(frame, state, (e_all, scores.astype(jnp.float32), valid))


def track_chunk(tracker: Tracker, state, embds: jnp.ndarray, logits: jnp.ndarray,
                valid: jnp.ndarray):
  """The association of `tracker` over one chunk: embds [T, Q, C], class logits [T, Q, K+1],
  valid [T] -> (state, perm [T, Q]) for the permuting trackers, (state, TrackFrames) for 'ctvis'.
  Chunked calls give the same result as one call."""
  if tracker.kind == 'minvis':
    return associate_chunk(state, embds, valid)
  if tracker.kind == 'memory':
    return associate_memory_chunk(state, embds, foreground_score(logits), valid,
                                  jnp.float32(tracker.momentum), jnp.float32(tracker.min_score))
  if tracker.kind == 'ctvis':
    return associate_ctvis_chunk(state, embds, foreground_score(logits), valid,
                                 jnp.float32(tracker.score), jnp.float32(tracker.match),
                                 jnp.int32(tracker.retire_frames))
  raise ValueError(f'unknown tracker {tracker.kind!r}; choose one of {TRACKERS}')


def reorder(x: jnp.ndarray, perm: jnp.ndarray) -> jnp.ndarray:
  """x [T, Q, ...] -> x[t, perm[t]] for every frame: per-frame outputs in track order."""
  return jax.vmap(lambda a, p: a[p])(x, perm)


def gather_tracks(x: jnp.ndarray, index: jnp.ndarray, fill) -> jnp.ndarray:
  """x [T, Q, ...], index [T, M] (-1: none) -> [T, M, ...]: each column's query, `fill` where
  it has none."""
  y = reorder(x, jnp.maximum(index, 0))
  present = (index >= 0).reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.where(present, y, jnp.asarray(fill, x.dtype))
