"""Mask2Former: shapes under jit, the bf16 switch, ModelConfig (the HF equivalence:
test_models_vs_hf.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import config_lib
from minvis_jax.configs import common
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig
from minvis_jax.models import resnet
from minvis_jax.models import swin


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
