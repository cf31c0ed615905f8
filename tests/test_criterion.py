"""Tests for minvis_jax.criterion in pure JAX: sampling, matching, padding, gradients, top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import criterion
from support.criterion_problem import B, H, K, N, W, loss_config as _loss_config
from support.criterion_problem import problem as _problem


def point_sample(masks: jax.Array, coords: jax.Array) -> jax.Array:
  """Reference: masks [C, H, W] at coords [P, 2] (x, y in [0, 1]) -> [C, P] as a dense sum of tent
  weights over all pixels (torch grid_sample, align_corners=False, zero padding)."""
  _, height, width = masks.shape
  x = coords[:, 0] * width - 0.5                                                  # [P]
  y = coords[:, 1] * height - 0.5
  wx = jnp.maximum(0.0, 1.0 - jnp.abs(x[:, None] - jnp.arange(width)[None]))     # [P, W]
  wy = jnp.maximum(0.0, 1.0 - jnp.abs(y[:, None] - jnp.arange(height)[None]))    # [P, H]
  return jnp.einsum('ph,pw,chw->cp', wy, wx, masks.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _match(pred, targets, coords):
  """criterion.match of [B, Q, h, w] predictions with Mask2Former's cost weights."""
  config = _loss_config()
  masks = jnp.asarray(pred['pred_masks'])
  return criterion.match(pred['pred_logits'], criterion.channels_last(masks), masks.shape[2:],
                         targets, coords, config.class_weight, config.mask_weight,
                         config.dice_weight)


def test_matched_and_target_sampling_equal_point_sample_per_slot():
  """The loss samples every slot's matched prediction (from channels-last rows) and target at the
  slot's own points by flat per-image gathers: the same values, and gradients, as point_sample of
  each slot's mask on its own."""
  rng = np.random.default_rng(5)
  b, q, n, h, w, p = 2, 6, 3, 5, 7, 40
  pred = jnp.asarray(rng.normal(size=(b, q, h, w)).astype(np.float32))
  targets = jnp.asarray((rng.random((b, n, 2 * h, 2 * w)) > 0.5).astype(np.uint8))
  src = jnp.asarray(np.stack([rng.permutation(q)[:n] for _ in range(b)]).astype(np.int32))
  coords = jnp.asarray(rng.uniform(-0.1, 1.1, size=(b, n, p, 2)).astype(np.float32))
  ct = jnp.asarray(rng.normal(size=(b, n, p)).astype(np.float32))

  def ours(pred):
    return criterion.sample_matched(criterion.channels_last(pred), (h, w), src, coords)

  def reference(pred):
    return jnp.stack([jnp.stack([point_sample(pred[i, src[i, j]][None], coords[i, j])[0]
                                 for j in range(n)]) for i in range(b)])

  np.testing.assert_allclose(ours(pred), reference(pred), atol=1e-6)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * ct))(pred)
  np.testing.assert_allclose(grad(ours), grad(reference), atol=1e-6)
  assert float(jnp.abs(grad(ours)).sum()) > 0
  expected = np.stack([np.stack([np.asarray(point_sample(targets[i, j][None],
                                                                   coords[i, j]))[0]
                                 for j in range(n)]) for i in range(b)])
  np.testing.assert_allclose(criterion.sample_targets(targets, coords), expected, atol=1e-6)


def test_zero_instances_and_padding():
  loss_config = _loss_config(64)
  key = jax.random.key(3)
  fn = jax.jit(lambda o, t, k: criterion.set_criterion(o, t, k, loss_config))
  # An image with zero instances (and a whole batch without any): finite, mask terms 0 for it.
  outputs, targets = _problem(seed=4, num_valid=(0, 2, 0))
  loss, metrics = fn(outputs, targets, key)
  assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
  outputs, empty = _problem(seed=4, num_valid=(0, 0, 0))
  loss, metrics = fn(outputs, empty, key)
  assert np.isfinite(float(loss))
  assert float(metrics['loss_mask']) == 0.0 and float(metrics['loss_dice']) == 0.0
  # All queries target "no object": the class loss is the plain mean no-object NLL.
  logp = jax.nn.log_softmax(outputs['pred_logits'], -1)[..., -1]
  np.testing.assert_allclose(float(metrics['loss_ce']), -float(jnp.mean(logp)), rtol=1e-5)

  # Extra padded target slots (garbage masks and labels, valid False) leave every term unchanged.
  outputs, targets = _problem(seed=5, num_valid=(2, 3, 1))
  base_loss, base = fn(outputs, targets, key)
  extra = 3
  rng = np.random.default_rng(6)
  padded = {
      'labels': np.concatenate([targets['labels'], rng.integers(0, K, (B, extra))],
                               1).astype(np.int32),
      'masks': np.concatenate([targets['masks'], rng.integers(0, 2, (B, extra, H, W))],
                              1).astype(np.uint8),
      'valid': np.concatenate([targets['valid'], np.zeros((B, extra), bool)], 1),
  }
  padded_loss, padded_metrics = fn(outputs, padded, key)
  for name, value in base.items():
    np.testing.assert_allclose(float(padded_metrics[name]), float(value), rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(float(padded_loss), float(base_loss), rtol=1e-6)
  # ... and the gradients too: what lets the trainer cut the unused slots of a batch.
  grad = jax.jit(jax.grad(lambda o, t: criterion.set_criterion(o, t, key, loss_config)[0]))
  base_grads, padded_grads = grad(outputs, targets), grad(outputs, padded)
  for a, b in zip(jax.tree.leaves(padded_grads), jax.tree.leaves(base_grads)):
    assert np.abs(np.asarray(b)).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradients_are_finite():
  loss_config = _loss_config(64)
  outputs, targets = _problem(seed=7, num_valid=(0, 4, 2))
  grad_fn = jax.jit(jax.grad(
      lambda o: criterion.set_criterion(o, targets, jax.random.key(0), loss_config)[0]))
  grads = grad_fn(jax.tree.map(jnp.asarray, outputs))
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  # Every prediction set receives gradient through its class and mask terms.
  for pred in [grads] + grads['aux_outputs']:
    assert np.abs(np.asarray(pred['pred_logits'])).sum() > 0
    assert np.abs(np.asarray(pred['pred_masks'])).sum() > 0


def test_non_finite_predictions_do_not_break_matching():
  loss_config = _loss_config(64)
  outputs, targets = _problem(seed=8)
  outputs['pred_masks'] = outputs['pred_masks'].copy()
  outputs['pred_masks'][0, 0] = np.nan  # one diverged query
  src = _match(outputs, targets, jax.random.uniform(jax.random.key(0), (B, 64, 2)))
  src = np.asarray(src)
  # Q > N: the NaN query is never needed, so no real target is matched to it.
  assert not np.any((src[0] == 0) & targets['valid'][0])
  assert all(len(np.unique(s)) == N for s in src)
  del loss_config


@pytest.mark.parametrize('kind', ['normal', 'ties', 'constant'])
def test_top_k_indices_equals_lax_top_k(kind):
  rng = np.random.default_rng(9)
  values = rng.normal(size=(6, 500)).astype(np.float32)
  if kind == 'ties':
    values = np.round(values * 2) / 2
  elif kind == 'constant':
    values = np.zeros_like(values)
  values = -np.abs(values)  # the uncertainty criterion.keep_uncertain ranks
  for k in (0, 1, 123, 500):
    ours = np.asarray(jax.vmap(lambda v, k=k: criterion.top_k_indices(v, k))(values))
    ref_values = np.asarray(jax.lax.top_k(values, k)[0])
    assert all(len(np.unique(row)) == k for row in ours)
    np.testing.assert_array_equal(np.sort(np.take_along_axis(values, ours, -1), -1),
                                  np.sort(ref_values, -1))


@pytest.mark.parametrize('count', [1, 127, 128, 129, 37632])
def test_prefix_count_equals_cumsum(count):
  rng = np.random.default_rng(count)
  for density in (0.0, 0.3, 1.0):
    mask = rng.random(count) < density
    ours = np.asarray(jax.jit(criterion.prefix_count)(mask))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, np.cumsum(mask))


def test_more_slots_than_queries_is_an_error():
  outputs, targets = _problem(seed=10)
  with pytest.raises(ValueError, match='num_queries'):
    _match({'pred_logits': outputs['pred_logits'][:, :N - 1],
            'pred_masks': outputs['pred_masks'][:, :N - 1]}, targets,
           np.zeros((B, 8, 2), np.float32))


def test_sample_rows_equals_dense_point_sample():
  """The criterion's channels-last sampling, on float and uint8 rasters, against the dense tent
  sum (points beyond the border read zeros)."""
  rng = np.random.default_rng(11)
  coords = jnp.asarray(rng.uniform(-0.1, 1.1, size=(300, 2)).astype(np.float32))
  for masks in (rng.normal(size=(3, 5, 7)).astype(np.float32),
                (rng.random((4, 9, 6)) > 0.5).astype(np.uint8)):
    c, h, w = masks.shape
    ours = criterion.sample_rows(jnp.asarray(masks).reshape(c, h * w).T, coords, h, w)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours).T, point_sample(jnp.asarray(masks), coords),
                               atol=1e-6)


def test_loss_config_from_config(tiny_config):
  config = criterion.LossConfig.from_config(tiny_config.loss)
  assert config == criterion.LossConfig(**tiny_config.loss.to_dict())
  assert isinstance(config.num_points, int) and isinstance(config.class_weight, float)
  with pytest.raises(AttributeError):
    config.num_points = 3   # frozen
  del tiny_config.loss['dice_weight']
  with pytest.raises(KeyError):
    criterion.LossConfig.from_config(tiny_config.loss)


def _tpu_forms(monkeypatch):
  """Trace the criterion's TPU forms (`ops.on_tpu`) on this CPU."""
  monkeypatch.setattr(criterion.ops, 'on_tpu', lambda tpu, other, *args: tpu(*args))


def test_tpu_sampling_forms_equal_the_gathers(monkeypatch):
  """The TPU forms of the matched-mask sampling (one-hot and tent-weight matmuls), of the
  uncertain-point selection (sorts) and of the target sampling (one gather of 2 x 2 codes a point)
  give the gathers' values and gradients."""
  rng = np.random.default_rng(12)
  b, q, n, h, w, p = 2, 6, 3, 5, 7, 40
  rows = criterion.channels_last(jnp.asarray(rng.normal(size=(b, q, h, w)).astype(np.float32)))
  src = jnp.asarray(np.stack([rng.permutation(q)[:n] for _ in range(b)]).astype(np.int32))
  coords = jnp.asarray(rng.uniform(-0.1, 1.1, size=(b, n, p, 2)).astype(np.float32))
  ct = jnp.asarray(rng.normal(size=(b, n, p)).astype(np.float32))
  logits = jnp.asarray(np.round(rng.normal(size=(90,)) * 2).astype(np.float32) / 2)  # ties
  candidates = jnp.asarray(rng.random((90, 2)).astype(np.float32))
  fresh = jnp.asarray(rng.random((10, 2)).astype(np.float32))
  targets = jnp.asarray((rng.random((b, n, 2 * h, 2 * w)) > 0.5).astype(np.uint8))

  def forms():
    sample = lambda r: criterion.sample_matched(r, (h, w), src, coords)  # noqa: E731
    grad = jax.grad(lambda r: jnp.sum(sample(r) * ct))(rows)
    return (sample(rows), grad, criterion.keep_uncertain(logits, candidates, fresh, 40),
            criterion.sample_targets(targets, coords))

  gathered = forms()
  _tpu_forms(monkeypatch)
  dense = forms()
  np.testing.assert_allclose(dense[0], gathered[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dense[1], gathered[1], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(gathered[1]).sum()) > 0
  np.testing.assert_array_equal(dense[2], gathered[2])
  # The targets' 2 x 2 codes: the same products summed in the same order.
  np.testing.assert_array_equal(dense[3], gathered[3])
  assert 0 < float(gathered[3].mean()) < 1


def test_tpu_forms_give_the_same_loss_and_gradients(monkeypatch):
  """The whole criterion (matching, importance sampling, losses of 3 prediction sets) with the TPU
  forms: the same loss terms and gradients within float tolerance on a fixed batch."""
  loss_config = _loss_config(64)
  outputs, targets = _problem(seed=13, num_valid=(0, 4, 2))
  outputs = jax.tree.map(jnp.asarray, outputs)

  def run():
    fn = jax.jit(jax.value_and_grad(
        lambda o: criterion.set_criterion(o, targets, jax.random.key(3), loss_config),
        has_aux=True))
    (loss, metrics), grads = fn(outputs)
    return loss, metrics, grads

  loss, metrics, grads = run()
  _tpu_forms(monkeypatch)
  loss_tpu, metrics_tpu, grads_tpu = run()
  np.testing.assert_allclose(loss_tpu, loss, rtol=1e-5)
  assert metrics_tpu.keys() == metrics.keys()
  for name in metrics:
    np.testing.assert_allclose(metrics_tpu[name], metrics[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  for a, b in zip(jax.tree.leaves(grads_tpu), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(loss) > 0
