"""Gradient accumulation (`config.optim.accumulate_steps`): the recipe's global batch in several
microbatches a step, when it does not fit in a chip's memory at once (`minvis-jax plan` says).

The microbatches are interleaved rows (index, index + steps, ...), so each stays spread over every
device of a batch sharded along its rows; the criterion divides by the whole batch's normalisers
and draws the whole batch's random points (`criterion.Whole`), so the summed loss and gradient are
the whole batch's up to float summation order.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from minvis_jax import criterion


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
