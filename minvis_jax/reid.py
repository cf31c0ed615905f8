"""Re-identification training (docs/reid.md): the contrastive loss of the reid head between two
views of one frame, and its wiring into the train step (loss, updates, input, initialisation).

A batch of B images holds B / 2 pairs: rows 2p and 2p + 1 are views A and B of one annotated
frame, and target slot g is the same instance in both (`data/pairs.py`). For every slot matched in
both views (the criterion's last-layer Hungarian matching, `last_layer_match`), the anchor is A's
matched query, the positive B's matched query and the negatives all other queries of B, so the
query that held the instance in A is a hard negative whenever the instance moved; and the same
from B to A. Per item, with raw dot products d_q = v . e_q over the other view's queries e:

  con = logsumexp_q(d_q) - d_target            (cross-entropy, one positive)
  aux = mean_q (cos(v, e_q) - [q == target])^2

loss = con_weight * mean(con) + aux_weight * mean(aux) over the items of both directions, in
float32 (weights 2 and 3 as in IDOL / CTVIS).
"""

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax

from minvis_jax import criterion
from minvis_jax.data import input_pipeline
from minvis_jax.data import pairs

# The loss terms a train step logs (those the batch's loss has).
LOGGED = ('loss_ce', 'loss_mask', 'loss_dice', 'loss_reid', 'loss_reid_aux', 'slot_agreement')


def last_layer_match(outputs: dict[str, Any], targets: dict[str, jax.Array], key: jax.Array,
                     loss_config: criterion.LossConfig) -> jax.Array:
  """The query matched to each target slot by `criterion.set_criterion`'s matching of the final
  prediction set, for the same `key` (the same sampling points): src [B, N] int32."""
  num_sets = 1 + len(outputs.get('aux_outputs') or [])
  batch, num_slots = targets['labels'].shape
  points = criterion.draw_points(jax.random.split(key, num_sets)[0], batch, num_slots,
                                 loss_config)
  return criterion.match(outputs['pred_logits'], criterion.channels_last(outputs['pred_masks']),
                         outputs['pred_masks'].shape[2:], targets, points['match'],
                         loss_config.class_weight, loss_config.mask_weight,
                         loss_config.dice_weight)


def _normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def direction_terms(anchors: jax.Array, other: jax.Array,
                    target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One direction of one pair: anchors [N, D] (the anchor view's matched queries), other [Q, D]
  (all queries of the other view), target [N] (the other view's matched query) ->
  (con [N], aux [N]) per item, float32."""
  anchors, other = anchors.astype(jnp.float32), other.astype(jnp.float32)
  logits = jnp.einsum('nd,qd->nq', anchors, other, precision=jax.lax.Precision.HIGHEST)
  positive = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  con = jax.nn.logsumexp(logits, axis=1) - positive
  cos = jnp.einsum('nd,qd->nq', _normalise(anchors), _normalise(other),
                   precision=jax.lax.Precision.HIGHEST)
  label = jax.nn.one_hot(target, other.shape[0], dtype=jnp.float32)
  aux = jnp.mean((cos - label) ** 2, axis=1)
  return con, aux


def pair_loss(reid: jax.Array, src: jax.Array, valid: jax.Array, con_weight: float,
              aux_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The contrastive loss of a batch of view pairs (module docstring).

  Args:
    reid: [B, Q, D] reid embeddings, B even, rows 2p and 2p + 1 the views of pair p.
    src: [B, N] the query matched to each target slot (`last_layer_match`).
    valid: [B, N] bool, the slot's instance is present in that view.
    con_weight, aux_weight: the weights of the two terms.

  Returns:
    (loss, {'loss_reid', 'loss_reid_aux', 'reid_items', 'slot_agreement'}): the unweighted means,
    the number of items (slots present in both views) and the share of them matched to the same
    query index in both views. No item: loss 0.
  """
  b, q, d = reid.shape
  reid = reid.reshape(b // 2, 2, q, d)
  src = src.reshape(b // 2, 2, -1)
  both = jnp.all(valid.reshape(b // 2, 2, -1), axis=1)                       # [P, N]
  gather = lambda e, s: jnp.take_along_axis(e, s[:, :, None], axis=1)       # noqa: E731
  a_to_b = jax.vmap(direction_terms)(gather(reid[:, 0], src[:, 0]), reid[:, 1], src[:, 1])
  b_to_a = jax.vmap(direction_terms)(gather(reid[:, 1], src[:, 1]), reid[:, 0], src[:, 0])
  items = jnp.sum(both.astype(jnp.float32))
  count = jnp.maximum(2.0 * items, 1.0)
  mean = lambda i: (jnp.sum(jnp.where(both, a_to_b[i], 0.0))                # noqa: E731
                    + jnp.sum(jnp.where(both, b_to_a[i], 0.0))) / count
  con, aux = mean(0), mean(1)
  same = jnp.sum((both & (src[:, 0] == src[:, 1])).astype(jnp.float32))
  metrics = {'loss_reid': con, 'loss_reid_aux': aux, 'reid_items': items,
             'slot_agreement': same / jnp.maximum(items, 1.0)}
  return con_weight * con + aux_weight * aux, metrics


def training_loss(outputs: dict[str, Any], targets: dict[str, jax.Array], key: jax.Array,
                  loss_config: criterion.LossConfig, config: ml_collections.ConfigDict,
                  whole: criterion.Whole | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of `config`'s model: `criterion.set_criterion` without a reid head; with
  one (batches of view pairs) the detection loss on every view plus `pair_loss`, or with
  `model.reid_detach` `pair_loss` alone (only the head trains: `apply_updates`). whole: a
  microbatch's share of the batch under gradient accumulation (`optim.value_and_grad`; not with a
  reid head, whose view pairs a microbatch would split: config_lib.validate refuses it)."""
  if not config.model.get('reid'):
    return criterion.set_criterion(outputs, targets, key, loss_config,
                                   **({} if whole is None else {'whole': whole}))
  src = last_layer_match(outputs, targets, key, loss_config)
  loss, terms = pair_loss(outputs['pred_reid'], src, targets['valid'], config.reid.con_weight,
                          config.reid.aux_weight)
  if config.model.reid_detach:
    return loss, terms
  detection, det_terms = criterion.set_criterion(outputs, targets, key, loss_config)
  return detection + loss, {**det_terms, **terms}


def apply_updates(config: ml_collections.ConfigDict, params: Any, updates: Any) -> Any:
  """optax.apply_updates; with `model.reid_detach` every parameter but the reid head's stays
  bit-identical (AdamW's decoupled weight decay would move the detector even without gradient)."""
  new = optax.apply_updates(params, updates)
  if not (config.model.get('reid') and config.model.get('reid_detach')):
    return new
  return {k: (new[k] if k == 'reid_head' else v) for k, v in params.items()}


def add_missing_head(loaded: dict, like: dict) -> None:
  """Initialisation from a checkpoint without a reid head (a MinVIS / Mask2Former one) for a
  model with one: the head's leaves are `like`'s own (random); every other leaf must still match
  exactly. In place on `loaded` ({'params', ...} host arrays)."""
  if 'reid_head' in like['params'] and 'reid_head' not in loaded['params']:
    loaded['params']['reid_head'] = like['params']['reid_head']


def train_iterator(config: ml_collections.ConfigDict, start_step: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """The trainer's input: view pairs (`data/pairs.py`) with `model.reid`, else single frames."""
  if config.model.get('reid'):
    return pairs.train_iterator(config, start_step, process_index, process_count)
  return input_pipeline.train_iterator(config, start_step, process_index, process_count)
