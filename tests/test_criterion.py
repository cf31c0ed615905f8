"""Tests for minvis_jax.criterion against HF transformers' Mask2FormerLoss (same points, same matching)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import config_lib  # noqa: F401  (registers minvis_jax.configs in a checkout)
from minvis_jax import criterion
from minvis_jax.configs import common

torch = pytest.importorskip('torch')
m2f = pytest.importorskip('transformers.models.mask2former.modeling_mask2former')
transformers = pytest.importorskip('transformers')

B, Q, K, N, H, W = 3, 10, 6, 5, 32, 48
NUM_VALID = (3, 5, 1)  # real instances per image (N = 5 slots)
NUM_AUX = 2


def _loss_config(num_points: int = 96):
  config = common.loss_config()
  config.num_points = num_points
  return config


def _problem(seed: int = 0, num_valid=NUM_VALID):
  """Random predictions (final + NUM_AUX aux sets) and padded targets."""
  rng = np.random.default_rng(seed)
  sets = [{'pred_logits': rng.normal(size=(B, Q, K + 1)).astype(np.float32) * 2.0,
           'pred_masks': rng.normal(size=(B, Q, H // 4, W // 4)).astype(np.float32) * 3.0}
          for _ in range(NUM_AUX + 1)]
  labels = rng.integers(0, K, size=(B, N)).astype(np.int32)
  # Blobby target masks: a random rectangle per instance.
  masks = np.zeros((B, N, H, W), np.uint8)
  for b in range(B):
    for n in range(N):
      y0, x0 = rng.integers(0, H - 8), rng.integers(0, W - 8)
      masks[b, n, y0:y0 + rng.integers(4, H - y0), x0:x0 + rng.integers(4, W - x0)] = 1
  valid = np.arange(N)[None, :] < np.asarray(num_valid)[:, None]
  masks = masks * valid[..., None, None]
  labels = labels * valid
  outputs = dict(sets[-1], aux_outputs=sets[:-1])
  targets = {'labels': labels, 'masks': masks, 'valid': valid}
  return outputs, targets


def _hf_loss(outputs, targets, points_per_set, loss_config, monkeypatch):
  """HF Mask2FormerLoss.forward with torch.rand replaced by our points. Returns (losses, matchings)."""
  config = transformers.Mask2FormerConfig(
      num_labels=K, no_object_weight=loss_config.no_object_weight,
      class_weight=loss_config.class_weight, mask_weight=loss_config.mask_weight,
      dice_weight=loss_config.dice_weight, train_num_points=loss_config.num_points,
      oversample_ratio=loss_config.oversample_ratio,
      importance_sample_ratio=loss_config.importance_sample_ratio)
  loss = m2f.Mask2FormerLoss(config, weight_dict={})
  queue = []
  matchings = []

  def fake_rand(*shape, **kwargs):
    expected, value = queue.pop(0)
    assert tuple(shape) == expected, (shape, expected)
    return torch.from_numpy(np.array(value, copy=True))

  monkeypatch.setattr(torch, 'rand', fake_rand)
  # HF draws: per prediction set, the matcher's points per image, then the candidates and the fresh
  # points of all matched pairs (ordered by image, then by query).
  set_index = [0]
  original_matcher_forward = loss.matcher.forward
  original_loss_masks = loss.loss_masks

  def matcher_forward(*args, **kwargs):
    points = points_per_set[set_index[0]]
    for b in range(B):
      queue.append(((1, loss_config.num_points, 2), points['match'][b][None]))
    indices = original_matcher_forward(*args, **kwargs)
    matchings.append([(i.numpy(), j.numpy()) for i, j in indices])
    return indices

  def loss_masks(masks_queries_logits, mask_labels, indices, num_masks):
    points = points_per_set[set_index[0]]
    pairs = [(b, n) for b, (_, js) in enumerate(indices) for n in js.numpy()]
    cand = np.stack([points['candidates'][b, n] for b, n in pairs])
    fresh = np.stack([points['fresh'][b, n] for b, n in pairs])
    queue.append((cand.shape, cand))
    queue.append((fresh.shape, fresh))
    set_index[0] += 1
    return original_loss_masks(masks_queries_logits, mask_labels, indices, num_masks)

  monkeypatch.setattr(loss.matcher, 'forward', matcher_forward)
  monkeypatch.setattr(loss, 'loss_masks', loss_masks)
  valid = targets['valid']
  mask_labels = [torch.from_numpy(targets['masks'][b][valid[b]].astype(np.float32)) for b in range(B)]
  class_labels = [torch.from_numpy(targets['labels'][b][valid[b]].astype(np.int64)) for b in range(B)]
  leaf = lambda x: torch.tensor(np.asarray(x), requires_grad=True)
  aux = [{'masks_queries_logits': leaf(a['pred_masks']), 'class_queries_logits': leaf(a['pred_logits'])}
         for a in outputs['aux_outputs']]
  final = {'masks_queries_logits': leaf(outputs['pred_masks']),
           'class_queries_logits': leaf(outputs['pred_logits'])}
  # HF's forward handles the final set first, then aux sets in order: same as our key order.
  losses = loss(final['masks_queries_logits'], final['class_queries_logits'], mask_labels,
                class_labels, auxiliary_predictions=aux)
  assert not queue
  weights = {'loss_cross_entropy': loss_config.class_weight, 'loss_mask': loss_config.mask_weight,
             'loss_dice': loss_config.dice_weight}
  total = sum(weights[name if name in weights else name.rsplit('_', 1)[0]] * value
              for name, value in losses.items())
  total.backward()
  grads = [{'pred_masks': s['masks_queries_logits'].grad.numpy(),
            'pred_logits': s['class_queries_logits'].grad.numpy()} for s in [final] + aux]
  return {k: float(v.detach()) for k, v in losses.items()}, matchings, grads


def _our_points(key, loss_config, num_sets, num_slots=N):
  keys = jax.random.split(key, num_sets)
  return [jax.tree.map(np.asarray, criterion.draw_points(k, B, num_slots, loss_config)) for k in keys]


def test_equals_hf_mask2former_loss(monkeypatch):
  loss_config = _loss_config()
  outputs, targets = _problem()
  key = jax.random.key(42)
  loss, metrics = jax.jit(
      lambda o, t, k: criterion.set_criterion(o, t, k, loss_config))(outputs, targets, key)
  points = _our_points(key, loss_config, NUM_AUX + 1)
  hf, hf_matchings, hf_grads = _hf_loss(outputs, targets, points, loss_config, monkeypatch)

  # Same matching on every prediction set (the final set first, then the aux sets).
  sets = [outputs] + outputs['aux_outputs']
  for pred, pts, hf_match in zip(sets, points, hf_matchings):
    src = np.asarray(criterion.match(pred['pred_logits'], pred['pred_masks'], targets, pts['match']))
    for b, (rows, cols) in enumerate(hf_match):
      np.testing.assert_array_equal(src[b][cols], rows)

  names = {'loss_ce': 'loss_cross_entropy', 'loss_mask': 'loss_mask', 'loss_dice': 'loss_dice'}
  expected_total = 0.0
  weights = {'loss_ce': 2.0, 'loss_mask': 5.0, 'loss_dice': 5.0}
  assert len(metrics) == 3 * (NUM_AUX + 1) == len(hf)
  for ours_name, hf_name in names.items():
    for suffix in [''] + [f'_{i}' for i in range(NUM_AUX)]:
      ours, ref = float(metrics[ours_name + suffix]), hf[hf_name + suffix]
      np.testing.assert_allclose(ours, ref, rtol=1e-4, err_msg=ours_name + suffix)
      expected_total += weights[ours_name] * ref
  np.testing.assert_allclose(float(loss), expected_total, rtol=1e-4)

  # Gradients of the weighted total w.r.t. every prediction set equal torch's backward.
  grads = jax.grad(lambda o: criterion.set_criterion(o, targets, key, loss_config)[0])(
      jax.tree.map(jnp.asarray, outputs))
  for ours, ref in zip([grads] + grads['aux_outputs'], hf_grads):
    for name in ('pred_logits', 'pred_masks'):
      scale = np.abs(ref[name]).max()
      np.testing.assert_allclose(np.asarray(ours[name]), ref[name], atol=1e-4 * scale, err_msg=name)


def test_sample_points_matches_hf_uncertainty_sampling(monkeypatch):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 1, 7, 9)).astype(np.float32)
  num_points = 50
  candidates = rng.random((4, 150, 2)).astype(np.float32)
  fresh = rng.random((4, 13, 2)).astype(np.float32)
  queue = [torch.from_numpy(candidates), torch.from_numpy(fresh)]
  monkeypatch.setattr(torch, 'rand', lambda *shape, **kw: queue.pop(0))
  loss = m2f.Mask2FormerLoss(transformers.Mask2FormerConfig(num_labels=3), weight_dict={})
  ref = loss.sample_points_using_uncertainty(
      torch.from_numpy(logits), loss.calculate_uncertainty, num_points, 3, 0.75).numpy()
  ours = jax.vmap(lambda m, c, f: criterion.sample_points(m, c, f, num_points))(
      logits[:, 0], candidates, fresh)
  # top_k order may differ between torch and XLA: compare the point sets.
  ours = np.asarray(ours)
  for o, r in zip(ours, ref):
    np.testing.assert_allclose(np.sort(o[:37], axis=0), np.sort(r[:37], axis=0), atol=0)
    np.testing.assert_allclose(o[37:], r[37:], atol=0)


def test_point_sample_equals_torch_grid_sample():
  rng = np.random.default_rng(2)
  masks = rng.normal(size=(3, 5, 7)).astype(np.float32)
  coords = rng.uniform(-0.1, 1.1, size=(200, 2)).astype(np.float32)  # includes the zero-padded border
  ref = m2f.sample_point(torch.from_numpy(masks)[None], torch.from_numpy(coords)[None],
                         align_corners=False)[0].numpy()
  ours = np.asarray(criterion.point_sample(jnp.asarray(masks), jnp.asarray(coords)))
  np.testing.assert_allclose(ours, ref, atol=1e-6)


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
    return criterion._sample_matched(criterion.channels_last(pred), (h, w), src, coords)

  def reference(pred):
    return jnp.stack([jnp.stack([criterion.point_sample(pred[i, src[i, j]][None], coords[i, j])[0]
                                 for j in range(n)]) for i in range(b)])

  np.testing.assert_allclose(ours(pred), reference(pred), atol=1e-6)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * ct))(pred)
  np.testing.assert_allclose(grad(ours), grad(reference), atol=1e-6)
  assert float(jnp.abs(grad(ours)).sum()) > 0
  expected = np.stack([np.stack([np.asarray(criterion.point_sample(targets[i, j][None],
                                                                   coords[i, j]))[0]
                                 for j in range(n)]) for i in range(b)])
  np.testing.assert_allclose(criterion._sample_targets(targets, coords), expected, atol=1e-6)


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
      'labels': np.concatenate([targets['labels'], rng.integers(0, K, (B, extra))], 1).astype(np.int32),
      'masks': np.concatenate([targets['masks'], rng.integers(0, 2, (B, extra, H, W))], 1).astype(np.uint8),
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
  src = criterion.match(outputs['pred_logits'], outputs['pred_masks'], targets,
                        jax.random.uniform(jax.random.key(0), (B, 64, 2)))
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
  values = -np.abs(values)  # the uncertainty criterion.sample_points ranks
  for k in (0, 1, 123, 500):
    ours = np.asarray(jax.vmap(lambda v, k=k: criterion._top_k_indices(v, k))(values))
    ref_values = np.asarray(jax.lax.top_k(values, k)[0])
    assert all(len(np.unique(row)) == k for row in ours)
    np.testing.assert_array_equal(np.sort(np.take_along_axis(values, ours, -1), -1),
                                  np.sort(ref_values, -1))


@pytest.mark.parametrize('count', [1, 127, 128, 129, 37632])
def test_prefix_count_equals_cumsum(count):
  rng = np.random.default_rng(count)
  for density in (0.0, 0.3, 1.0):
    mask = rng.random(count) < density
    ours = np.asarray(jax.jit(criterion._prefix_count)(mask))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, np.cumsum(mask))


def test_more_slots_than_queries_is_an_error():
  outputs, targets = _problem(seed=10)
  with pytest.raises(ValueError, match='num_queries'):
    criterion.match(outputs['pred_logits'][:, :N - 1], outputs['pred_masks'][:, :N - 1], targets,
                    np.zeros((B, 8, 2), np.float32))
