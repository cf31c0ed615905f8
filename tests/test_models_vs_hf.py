"""Mask2Former forward equivalence with HF transformers (same weights, converted)."""

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.torch
pytest.importorskip('torch')

from support import hf_reference as ref  # noqa: E402
from minvis_jax import convert  # noqa: E402
from minvis_jax.models import Mask2Former  # noqa: E402
from minvis_jax.models import ModelConfig  # noqa: E402


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
  ours = jax.jit(Mask2Former(ModelConfig.from_config(model_config)).apply)(variables, x)
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
