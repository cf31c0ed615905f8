"""The optimizer (docs/method.md §4): AdamW in two groups with global-norm clipping and the
learning-rate schedule; and gradient accumulation (`config.optim.accumulate_steps`): the recipe's
global batch in several microbatches a step, when it does not fit in a chip's memory at once
(`minvis-jax plan` says).

The microbatches are interleaved rows (index, index + steps, ...), so each stays spread over every
device of a batch sharded along its rows; the criterion divides by the whole batch's normalisers
and draws the whole batch's random points (`criterion.Whole`), so the summed loss and gradient are
the whole batch's up to float summation order.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from minvis_jax import criterion


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', str(k)) for k in path)


def decay_mask(params):
  """True where weight decay applies: conv and dense kernels only (no norms, embeddings, biases)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] == 'kernel', params)


def param_groups(params):
  """'backbone' or 'head' for every leaf (the backbone trains at lr * backbone_lr_mult)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 'backbone' if _path_names(p)[0] == 'backbone' else 'head', params)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then x `decay_factor` at each of `decay_steps`."""
  boundaries = jnp.asarray(sorted(optim.decay_steps) or [np.iinfo(np.int32).max])

  def schedule(step):
    decays = jnp.sum(step >= boundaries) if optim.decay_steps else 0
    lr = optim.lr * optim.decay_factor ** decays
    if optim.warmup_steps:
      lr = lr * jnp.minimum(1.0, (step + 1) / optim.warmup_steps)
    return lr
  return schedule


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping of all parameters, then AdamW per group (backbone at a reduced lr)."""
  schedule = learning_rate_schedule(optim)

  def adamw(mult):
    return optax.adamw(lambda step: schedule(step) * mult, b1=optim.b1, b2=optim.b2,
                       weight_decay=optim.weight_decay, mask=decay_mask)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
      optax.multi_transform({'backbone': adamw(optim.backbone_lr_mult), 'head': adamw(1.0)},
                            param_groups))


def microbatch(batch: dict, index: jax.Array, steps: int) -> dict:
  """Rows index, index + steps, ... of every array [B, ...] -> [B / steps, ...]."""
  def rows(x):
    x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:])
    return jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)
  return {k: rows(v) for k, v in batch.items()}


def value_and_grad(loss_fn: Callable, params: Any, batch: dict, steps: int, num_queries: int,
                   loss_config: criterion.LossConfig) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, terms), grads) of `loss_fn(params, batch, whole) -> (loss, terms)` over the whole
  batch, in `steps` microbatches (a scan: one compiled microbatch). steps == 1 is the plain
  `jax.value_and_grad` with whole=None."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn(params, batch, None)
  whole = criterion.Whole.of(batch['valid'], num_queries, steps, loss_config)

  def one(carry, index):
    part = dataclasses.replace(whole, index=index)
    out = grad_fn(params, microbatch(batch, index, steps), part)
    return jax.tree.map(jnp.add, carry, out), None

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
      grad_fn, params, microbatch(batch, jnp.int32(0), steps), whole))
  out, _ = jax.lax.scan(one, zeros, jnp.arange(steps, dtype=jnp.int32))
  return out
