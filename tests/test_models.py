"""Mask2Former: shapes under jit, bf16 switch, and forward equivalence with HF transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import hf_reference as ref
from minvis_jax import config_lib
from minvis_jax import convert
from minvis_jax.models import Mask2Former


@pytest.mark.parametrize('batch,h,w', [(1, 64, 64), (3, 96, 160)])
def test_tiny_shapes_under_jit(batch, h, w):
  cfg = config_lib.tiny_model(num_classes=7)
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
  model = Mask2Former(config_lib.tiny_model())
  with pytest.raises(ValueError, match='multiples of 32'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 70, 3)))


def test_bfloat16_compute_float32_params():
  cfg = config_lib.tiny_model()
  x = jnp.asarray(np.random.RandomState(1).randn(2, 64, 96, 3), jnp.float32)
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(0), x)
  ref_out = jax.jit(Mask2Former(cfg).apply)(variables, x)
  cfg.dtype = 'bfloat16'
  out = jax.jit(Mask2Former(cfg).apply)(variables, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  assert out['pred_logits'].dtype == jnp.float32
  # Same model, lower precision: close but not identical.
  diff = np.abs(np.asarray(out['pred_logits']) - np.asarray(ref_out['pred_logits'])).max()
  scale = np.abs(np.asarray(ref_out['pred_logits'])).max()
  assert 0 < diff < 0.1 * scale + 0.1


def _max_diffs(ours, theirs) -> dict:
  d = {k: float(np.abs(np.asarray(ours[k]) - theirs[k]).max())
       for k in ('pred_logits', 'pred_masks', 'pred_embds')}
  assert len(ours['aux_outputs']) == len(theirs['aux_outputs'])
  for i, (a, b) in enumerate(zip(ours['aux_outputs'], theirs['aux_outputs'])):
    for k in ('pred_logits', 'pred_masks'):
      d[f'aux{i}_{k}'] = float(np.abs(np.asarray(a[k]) - b[k]).max())
  return d


def _check_equivalence(backbone: str, h: int, w: int):
  hf_cfg = ref.hf_config(backbone)
  model = ref.hf_model(hf_cfg)
  model_config = convert.model_config_from_hf(hf_cfg.to_dict())
  variables = convert.params_from_hf(ref.state_dict_numpy(model), model_config)
  x = np.random.RandomState(0).randn(1, h, w, 3).astype(np.float32)
  ours = jax.jit(Mask2Former(model_config).apply)(variables, x)
  diffs = _max_diffs(ours, ref.hf_forward(model, x))
  print(backbone, f'{h}x{w}', 'max abs diff', max(diffs.values()), diffs)
  assert max(diffs.values()) <= 1e-4, diffs


def test_resnet_tiny_matches_hf():
  _check_equivalence('resnet_tiny', 128, 96)


@pytest.mark.slow
def test_swin_tiny_matches_hf():
  # Window 4: every stage (64x72 .. 8x9 at 256x288) is larger than the window.
  _check_equivalence('swin_tiny', 256, 288)


@pytest.mark.slow
def test_resnet50_matches_hf_384():
  _check_equivalence('resnet50', 384, 384)
