"""Backbones in pure JAX: shapes and parameter collections under jit, bfloat16 compute, drop
path (the HF comparisons are in test_backbones_vs_hf.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support.backbones import backbone_channels, make_backbone
from support.backbones import swin_config as _swin_config
from minvis_jax.configs import common

STAGES = ('res2', 'res3', 'res4', 'res5')


@pytest.mark.parametrize('name', ['resnet_tiny', 'resnet50', 'swin_t'])
def test_shapes_under_jit(name):
  cfg = {'resnet_tiny': common.tiny_model().backbone,
         'resnet50': common.resnet_backbone(50),
         'swin_t': common.swin_backbone('T')}[name]
  module = make_backbone(cfg)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 96, 3), jnp.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x)
  out = jax.jit(module.apply)(variables, x)
  channels = backbone_channels(cfg)
  for i, stage in enumerate(STAGES):
    stride = 4 * 2 ** i
    assert out[stage].shape == (2, 64 // stride, 96 // stride, channels[i])
    assert out[stage].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out[stage])))
  if cfg.name == 'resnet':
    # BN constants are not trainable: they live in 'frozen', only conv kernels in 'params'.
    assert set(variables) == {'params', 'frozen'}
    leaves = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
    assert {path[-1].key for path, _ in leaves} == {'kernel'}
  else:
    assert set(variables) == {'params'}


@pytest.mark.parametrize('name', ['resnet_tiny', 'swin_tiny'])
def test_bfloat16_compute_keeps_float32_params(name):
  cfg = common.tiny_model().backbone if name == 'resnet_tiny' else _swin_config()
  x = jnp.asarray(np.random.RandomState(0).randn(1, 64, 64, 3), jnp.float32)
  variables = jax.jit(make_backbone(cfg).init)(jax.random.PRNGKey(0), x)
  ref = jax.jit(make_backbone(cfg).apply)(variables, x)
  out = jax.jit(make_backbone(cfg, 'bfloat16').apply)(variables, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
  for s in STAGES:
    assert out[s].dtype == jnp.bfloat16
    err = np.abs(np.asarray(out[s], np.float32) - np.asarray(ref[s]))
    assert np.mean(err) < 0.05 * np.mean(np.abs(np.asarray(ref[s]))) + 1e-3


def test_swin_drop_path_only_in_training():
  cfg = _swin_config()
  cfg.drop_path_rate = 0.5
  module = make_backbone(cfg)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(module.apply, static_argnames='train')
  a = apply(variables, x)
  b = apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(a['res5']), np.asarray(b['res5']))
  c = apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  d = apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(np.asarray(c['res5']), np.asarray(a['res5']))
  assert not np.allclose(np.asarray(c['res5']), np.asarray(d['res5']))
