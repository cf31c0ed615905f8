"""Re-identification training: the contrastive loss against numpy, the detached head, the
initialisation from a checkpoint without a head, the detector kept by the updates."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import criterion
from minvis_jax import reid
from minvis_jax import train
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig
from minvis_jax.models import mask2former
from support.variables import random_variables


def numpy_pair_loss(emb, src, valid, con_weight, aux_weight):
  """Item by item, float64: anchor = one view's matched query, positive = the other view's matched
  query, negatives = every other query of the other view; both directions."""
  emb = emb.astype(np.float64)
  cons, auxs, same = [], [], 0
  for p in range(len(emb) // 2):
    for g in range(src.shape[1]):
      if not (valid[2 * p, g] and valid[2 * p + 1, g]):
        continue
      same += int(src[2 * p, g] == src[2 * p + 1, g])
      for a, b in ((2 * p, 2 * p + 1), (2 * p + 1, 2 * p)):
        v = emb[a, src[a, g]]
        d = emb[b] @ v
        top = d.max()
        cons.append(top + np.log(np.sum(np.exp(d - top))) - d[src[b, g]])
        cos = d / (np.linalg.norm(emb[b], axis=1) * np.linalg.norm(v))
        label = np.arange(len(d)) == src[b, g]
        auxs.append(np.mean((cos - label) ** 2))
  con = np.mean(cons) if cons else 0.0
  aux = np.mean(auxs) if auxs else 0.0
  return con_weight * con + aux_weight * aux, con, aux, same / max(len(cons) // 2, 1)


def test_pair_loss_equals_numpy_both_directions_and_masked_slots():
  rng = np.random.default_rng(0)
  b, q, n, d = 6, 9, 4, 16
  emb = rng.normal(size=(b, q, d)).astype(np.float32)
  src = np.stack([rng.permutation(q)[:n] for _ in range(b)]).astype(np.int32)
  src[1, 0] = src[0, 0]                      # one instance kept its slot
  valid = rng.random((b, n)) < 0.7
  valid[0, :2] = valid[1, :2] = True         # at least two items
  valid[4:] = False                          # a pair with no instance at all: no item
  valid[2, 3], valid[3, 3] = True, False     # present in one view only: no item
  loss, metrics = jax.jit(reid.pair_loss, static_argnums=(3, 4))(emb, src, valid, 2.0, 3.0)
  want, con, aux, agree = numpy_pair_loss(emb, src, valid, 2.0, 3.0)
  np.testing.assert_allclose(float(metrics['loss_reid']), con, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_reid_aux']), aux, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics['reid_items']) == np.sum(valid[0::2] & valid[1::2])
  np.testing.assert_allclose(float(metrics['slot_agreement']), agree, rtol=1e-6)
  # One direction alone would differ: the reference's symmetry is the thing tested.
  assert abs(con - numpy_pair_loss(emb[[0, 1]], src[[0, 1]], valid[[0, 1]], 1, 0)[1]) > 1e-3


def test_pair_loss_all_negative_rows_and_no_items():
  rng = np.random.default_rng(1)
  # Every dot product large and negative (and very unequal): float32 exp would underflow to 0 and
  # log(0) without the logsumexp shift.
  u = np.full(8, 3.0)
  emb = np.stack([5 * (u + rng.normal(size=(5, 8))), -5 * (u + rng.normal(size=(5, 8)))])
  emb = emb.astype(np.float32)
  src = np.array([[0, 1], [0, 1]], np.int32)
  valid = np.ones((2, 2), bool)
  loss, metrics = reid.pair_loss(emb, src, valid, 2.0, 3.0)
  assert np.all(np.einsum('qd,pd->qp', emb[0], emb[1]) < -50)
  want = numpy_pair_loss(emb, src, valid, 2.0, 3.0)[0]
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # No instance in both views: loss 0 and a finite gradient.
  none = np.zeros((2, 2), bool)
  loss, grad = jax.value_and_grad(lambda e: reid.pair_loss(e, src, none, 2.0, 3.0)[0])(emb)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


def _pair_batch(tiny_config, rng):
  h, w = tiny_config.data.canvas
  n = tiny_config.data.max_instances
  masks = np.zeros((2, n, h, w), np.uint8)
  masks[:, 0, 8:30, 10:40] = 1
  masks[0, 1, 35:60, 50:90] = 1
  masks[1, 1, 5:25, 60:90] = 1   # moved in view B
  targets = {'labels': jnp.asarray([[1, 2, 0, 0]] * 2, jnp.int32), 'masks': jnp.asarray(masks),
             'valid': jnp.asarray([[True, True, False, False]] * 2)}
  images = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
  return images, targets


@pytest.mark.parametrize('reid_input', ['query', 'query+mask', 'mask'])
def test_detached_head_sends_no_gradient_into_the_detector(tiny_config, reid_input):
  tiny_config.model.reid = True
  tiny_config.model.reid_input = reid_input
  images, targets = _pair_batch(tiny_config, np.random.default_rng(2))
  loss_config = criterion.LossConfig.from_config(tiny_config.loss)
  key = jax.random.PRNGKey(0)

  def grads(detach):
    tiny_config.model.reid_detach = detach
    model = Mask2Former(ModelConfig.from_config(tiny_config.model))
    variables = random_variables(tiny_config.model, seed=3)

    def loss_fn(params):
      out = model.apply({'params': params, 'frozen': variables['frozen']}, images)
      src = reid.last_layer_match(out, targets, key, loss_config)
      return reid.pair_loss(out['pred_reid'], src, targets['valid'], 2.0, 3.0)[0]
    return jax.jit(jax.grad(loss_fn))(variables['params'])

  norm = lambda tree: float(optax.global_norm(tree))  # noqa: E731
  attached = grads(False)
  detached = grads(True)
  detector = lambda g: {k: v for k, v in g.items() if k != 'reid_head'}  # noqa: E731
  assert norm(detector(attached)) > 0          # without the stop the loss reaches the detector
  assert norm(detector(detached)) == 0.0
  assert norm(detached['reid_head']) > 0
  # The two jitted graphs (with and without the stop) fuse differently: float32 sums differ by a
  # few 1e-6 (seen: 3.6e-6 on entries of about 0.01 with the 'query' input).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
               detached['reid_head'], attached['reid_head'])


def test_mask_pooled_equals_numpy_and_the_head_reads_it(tiny_config):
  rng = np.random.default_rng(7)
  logits = rng.normal(scale=3.0, size=(2, 5, 4, 6)).astype(np.float32)
  features = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
  want = np.zeros((2, 5, 3))
  for b in range(2):
    for q in range(5):
      w = 1 / (1 + np.exp(-logits[b, q].astype(np.float64)))
      want[b, q] = (w[..., None] * features[b]).sum((0, 1)) / w.sum()
  got = mask2former.mask_pooled(jnp.asarray(logits), jnp.asarray(features))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # The head's first layer reads the query state (C), the pooled features (mask_dim) or both.
  tiny_config.model.reid = True
  outs = {}
  widths = {'query': tiny_config.model.hidden_dim, 'mask': tiny_config.model.mask_dim,
            'query+mask': tiny_config.model.hidden_dim + tiny_config.model.mask_dim}
  for reid_input, width in widths.items():
    tiny_config.model.reid_input = reid_input
    variables = random_variables(tiny_config.model, seed=1)
    assert variables['params']['reid_head']['dense_0']['kernel'].shape[0] == width
    images = jnp.asarray(rng.normal(size=(1, 64, 96, 3)), jnp.float32)
    outs[reid_input] = Mask2Former(ModelConfig.from_config(tiny_config.model)).apply(
        variables, images)
    assert outs[reid_input]['pred_reid'].shape == (1, tiny_config.model.num_queries,
                                                  tiny_config.model.reid_dim)
  with pytest.raises(ValueError, match="reid_input 'pixels' is not one of"):
    ModelConfig.from_config({**tiny_config.model.to_dict(), 'reid_input': 'pixels'})


def test_last_layer_match_is_the_criterions(tiny_config):
  """The contrastive loss's matching is the criterion's: the class loss recomputed from it equals
  set_criterion's final loss_ce."""
  images, targets = _pair_batch(tiny_config, np.random.default_rng(4))
  variables = random_variables(tiny_config.model, seed=5)
  out = Mask2Former(ModelConfig.from_config(tiny_config.model)).apply(variables, images)
  loss_config = criterion.LossConfig.from_config(tiny_config.loss)
  key = jax.random.PRNGKey(7)
  src = reid.last_layer_match(out, targets, key, loss_config)
  _, terms = criterion.set_criterion(out, targets, key, loss_config)
  ce = criterion.loss_labels(out['pred_logits'], targets['labels'], targets['valid'], src,
                             loss_config.no_object_weight)
  np.testing.assert_allclose(float(ce), float(terms['loss_ce']), rtol=1e-6)


def test_a_detector_checkpoint_loads_with_only_the_head_initialised(tiny_checkpoint):
  path, config, variables = tiny_checkpoint
  config = config.copy_and_resolve_references()
  config.init.checkpoint = path
  config.init.reinit_class_head = False
  config.model.reid = True
  like = jax.eval_shape(lambda: train.init_variables(config, jax.random.PRNGKey(0)))
  loaded = train.load_init_variables(config, like)
  assert isinstance(loaded['params']['reid_head']['dense_0']['kernel'], jax.ShapeDtypeStruct)
  rest = {k: v for k, v in loaded['params'].items() if k != 'reid_head'}
  jax.tree.map(np.testing.assert_array_equal, rest, jax.tree.map(np.asarray, variables['params']))
  # Any other missing or different leaf is still an error.
  config.model.num_queries = 10
  like = jax.eval_shape(lambda: train.init_variables(config, jax.random.PRNGKey(0)))
  try:
    train.load_init_variables(config, like)
  except ValueError as e:
    assert 'do not match config.model' in str(e)
  else:
    raise AssertionError('a checkpoint with other shapes loaded')


def test_detached_updates_keep_the_detector_bit_identical(tiny_config):
  params = {'decoder': {'w': jnp.ones(3)}, 'reid_head': {'w': jnp.ones(3)}}
  updates = {'decoder': {'w': jnp.full(3, -0.5)}, 'reid_head': {'w': jnp.full(3, 0.25)}}
  tiny_config.model.reid = True
  moved = reid.apply_updates(tiny_config, params, updates)
  np.testing.assert_array_equal(moved['decoder']['w'], 0.5)
  tiny_config.model.reid_detach = True
  kept = reid.apply_updates(tiny_config, params, updates)
  assert kept['decoder'] is params['decoder']
  np.testing.assert_array_equal(kept['reid_head']['w'], 1.25)


@pytest.mark.slow
def test_detached_fine_tune_from_a_detector_checkpoint_trains_only_the_head(tiny_config, tmp_path,
                                                                           synthetic_split):
  """Two steps of `train` with model.reid + reid_detach from a checkpoint without a head: the
  detector's parameters come out bit-identical, the head moved, the log has the reid terms."""
  tiny_config.data.manual_dir = synthetic_split('train', 3, 4, 64, 96, seed=2)
  tiny_config.batch_size = 4
  detector = random_variables(tiny_config.model, seed=4)
  init = str(tmp_path / 'init')
  checkpoints.save_variables(init, detector)
  tiny_config.model.update(reid=True, reid_detach=True)
  tiny_config.init.update(checkpoint=init, reinit_class_head=False)
  tiny_config.log_every = 1
  state = train.train(config_lib.validate(tiny_config), str(tmp_path / 'run'), total_steps=2)
  params = jax.tree.map(np.asarray, state.params)
  for k in detector['params']:
    jax.tree.map(np.testing.assert_array_equal, params[k], detector['params'][k])
  start = train.Trainer(tiny_config).init_state().params['reid_head']
  assert optax.global_norm(jax.tree.map(lambda a, b: a - b, params['reid_head'], start)) > 0
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert {'loss_reid', 'loss_reid_aux', 'slot_agreement'} <= set(rows[-1])
  assert 'loss_ce' not in rows[-1]   # detached: the detection loss is not computed
