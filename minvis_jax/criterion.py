"""Mask2Former set criterion (docs/method.md §3): Hungarian matching, class loss, point-sampled mask
BCE and dice, with deep supervision.

Shapes: B images, Q queries, K+1 classes (last = no object), N padded target slots (`valid` marks
the real ones; Q >= N), h, w the prediction resolution (H/4, W/4) and H, W the target (image)
resolution. Predicted masks are sampled channels last, as rows [B, h * w, Q] (`channels_last`).
Points are (x, y) in [0, 1]^2 over the whole mask, so predictions and targets of different
resolutions are sampled at the same places (PointRend's `point_sample`: `ops.bilinear_corners`).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from minvis_jax import matching
from minvis_jax import ops


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The criterion's hyper-parameters (`config.loss`, validated by `config_lib.validate`)."""
  class_weight: float        # weight of loss_ce and of the matcher's class cost
  mask_weight: float         # weight of loss_mask and of the matcher's BCE cost
  dice_weight: float         # weight of loss_dice and of the matcher's dice cost
  no_object_weight: float    # class weight of "no object" in loss_ce
  num_points: int            # points per mask (matcher and losses)
  oversample_ratio: float    # importance-sampling candidates per point
  importance_sample_ratio: float  # share of the points chosen by uncertainty

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> 'LossConfig':
    """`config.loss` -> LossConfig (every field required)."""
    values = {}
    for field in dataclasses.fields(cls):
      values[field.name] = int(loss[field.name]) if field.type is int else float(loss[field.name])
    return cls(**values)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['index', 'num_masks', 'class_weight_sum'], meta_fields=['steps'])
@dataclasses.dataclass(frozen=True)
class Whole:
  """The criterion's batch is microbatch `index` of `steps` (rows index, index + steps, ... of the
  whole batch, `optim.microbatch`): it draws the whole batch's random points for its rows and
  divides by the whole batch's normalisers, so the microbatches' losses sum to the whole one's."""
  index: jax.Array              # int32 scalar
  steps: int
  num_masks: jax.Array          # max(sum(valid), 1) of the whole batch
  class_weight_sum: jax.Array   # loss_labels' denominator of the whole batch

  @classmethod
  def of(cls, valid: jax.Array, num_queries: int, steps: int,
         loss_config: 'LossConfig') -> 'Whole':
    """valid [B, N] of the whole batch. Every real target is matched to its own query (Q >= N),
    so B * Q queries weigh no_object_weight except sum(valid), which weigh 1."""
    real = jnp.sum(valid.astype(jnp.float32))
    w = loss_config.no_object_weight
    return cls(jnp.zeros((), jnp.int32), steps, jnp.maximum(real, 1.0),
               valid.shape[0] * num_queries * w + (1.0 - w) * real)


def _rows_of(x: jax.Array, whole: Whole) -> jax.Array:
  """Rows index, index + steps, ... of x [B * steps, ...]."""
  x = x.reshape(x.shape[0] // whole.steps, whole.steps, *x.shape[1:])
  return jax.lax.dynamic_index_in_dim(x, whole.index, axis=1, keepdims=False)


def sample_rows(rows: jax.Array, coords: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear samples of all channels of a channels-last raster (`ops.bilinear_corners`).

  Args:
    rows: [H * W, C], any real dtype (uint8 targets are gathered before the cast to float).
    coords: [P, 2] (x, y) in [0, 1]; neighbours outside the raster count as 0.
    height, width: H and W.

  Returns:
    [P, C] float32. Gathers whole rows, which is faster on CPU than gathering per channel.
  """
  out = 0.0
  for position, weight in ops.bilinear_corners(coords, height, width):
    # Gather first, cast after: converting whole uint8 target masks to float costs more than the
    # gather. Positions are clipped: no bounds handling (jnp.take's default masks every element).
    values = rows.at[position].get(mode='promise_in_bounds').astype(jnp.float32)
    out = out + weight[:, None] * values
  return out


def _sample_slots(masks: jax.Array, coords: jax.Array, height: int, width: int) -> jax.Array:
  """Each slot's mask sampled at the slot's own points (`point_sample` per slot).

  Args:
    masks: [B, N, H * W], any dtype; coords: [B, N, P, 2] (x, y) in [0, 1].

  Returns:
    [B, N, P] float32. One gather per corner and image from the image's masks as one flat table (a
    vmap over the slots too adds an index column per gathered element). Per image, not over the
    whole batch flattened: a gather with its batch dimension explicit stays local to each device
    when the batch is sharded.
  """
  batch, num_slots, _ = masks.shape
  offset = jnp.arange(num_slots, dtype=jnp.int32)[:, None] * (height * width)

  def one_image(table, points):
    out = 0.0
    for position, weight in ops.bilinear_corners(points, height, width):
      values = table.at[offset + position].get(mode='promise_in_bounds')
      out = out + weight * values.astype(jnp.float32)
    return out
  return jax.vmap(one_image)(masks.reshape(batch, -1), coords)


def channels_last(pred_masks: jax.Array) -> jax.Array:
  """[B, Q, h, w] -> [B, h * w, Q]: the layout the criterion samples (whole rows of queries)."""
  batch, num_queries, height, width = pred_masks.shape
  return pred_masks.reshape(batch, num_queries, height * width).transpose(0, 2, 1)


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise sigmoid binary cross-entropy, numerically stable (as torch's BCEWithLogitsLoss)."""
  return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def matcher_costs(pred_logits: jax.Array, pred_rows: jax.Array, mask_size: tuple[int, int],
                  labels: jax.Array, target_masks: jax.Array, valid: jax.Array, coords: jax.Array,
                  class_weight: float, mask_weight: float, dice_weight: float) -> jax.Array:
  """Matching cost of one image: class_weight * -p[label] + mask_weight * pairwise BCE
  + dice_weight * pairwise dice.

  Args:
    pred_logits: [Q, K+1]; pred_rows: [h * w, Q] mask logits, channels last (`channels_last`);
      mask_size: (h, w).
    labels: [N] int; target_masks: [N, H, W] (any dtype, 0/1); valid: [N] bool.
    coords: [P, 2] uniform points shared by all predictions and targets.

  Returns:
    [Q, N] costs. Non-finite entries are left to `linear_sum_assignment`, which replaces them by a
    large finite value. Padded target columns are 0: a constant column cannot change the optimum of
    the real columns as long as Q >= N.
  """
  probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  cost_class = -jnp.take(probs, labels, axis=1)  # [Q, N]
  # Channels-last samples [P, Q] and [P, N]: the faster gather layout (see `sample_rows`).
  num_slots, height, width = target_masks.shape
  pred = sample_rows(pred_rows, coords, *mask_size)
  tgt = sample_rows(target_masks.reshape(num_slots, height * width).T, coords, height, width)
  num_points = coords.shape[0]
  # BCE against 1 is softplus(-x), against 0 softplus(x) = softplus(-x) + x; so the mean BCE of a
  # pair, sum_p [softplus(-x) t + softplus(x) (1 - t)] / P, is [sum_p softplus(x) - sum_p x t] / P:
  # one pairwise product (x t), shared with the dice's (sigmoid(x) t) in one matmul. softplus and
  # sigmoid share exp(-|x|).
  e = jnp.exp(-jnp.abs(pred))
  softplus = jnp.maximum(pred, 0.0) + jnp.log1p(e)
  sig = jnp.where(pred >= 0, 1.0, e) / (1.0 + e)
  num_queries = pred.shape[1]
  # Pairwise sums over points as one matmul; HIGHEST keeps accelerators from using bf16 passes here.
  pair = jnp.einsum('pq,pn->qn', jnp.concatenate([pred, sig], axis=1), tgt,
                    precision=jax.lax.Precision.HIGHEST)                       # [2Q, N]
  cost_mask = (softplus.sum(0)[:, None] - pair[:num_queries]) / num_points
  numerator = 2.0 * pair[num_queries:]
  denominator = sig.sum(0)[:, None] + tgt.sum(0)[None, :]
  cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
  cost = class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice
  # Non-finite entries (diverged predictions) stay as they are: linear_sum_assignment replaces them
  # by a finite value above any finite assignment, scaled to the finite costs.
  return jnp.where(valid[None, :], cost, 0.0)


def match(pred_logits: jax.Array, pred_rows: jax.Array, mask_size: tuple[int, int],
          targets: dict[str, jax.Array], coords: jax.Array, class_weight: float,
          mask_weight: float, dice_weight: float) -> jax.Array:
  """Hungarian matching of a batch (no gradient).

  Args:
    pred_logits: [B, Q, K+1]; pred_rows: [B, h * w, Q] mask logits, channels last
      (`channels_last`); mask_size: (h, w).
    targets: {'labels': [B, N] int, 'masks': [B, N, H, W], 'valid': [B, N] bool}.
    coords: [B, P, 2] uniform sampling points, one set per image.
    class_weight, mask_weight, dice_weight: the cost weights (`matcher_costs`).

  Returns:
    src: [B, N] int32, the query matched to each target slot (padded slots get some leftover query;
    callers mask them with `valid`).
  """
  num_queries, num_slots = pred_logits.shape[1], targets['labels'].shape[1]
  if num_queries < num_slots:
    raise ValueError(f'matching needs num_queries ({num_queries}) >= max_instances ({num_slots})')
  pred_logits, pred_rows = jax.lax.stop_gradient((pred_logits, pred_rows))
  costs = jax.vmap(
      lambda logits, masks, *a: matcher_costs(logits, masks, mask_size, *a, class_weight,
                                             mask_weight, dice_weight))(
          pred_logits, pred_rows, targets['labels'], targets['masks'], targets['valid'], coords)
  rows, cols = matching.batched_linear_sum_assignment(costs)  # [B, N] each, Q >= N
  # Every target slot is matched: invert (query, slot) pairs into the query of each slot.
  batch = jnp.arange(rows.shape[0])[:, None]
  return jnp.zeros_like(rows).at[batch, cols].set(rows)


def loss_labels(pred_logits: jax.Array, labels: jax.Array, valid: jax.Array, src: jax.Array,
                no_object_weight: float, weight_sum: jax.Array | None = None) -> jax.Array:
  """Class cross-entropy over K+1 with weight `no_object_weight` on the no-object class.

  Matched queries target their target's class, the rest "no object" (index K). A weighted mean over
  all B * Q queries: sum(w[t] * nll) / sum(w[t]), as torch's F.cross_entropy(weight=...).

  Args:
    pred_logits: [B, Q, K+1]; labels, valid, src: [B, N].
    weight_sum: the denominator when the batch is part of a larger one (`Whole`).
  """
  batch, num_queries, num_classes = pred_logits.shape
  no_object = num_classes - 1
  target = jnp.full((batch, num_queries), no_object, jnp.int32)
  # Padded slots scatter out of range and are dropped.
  src = jnp.where(valid, src, num_queries)
  target = target.at[jnp.arange(batch)[:, None], src].set(labels.astype(jnp.int32), mode='drop')
  log_probs = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
  weight = jnp.where(target == no_object, no_object_weight, 1.0)
  return jnp.sum(weight * nll) / (jnp.sum(weight) if weight_sum is None else weight_sum)


def prefix_count(mask: jax.Array, block: int = 128) -> jax.Array:
  """Inclusive cumulative count of a bool [C] as int32 [C] (= jnp.cumsum).

  A triangular matmul per block of 128 and a short cumsum of the block totals: faster than
  XLA:CPU's cumsum of a long row. Exact: 0/1 inputs, block sums <= 128.
  """
  count = mask.shape[0]
  blocks = -(-count // block)
  x = jnp.pad(mask.astype(jnp.float32), (0, blocks * block - count)).reshape(blocks, block)
  upper = jnp.triu(jnp.ones((block, block), jnp.float32))
  within = jnp.dot(x, upper, precision=jax.lax.Precision.HIGHEST)          # [blocks, block]
  offsets = jnp.cumsum(within[:, -1]) - within[:, -1]
  return (within + offsets[:, None]).reshape(-1)[:count].astype(jnp.int32)


def top_k_indices(values: jax.Array, k: int) -> jax.Array:
  """Indices [k] of the k largest entries of values [C], in ascending index order (ties: lowest
  index).

  The same set as lax.top_k (up to ties), faster on CPU for the criterion's sizes: the k-th
  largest value is found exactly by a 32-step bitwise search on the order-preserving integer image
  of the floats, then the entries above it (and enough equal ones) are compacted by their prefix
  count. Compiled for a GPU it is lax.top_k's indices, sorted (`ops.per_platform`).
  """
  return ops.per_platform(lambda v: _top_k_by_bits(v, k),
                          lambda v: jnp.sort(jax.lax.top_k(v, k)[1]).astype(jnp.int32), values)


def _top_k_by_bits(values: jax.Array, k: int) -> jax.Array:
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
  # Negative floats order backwards as integers: flip their magnitude bits; then shift to unsigned.
  key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
  key = jax.lax.bitcast_convert_type(key, jnp.uint32) ^ jnp.uint32(0x80000000)
  # The search runs in a while loop (not unrolled) so that `key` is materialised once: unrolled, XLA
  # fuses its producers (the point-sampling gathers) into each of the 32 counting passes.

  def refine(i, threshold):  # the largest t with count(key >= t) >= k, built from the top bit down
    candidate = threshold | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(jnp.sum(key >= candidate) >= k, candidate, threshold)

  threshold = jax.lax.fori_loop(0, 32, refine, jnp.uint32(0))
  above = key > threshold
  equal = key == threshold
  selected = above | (equal & (prefix_count(equal) <= k - jnp.sum(above)))
  slot = jnp.where(selected, prefix_count(selected) - 1, k)
  count = values.shape[0]
  return jnp.zeros(k, jnp.int32).at[slot].set(jnp.arange(count, dtype=jnp.int32), mode='drop')


def keep_uncertain(logits: jax.Array, candidates: jax.Array, fresh: jax.Array,
                   num_points: int) -> jax.Array:
  """PointRend importance sampling of one predicted mask, given its logits at the candidates.

  Args:
    logits: [C] the matched prediction's logits at `candidates`.
    candidates: [C, 2] uniform points (C = num_points * oversample_ratio).
    fresh: [R, 2] uniform points appended as they are.
    num_points: total points; the num_points - R candidates of largest uncertainty -|logit| are
      kept.

  Returns:
    [num_points, 2] points: the uncertain ones (in candidate order), then `fresh`.
  """
  k = num_points - fresh.shape[0]

  def gathered(logits, candidates):
    return candidates[top_k_indices(-jnp.abs(logits), k)]

  def sorted_(logits, candidates):
    # The same points, in the same order, by two sorts carrying the coordinates: XLA:TPU counts
    # about a tile of HBM traffic per index a gather (or scatter) of 2-float rows reads, 31 GB a
    # prediction set for the R50 recipe's 2 images a chip; the sorts count 0.2 GB. The k least
    # |logit| (ties: lowest index, as `top_k_indices`), then back in candidate order.
    index = jnp.arange(logits.shape[0], dtype=jnp.int32)
    _, index, x, y = jax.lax.sort((jnp.abs(logits), index, candidates[:, 0], candidates[:, 1]),
                                  num_keys=2)
    _, x, y = jax.lax.sort((index[:k], x[:k], y[:k]), num_keys=1)
    return jnp.stack([x, y], axis=-1)

  chosen = ops.on_tpu(sorted_, gathered, logits, candidates)
  return jnp.concatenate([chosen, fresh], axis=0)


def loss_masks(pred_rows: jax.Array, mask_size: tuple[int, int], target_masks: jax.Array,
               valid: jax.Array, src: jax.Array, point_coords: jax.Array,
               num_masks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Point-sampled sigmoid BCE and dice of matched pairs, each summed over masks / num_masks.

  Args:
    pred_rows: [B, h * w, Q] mask logits, channels last; mask_size: (h, w).
    target_masks: [B, N, H, W]; valid, src: [B, N].
    point_coords: [B, N, P, 2] points of each target slot's pair (from `keep_uncertain`).
    num_masks: scalar normaliser (number of real targets, at least 1).

  Returns:
    (loss_mask, loss_dice) scalars; padded slots contribute 0.
  """
  logits = sample_matched(pred_rows, mask_size, src, point_coords)             # [B, N, P]
  labels = jax.lax.stop_gradient(sample_targets(target_masks, point_coords))
  bce = _bce_with_logits(logits, labels).mean(-1)
  probs = jax.nn.sigmoid(logits)
  dice = 1.0 - (2.0 * jnp.sum(probs * labels, -1) + 1.0) / (probs.sum(-1) + labels.sum(-1) + 1.0)
  loss_mask = jnp.sum(jnp.where(valid, bce, 0.0)) / num_masks
  loss_dice = jnp.sum(jnp.where(valid, dice, 0.0)) / num_masks
  return loss_mask, loss_dice


def sample_matched(pred_rows: jax.Array, mask_size: tuple[int, int], src: jax.Array,
                   coords: jax.Array) -> jax.Array:
  """Each slot's matched prediction sampled at the slot's own points.

  Args:
    pred_rows: [B, h * w, Q] mask logits, channels last; mask_size: (h, w).
    src: [B, N] the query matched to each slot (`match`).
    coords: [B, N, P, 2] (x, y) in [0, 1].

  Returns:
    [B, N, P] float32 logits.
  """
  def gathered(pred_rows, src, coords):
    # The matched masks are copied out first, [B, N, h * w]: sampling then reads one
    # cache-resident mask per slot, faster than reading the [h * w, Q] rows at stride Q.
    matched = jnp.take_along_axis(pred_rows, src[:, None, :], axis=2).transpose(0, 2, 1)
    return _sample_slots(matched, coords, *mask_size)

  def dense(pred_rows, src, coords):
    # Matmuls instead of gathers: the matched masks by a one-hot product, then the separable
    # bilinear weights (`tent_weights`) contracted with each mask. XLA:TPU counts a gather about
    # one (8, 128) tile per index (4 corners of 37632 candidates a slot: 31 GB a prediction set
    # for 2 images); these fuse into matmuls that read the masks once: 0.3 GB and 100 GFLOP for
    # the candidates of a set of 2 images, 2 GB and 67 GFLOP for the loss points with gradient.
    height, width = mask_size
    one_hot = jax.nn.one_hot(src, pred_rows.shape[2], dtype=pred_rows.dtype)       # [B, N, Q]
    matched = jnp.einsum('bpq,bnq->bnp', pred_rows, one_hot, precision=_EXACT)
    return sample_dense(matched.reshape(*src.shape, height, width), coords)

  return ops.on_tpu(dense, gathered, pred_rows, src, coords)


# f32 products on accelerators (TPU: six bf16 passes): a one-hot product then copies its values.
_EXACT = jax.lax.Precision.HIGHEST


def tent_weights(coords: jax.Array, size: int) -> jax.Array:
  """Bilinear weights [..., size] of the points' coordinates coords [...] in [0, 1] along a side of
  `size` pixels (align_corners=False): max(0, 1 - |c * size - 0.5 - i|), the weights of
  `ops.bilinear_corners` at its two corners (0 elsewhere and outside the raster)."""
  pixel = coords * size - 0.5
  return jnp.maximum(0.0, 1.0 - jnp.abs(pixel[..., None] - jnp.arange(size, dtype=jnp.float32)))


@jax.custom_vjp
def sample_dense(masks: jax.Array, coords: jax.Array) -> jax.Array:
  """`_sample_slots` by matmuls: masks [B, N, h, w] float32, coords [B, N, P, 2] -> [B, N, P]
  float32, sum_ij wy[p, i] masks[i, j] wx[p, j] (the same terms, summed in another order).

  Differentiable in `masks` only (the criterion's points carry no gradient; coords get zeros). The
  backward pass recomputes the weights inside its matmul instead of keeping wx [B, N, P, w]
  (0.5 GB a prediction set for the R50 recipe's loss points)."""
  height, width = masks.shape[2:]
  wx = tent_weights(coords[..., 0], width)                                       # [B, N, P, w]
  wy = tent_weights(coords[..., 1], height)                                      # [B, N, P, h]
  rows = jnp.einsum('bnhw,bnpw->bnph', masks, wx, precision=_EXACT)
  return jnp.sum(rows * wy, axis=-1)


def _sample_dense_fwd(masks, coords):
  return sample_dense(masks, coords), (masks.shape, coords)


def _sample_dense_bwd(res, grad):
  (_, _, height, width), coords = res
  wx = tent_weights(coords[..., 0], width)
  wy = tent_weights(coords[..., 1], height) * grad[..., None]
  dmasks = jnp.einsum('bnph,bnpw->bnhw', wy, wx, precision=_EXACT)
  return dmasks, jnp.zeros_like(coords)


sample_dense.defvjp(_sample_dense_fwd, _sample_dense_bwd)


def sample_targets(target_masks: jax.Array, coords: jax.Array) -> jax.Array:
  """Target masks [B, N, H, W] (0/1, any dtype) sampled at their slots' points coords
  [B, N, P, 2] -> [B, N, P] float32."""
  batch, num_slots, height, width = target_masks.shape

  def gathered(target_masks, coords):
    return _sample_slots(target_masks.reshape(batch, num_slots, -1), coords, height, width)

  def quads(target_masks, coords):
    # One uint8 gather a point instead of four: each pixel's code holds its 2 x 2 block's bits
    # (`ops.CORNERS` order, zero outside the raster). XLA:TPU counts a gather about a tile per
    # index: 5.0 -> 1.6 GB a prediction set for the R50 recipe's 2 images a chip.
    code = quad_codes(target_masks)                                    # [B, N, H + 1, W + 1]
    x0 = jnp.floor(coords[..., 0] * width - 0.5)
    y0 = jnp.floor(coords[..., 1] * height - 0.5)
    # Bases beyond the padded raster have all four weights 0: any code will do.
    base = (jnp.clip(y0 + 1, 0, height) * (width + 1) + jnp.clip(x0 + 1, 0, width)).astype(
        jnp.int32)
    offset = jnp.arange(num_slots, dtype=jnp.int32)[:, None] * ((height + 1) * (width + 1))
    bits = jax.vmap(lambda table, b: table.at[offset + b].get(mode='promise_in_bounds'))(
        code.reshape(batch, -1), base)
    out = 0.0
    for bit, (_, weight) in enumerate(ops.bilinear_corners(coords, height, width)):
      out = out + weight * ((bits >> bit) & 1).astype(jnp.float32)
    return out

  return ops.on_tpu(quads, gathered, target_masks, coords)


def quad_codes(masks: jax.Array) -> jax.Array:
  """0/1 masks [..., H, W] -> uint8 [..., H + 1, W + 1]: code[y + 1, x + 1] has bit k set where
  corner k (`ops.CORNERS`: (0, 0), (1, 0), (0, 1), (1, 1) as (dx, dy)) of the block at (y, x) is
  set; pixels outside the mask read 0."""
  pad = [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)]
  m = jnp.pad((masks != 0).astype(jnp.uint8), pad)                    # [..., H + 2, W + 2]
  code = 0
  for bit, (dx, dy) in enumerate(ops.CORNERS):
    code = code | (m[..., dy:dy + m.shape[-2] - 1, dx:dx + m.shape[-1] - 1] << bit)
  return code.astype(jnp.uint8)


def _uniform_points(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform points [*shape, 2] in (0, 1)^2, x and y from the two halves of one random 32-bit word.

  16 bits per coordinate (1/65536 of the mask side) is far finer than any mask, and halves the cost
  of the random numbers (millions of importance-sampling candidates per step).
  """
  bits = jax.random.bits(key, shape, jnp.uint32)
  halves = jnp.stack([bits & jnp.uint32(0xFFFF), bits >> 16], axis=-1)
  return (halves.astype(jnp.float32) + 0.5) / 65536.0


def _uniform_per_slot(key: jax.Array, batch: int, num_slots: int, count: int) -> jax.Array:
  """Uniform [B, N, count, 2] points drawn per target slot (fold_in), so padding adds slots without
  changing the draws of the real ones."""
  draw = lambda n: _uniform_points(jax.random.fold_in(key, n), (batch, count))
  return jnp.moveaxis(jax.vmap(draw)(jnp.arange(num_slots)), 0, 1)


def draw_points(key: jax.Array, batch: int, num_slots: int,
                loss_config: LossConfig) -> dict[str, jax.Array]:
  """Uniform random points of one prediction set.

  Returns:
    {'match': [B, P, 2] the matcher's points (one set per image),
     'candidates': [B, N, P * oversample_ratio, 2] importance-sampling candidates per target slot,
     'fresh': [B, N, P - importance_sample_ratio * P, 2] uniform points added per target slot}.
  """
  num_points = loss_config.num_points
  num_candidates = int(num_points * loss_config.oversample_ratio)
  num_uncertain = int(loss_config.importance_sample_ratio * num_points)
  key_match, key_candidates, key_fresh = jax.random.split(key, 3)
  return {
      'match': _uniform_points(key_match, (batch, num_points)),
      'candidates': _uniform_per_slot(key_candidates, batch, num_slots, num_candidates),
      'fresh': _uniform_per_slot(key_fresh, batch, num_slots, num_points - num_uncertain),
  }


def prediction_set_losses(pred_logits: jax.Array, pred_rows: jax.Array, mask_size: tuple[int, int],
                          targets: dict[str, jax.Array], points: dict[str, jax.Array],
                          num_masks: jax.Array, loss_config: LossConfig,
                          class_weight_sum: jax.Array | None = None) -> dict[str, jax.Array]:
  """loss_ce, loss_mask, loss_dice of one prediction set, with its own matching.

  Args:
    pred_logits: [B, Q, K+1]; pred_rows: [B, h * w, Q] mask logits, channels last;
    mask_size: (h, w); targets as in `match`.
    points: random points from `draw_points`.
    num_masks: scalar normaliser.
  """
  num_points = loss_config.num_points
  src = match(pred_logits, pred_rows, mask_size, targets, points['match'],
               loss_config.class_weight, loss_config.mask_weight, loss_config.dice_weight)
  uncertain = sample_matched(jax.lax.stop_gradient(pred_rows), mask_size, src,
                             points['candidates'])                               # [B, N, C]
  coords = jax.vmap(jax.vmap(lambda u, c, f: keep_uncertain(u, c, f, num_points)))(
      uncertain, points['candidates'], points['fresh'])
  loss_mask, loss_dice = loss_masks(pred_rows, mask_size, targets['masks'], targets['valid'], src,
                                    coords, num_masks)
  loss_ce = loss_labels(pred_logits, targets['labels'], targets['valid'], src,
                        loss_config.no_object_weight, class_weight_sum)
  return {'loss_ce': loss_ce, 'loss_mask': loss_mask, 'loss_dice': loss_dice}


def set_criterion(outputs: dict[str, Any], targets: dict[str, jax.Array], key: jax.Array,
                  loss_config: LossConfig, whole: Whole | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The Mask2Former training loss with deep supervision (docs/method.md §3).

  Args:
    outputs: the model output: 'pred_logits' [B, Q, K+1], 'pred_masks' [B, Q, h, w] and
      'aux_outputs', a list of {'pred_logits', 'pred_masks'} (may be empty or absent).
    targets: {'labels': int [B, N], 'masks': uint8 [B, N, H, W], 'valid': bool [B, N]}.
    key: PRNG key; prediction set i (final first, then aux in order) draws its points with
      `draw_points(jax.random.split(key, num_sets)[i], ...)`.
    loss_config: the weights and point counts (`LossConfig.from_config(config.loss)`).
    whole: set when the batch is a microbatch of a larger one (gradient accumulation).

  Returns:
    (loss, metrics): the weighted sum over all prediction sets, and a flat dict with loss_ce,
    loss_mask, loss_dice of the final set and loss_ce_i, loss_mask_i, loss_dice_i of aux set i.

  num_masks = max(sum(valid), 1) over the whole batch given. Under jit on a batch sharded across
  devices and hosts this sum is already the global count (XLA inserts the reduction), so the loss is
  the global mean the original obtains with an all-reduce; images without instances are legal (all
  their queries target "no object", their mask terms are 0).
  """
  num_masks = jnp.maximum(jnp.sum(targets['valid'].astype(jnp.float32)), 1.0)
  steps, weight_sum = 1, None
  if whole is not None:
    steps, num_masks, weight_sum = whole.steps, whole.num_masks, whole.class_weight_sum
  sets = [(outputs['pred_logits'], outputs['pred_masks'])]
  sets += [(aux['pred_logits'], aux['pred_masks']) for aux in outputs.get('aux_outputs') or []]
  keys = jax.random.split(key, len(sets))
  num_slots = targets['labels'].shape[1]

  mask_size = outputs['pred_masks'].shape[2:]

  def one_set(carry, xs):
    logits, rows, set_key = xs
    points = draw_points(set_key, logits.shape[0] * steps, num_slots, loss_config)
    if whole is not None:
      points = {k: _rows_of(v, whole) for k, v in points.items()}
    return carry, prediction_set_losses(logits, rows, mask_size, targets, points, num_masks,
                                        loss_config, weight_sum)

  # One scan over the (equally shaped) prediction sets: the same numbers as a Python loop, but XLA
  # compiles the matcher and the losses once instead of once per set.
  # The masks go in channels last, transposed in the stacking copy: inside the loop XLA fused the
  # transpose into the matcher's row gathers, which then read one float per row instead of a row.
  stacked = (jnp.stack([s[0] for s in sets]), jnp.stack([channels_last(s[1]) for s in sets]), keys)
  _, terms = jax.lax.scan(one_set, None, stacked)   # {name: [num_sets]}
  weights = {'loss_ce': loss_config.class_weight, 'loss_mask': loss_config.mask_weight,
             'loss_dice': loss_config.dice_weight}
  metrics = {}
  total = 0.0
  for i in range(len(sets)):
    suffix = '' if i == 0 else f'_{i - 1}'
    for name, value in terms.items():
      metrics[name + suffix] = value[i]
      total = total + weights[name] * value[i]
  return total, metrics
