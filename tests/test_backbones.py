"""Backbones in pure JAX: shapes and parameter collections under jit, bfloat16 compute, drop
path (the HF comparisons are in test_backbones_vs_hf.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import config_lib
from minvis_jax.models.backbone import backbone_channels, make_backbone

STAGES = ('res2', 'res3', 'res4', 'res5')


def make_backbone(cfg, dtype='float32'):
  """The backbone module of `config.model.backbone` (a ConfigDict)."""
  return backbone_lib.make_backbone(backbone_lib.backbone_config(cfg), dtype)


def backbone_channels(cfg) -> tuple[int, int, int, int]:
  """Channels (c2, c3, c4, c5) of res2..res5."""
  if cfg.name == 'resnet':
    return tuple(int(w) for w in cfg.widths)
  return tuple(int(cfg.embed_dim * 2 ** i) for i in range(4))


def _swin_config(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=3):
  cfg = common.swin_backbone('T')
  cfg.update(dict(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window))
  return cfg


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
