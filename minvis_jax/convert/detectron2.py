"""detectron2 Mask2Former / MinVIS checkpoints (.pkl of numpy arrays or torch .pth): the key map to
our variables."""

from typing import Any, Mapping

import ml_collections

from minvis_jax.convert import backbones
from minvis_jax.convert import heads
from minvis_jax.convert import weights


def params_from_detectron2(state_dict: Mapping[str, Any],
                           model_config: ml_collections.ConfigDict) -> dict:
  """detectron2 Mask2Former / MinVIS `model` state dict (torch or numpy) -> variables."""
  bb, consumed = backbones.backbone_from_detectron2(state_dict, model_config.backbone)
  return weights.assemble(state_dict, model_config, heads.detectron2_entries(model_config), bb,
                          consumed, 'detectron2')
