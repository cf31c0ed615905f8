"""Mask2Former: shapes under jit, the bf16 switch, ModelConfig (the HF equivalence:
test_models_vs_hf.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import config_lib
from minvis_jax import criterion
from minvis_jax.configs import common
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig
from minvis_jax.models import resnet
from minvis_jax.models import swin
from tests.support import backbones


@pytest.mark.parametrize('batch,h,w', [(1, 64, 64), (3, 96, 160)])
def test_tiny_shapes_under_jit(batch, h, w):
  cfg = ModelConfig.from_config(common.tiny_model(num_classes=7))
  model = Mask2Former(cfg)
  x = jnp.asarray(np.random.RandomState(0).randn(batch, h, w, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  out = jax.jit(model.apply)(variables, x)
  q, c = cfg.num_queries, cfg.hidden_dim
  assert out['pred_logits'].shape == (batch, q, 8)
  assert out['pred_masks'].shape == (batch, q, h // 4, w // 4)
  assert out['pred_embds'].shape == (batch, q, c)
  assert len(out['aux_outputs']) == cfg.dec_layers
  for aux in out['aux_outputs']:
    assert aux['pred_logits'].shape == (batch, q, 8)
    assert aux['pred_masks'].shape == (batch, q, h // 4, w // 4)
  # Frozen BN lives outside the trained parameters.
  assert 'frozen' in variables and 'backbone' in variables['frozen']
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(out))


def test_rejects_sizes_not_multiple_of_32():
  model = Mask2Former(ModelConfig.from_config(common.tiny_model()))
  with pytest.raises(ValueError, match='multiples of 32'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 70, 3)))


def test_bfloat16_compute_float32_params():
  cfg = ModelConfig.from_config(common.tiny_model())
  x = jnp.asarray(np.random.RandomState(1).randn(2, 64, 96, 3), jnp.float32)
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(0), x)
  ref_out = jax.jit(Mask2Former(cfg).apply)(variables, x)
  out = jax.jit(Mask2Former(dataclasses.replace(cfg, dtype='bfloat16')).apply)(variables, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  assert out['pred_logits'].dtype == jnp.float32
  # Same model, lower precision: close but not identical. Calibrated on this tiny R50 model (bf16 vs
  # f32 logits: RMS error 1.4% of the logits' RMS, largest error 5.7% of the largest logit); a
  # model with other weights differs by more than 100%.
  got, want = np.asarray(out['pred_logits']), np.asarray(ref_out['pred_logits'])
  err = np.abs(got - want)
  assert err.max() > 0
  assert np.sqrt(np.mean(err ** 2)) < 0.03 * np.sqrt(np.mean(want ** 2))
  assert err.max() < 0.1 * np.abs(want).max()


def test_model_config_from_config_is_hashable_and_typed():
  c = common.tiny_model(num_classes=7)
  mc = ModelConfig.from_config(c)
  assert mc == ModelConfig.from_config(c) and hash(mc) == hash(ModelConfig.from_config(c))
  assert ModelConfig.from_config(mc) is mc
  assert mc.backbone == resnet.ResNetConfig(depths=(1, 1, 1, 1), stem_width=16,
                                            widths=(32, 64, 128, 256))
  assert (mc.num_classes, mc.num_queries, mc.dtype) == (7, 20, 'float32')
  swin_l = ModelConfig.from_config(common.mask2former_model(common.swin_backbone('L'))).backbone
  assert isinstance(swin_l, swin.SwinConfig) and swin_l.num_heads == (6, 12, 24, 48)
  del c.num_queries
  with pytest.raises(ValueError, match='missing num_queries'):
    ModelConfig.from_config(c)
  c = common.tiny_model()
  c.backbone.name = 'vit'
  with pytest.raises(ValueError, match="model.backbone.name='vit'"):
    ModelConfig.from_config(c)


def test_variant_tables_build_the_presets():
  assert common.resnet_backbone(101).depths == resnet.VARIANTS[101]['depths'] == (3, 4, 23, 3)
  assert common.swin_backbone('T').embed_dim == swin.VARIANTS['T']['embed_dim'] == 96
  assert config_lib.load_config('coco:backbone=swin_l').model.backbone.window_size == 12


def test_reid_off_is_todays_model_and_on_adds_only_the_head():
  assert common.tiny_model().reid is False   # the default: MinVIS's model
  off_cfg = ModelConfig.from_config(common.tiny_model())
  # The head on the query state, whose input the numpy reference below reads (the mask-pooled
  # input has its own reference: test_reid.test_mask_pooled_equals_numpy_and_the_head_reads_it).
  on_cfg = dataclasses.replace(off_cfg, reid=True, reid_input='query')
  # A config written before the reid fields (a checkpoint's config.json) builds the same model.
  old = common.tiny_model()
  for key in ('reid', 'reid_dim', 'reid_detach', 'reid_input'):
    del old[key]
  # (A reid checkpoint of then read the query state: reid_input 'query'.)
  assert ModelConfig.from_config(old) == dataclasses.replace(off_cfg, reid_dim=256,
                                                             reid_input='query')
  x = jnp.asarray(np.random.RandomState(3).randn(2, 64, 96, 3), jnp.float32)
  off_vars = jax.jit(Mask2Former(off_cfg).init)(jax.random.PRNGKey(0), x)
  on_vars = jax.jit(Mask2Former(on_cfg).init)(jax.random.PRNGKey(0), x)
  assert 'reid_head' not in off_vars['params']
  assert set(on_vars['params']) == set(off_vars['params']) | {'reid_head'}
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
  assert shapes(on_vars['params']['reid_head']) == {
      f'dense_{i}': {'kernel': (64, 64), 'bias': (64,)} for i in range(3)}
  # The detector's variables of the reid model, with today's model: the same outputs, bit for bit.
  detector = {'params': {k: v for k, v in on_vars['params'].items() if k != 'reid_head'},
              'frozen': on_vars['frozen']}
  assert jax.tree.structure(detector) == jax.tree.structure(off_vars)
  off_out = jax.jit(Mask2Former(off_cfg).apply)(detector, x)
  on_out = jax.jit(Mask2Former(on_cfg).apply)(on_vars, x)
  assert 'pred_reid' not in off_out and on_out['pred_reid'].shape == (2, 20, 64)
  on_out.pop('pred_reid')
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               off_out, on_out)
  # The head is the documented MLP on the decoder's embeddings.
  h = np.asarray(on_out['pred_embds'], np.float64)
  for i in range(3):
    layer = on_vars['params']['reid_head'][f'dense_{i}']
    h = h @ np.asarray(layer['kernel'], np.float64) + np.asarray(layer['bias'], np.float64)
    h = np.maximum(h, 0) if i < 2 else h
  got = np.asarray(jax.jit(Mask2Former(on_cfg).apply)(on_vars, x)['pred_reid'])
  np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-4)


def _loss_and_grads(model_config, variables, images, targets):
  """The set criterion's loss on the model's outputs (train mode, fixed dropout and point keys)
  and its gradient with respect to the parameters."""
  loss_config = criterion.LossConfig.from_config(common.loss_config())
  loss_config = dataclasses.replace(loss_config, num_points=256)

  def loss_fn(params):
    out = Mask2Former(model_config).apply({**variables, 'params': params}, images, train=True,
                                          rngs={'dropout': jax.random.PRNGKey(5)})
    return criterion.set_criterion(out, targets, jax.random.PRNGKey(6), loss_config)[0]
  return jax.jit(jax.value_and_grad(loss_fn))(variables['params'])


@pytest.mark.parametrize('backbone', ['resnet', pytest.param('swin', marks=pytest.mark.slow)])
def test_remat_keeps_parameters_loss_and_gradients(backbone):
  model = common.tiny_model(num_classes=5)
  if backbone == 'swin':   # with stochastic depth: the recomputed blocks draw the same drops
    model.backbone = backbones.swin_config(embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4))
    model.backbone.drop_path_rate = 0.3
  base = ModelConfig.from_config(model)
  assert base.remat == 'none'
  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.randn(2, 64, 96, 3), jnp.float32)
  masks = np.zeros((2, 3, 64, 96), np.uint8)
  masks[:, 0, 8:40, 10:50] = 1
  masks[:, 1, 30:60, 40:90] = 1
  targets = {'labels': jnp.asarray([[1, 3, 0], [4, 2, 0]], jnp.int32), 'masks': jnp.asarray(masks),
             'valid': jnp.asarray([[True, True, False], [True, True, False]])}
  variables = jax.jit(Mask2Former(base).init)(jax.random.PRNGKey(0), images)
  want_loss, want_grads = _loss_and_grads(base, variables, images, targets)
  assert np.isfinite(float(want_loss)) and float(want_loss) > 0
  for remat in ('backbone', 'decoder', 'all'):
    cfg = dataclasses.replace(base, remat=remat)
    # The same parameter tree (names, shapes) as without remat: checkpoints load either way.
    got_vars = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(0), images)
    assert jax.tree.structure(got_vars) == jax.tree.structure(variables)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got_vars, variables)
    loss, grads = _loss_and_grads(cfg, variables, images, targets)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6, err_msg=remat)
    leaves = jax.tree.leaves_with_path(want_grads)
    assert len(leaves) == len(jax.tree.leaves(grads))
    for (path, want), got in zip(leaves, jax.tree.leaves(grads)):
      scale = float(np.abs(np.asarray(want)).max()) + 1e-12
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * scale,
                                 err_msg=f'{remat} {jax.tree_util.keystr(path)}')


def test_remat_is_validated():
  config = config_lib.load_config('tiny')
  assert config.model.remat == 'none'
  with pytest.raises(ValueError, match=r"model.remat='stages': expected one of \('none', "
                     r"'backbone', 'decoder', 'all'\)"):
    config_lib.apply_overrides(config, ['model.remat=stages'])
  with pytest.raises(ValueError, match="model.remat='x'"):
    Mask2Former(dataclasses.replace(ModelConfig.from_config(common.tiny_model()), remat='x')).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
