"""optim: gradient accumulation: the microbatched loss and gradient equal the whole batch's (float
tolerance), through the real model and criterion of the tiny config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import criterion
from minvis_jax import optim
from minvis_jax import ops
from minvis_jax import train
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, (h, w), n = config.batch_size, config.data.canvas, config.data.max_instances
  masks = np.zeros((b, n, h, w), np.uint8)
  for i in range(b):
    for j in range(n):
      y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
      masks[i, j, y:y + rng.integers(8, 16), x:x + rng.integers(8, 16)] = 1
  counts = rng.integers(0, n + 1, b)
  counts[0] = n   # one full image, one empty image: uneven normalisers across microbatches
  counts[1] = 0
  return {'image': rng.integers(0, 255, (b, h, w, 3), dtype=np.uint8),
          'image_size': np.tile(np.array([[h, w]], np.int32), (b, 1)),
          'labels': rng.integers(0, config.model.num_classes, (b, n)).astype(np.int32),
          'masks': masks, 'valid': np.arange(n)[None] < counts[:, None]}


def test_microbatch_takes_interleaved_rows():
  batch = {'x': jnp.arange(12).reshape(6, 2)}
  np.testing.assert_array_equal(optim.microbatch(batch, jnp.int32(1), 3)['x'],
                                [[2, 3], [8, 9]])


def test_whole_class_weight_sum_is_loss_labels_denominator():
  valid = jnp.array([[True, True, False], [False, False, False]])
  cfg = criterion.LossConfig(2.0, 5.0, 5.0, 0.1, 16, 3.0, 0.75)
  whole = criterion.Whole.of(valid, num_queries=5, steps=2, loss_config=cfg)
  assert float(whole.class_weight_sum) == pytest.approx(2 * 5 * 0.1 + 0.9 * 2)
  assert float(whole.num_masks) == 2.0


def test_optimd_gradient_equals_the_large_batch(tiny_config, steps=4):
  config = tiny_config
  model = Mask2Former(ModelConfig.from_config(config.model))
  loss_config = criterion.LossConfig.from_config(config.loss)
  variables = jax.jit(lambda: train.init_variables(config, jax.random.PRNGKey(0)))()
  batch = jax.tree.map(jnp.asarray, _batch(config))
  key = jax.random.PRNGKey(3)

  def loss_fn(params, part, whole):   # as train.make_train_step's
    images = ops.normalize(part['image'], part['image_size'], config.data.mean, config.data.std)
    outputs = model.apply({'params': params, 'frozen': variables.get('frozen', {})}, images,
                          train=True)
    targets = {k: part[k] for k in ('labels', 'masks', 'valid')}
    return criterion.set_criterion(outputs, targets, key, loss_config, whole)

  run = jax.jit(lambda p, b, s: optim.value_and_grad(
      loss_fn, p, b, s, config.model.num_queries, loss_config), static_argnums=2)
  (loss1, terms1), grads1 = run(variables['params'], batch, 1)
  (loss_k, terms_k), grads_k = run(variables['params'], batch, steps)
  assert float(loss_k) == pytest.approx(float(loss1), rel=1e-5)
  for name in ('loss_ce', 'loss_mask', 'loss_dice'):
    assert float(terms_k[name]) == pytest.approx(float(terms1[name]), rel=1e-5), name
  flat1, flat_k = jax.tree.leaves(grads1), jax.tree.leaves(grads_k)
  scale = max(float(jnp.max(jnp.abs(g))) for g in flat1)
  for g1, gk in zip(flat1, flat_k):
    np.testing.assert_allclose(np.asarray(gk), np.asarray(g1), rtol=1e-4, atol=1e-5 * scale)
  # The check can fail: microbatches normalised by their own counts give another loss.
  own = sum(float(loss_fn(variables['params'], optim.microbatch(batch, jnp.int32(i), steps),
                          None)[0]) for i in range(steps)) / steps
  assert abs(own - float(loss1)) > 1e-3 * abs(float(loss1))


def test_train_step_with_accumulation_matches_one_batch(tiny_config):
  metrics = {}
  for steps in (1, 2):
    config = tiny_config.copy_and_resolve_references()
    config.optim.optim_steps = steps
    trainer = train.Trainer(config)
    _, metrics[steps] = trainer.step(trainer.init_state(), trainer.global_batch(_batch(config)))
  for name in ('loss', 'grad_norm', 'loss_ce', 'loss_mask', 'loss_dice', 'num_masks'):
    assert float(metrics[2][name]) == pytest.approx(float(metrics[1][name]), rel=1e-5), name
