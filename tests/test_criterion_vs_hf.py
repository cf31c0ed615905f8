"""minvis_jax.criterion against HF transformers' Mask2FormerLoss (same points, same matching) and
torch's grid_sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import criterion
from support.criterion_problem import B, K, N, NUM_AUX, loss_config as _loss_config
from support.criterion_problem import problem as _problem

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
m2f = pytest.importorskip('transformers.models.mask2former.modeling_mask2former')
transformers = pytest.importorskip('transformers')


def _hf_loss(outputs, targets, points_per_set, loss_config, monkeypatch):
  """HF Mask2FormerLoss.forward with torch.rand replaced by our points.

  Returns (losses, matchings, gradients of the weighted total per prediction set)."""
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
  mask_labels = [torch.from_numpy(targets['masks'][b][valid[b]].astype(np.float32))
                 for b in range(B)]
  class_labels = [torch.from_numpy(targets['labels'][b][valid[b]].astype(np.int64))
                  for b in range(B)]

  def leaf(x):
    return torch.tensor(np.asarray(x), requires_grad=True)

  aux = [{'masks_queries_logits': leaf(a['pred_masks']),
          'class_queries_logits': leaf(a['pred_logits'])}
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
  return [jax.tree.map(np.asarray, criterion.draw_points(k, B, num_slots, loss_config))
          for k in keys]


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
    src = np.asarray(criterion.match(
        pred['pred_logits'], criterion.channels_last(jnp.asarray(pred['pred_masks'])),
        pred['pred_masks'].shape[2:], targets, pts['match'], loss_config.class_weight,
        loss_config.mask_weight, loss_config.dice_weight))
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
  h, w = logits.shape[2:]

  def ours(mask, cand, fr):   # the candidates' logits, then the uncertain ones kept
    uncertain = criterion.sample_rows(mask.reshape(h * w, 1), cand, h, w)[:, 0]
    return criterion.keep_uncertain(uncertain, cand, fr, num_points)

  ours = jax.vmap(ours)(logits[:, 0], candidates, fresh)
  # top_k order may differ between torch and XLA: compare the point sets.
  ours = np.asarray(ours)
  for o, r in zip(ours, ref):
    np.testing.assert_allclose(np.sort(o[:37], axis=0), np.sort(r[:37], axis=0), atol=0)
    np.testing.assert_allclose(o[37:], r[37:], atol=0)


def test_point_sample_equals_torch_grid_sample():
  rng = np.random.default_rng(2)
  masks = rng.normal(size=(3, 5, 7)).astype(np.float32)
  # Includes the zero-padded border.
  coords = rng.uniform(-0.1, 1.1, size=(200, 2)).astype(np.float32)
  ref = m2f.sample_point(torch.from_numpy(masks)[None], torch.from_numpy(coords)[None],
                         align_corners=False)[0].numpy()
  # The criterion samples channels last: rows [H * W, C] -> [P, C].
  rows = jnp.asarray(masks).reshape(3, 5 * 7).T
  ours = np.asarray(criterion.sample_rows(rows, jnp.asarray(coords), 5, 7)).T
  np.testing.assert_allclose(ours, ref, atol=1e-6)
