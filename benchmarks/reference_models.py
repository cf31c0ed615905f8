"""The benchmarks' models: an HF Mask2Former with random weights and the same weights converted."""

import copy
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support import hf_reference as ref  # noqa: E402

from minvis_jax import convert  # noqa: E402


def converted(model: str = 'r50', seed: int = 0):
  """'r50' (the full R50 model) or 'tiny' (dry runs: tiny ResNet, one encoder layer, two decoder
  layers, 1024 loss points) -> (HF model, our model config, the same weights as our variables).

  Built once per process (benchmarks/device.sh runs several benchmarks in one): the HF model is
  shared, the config is a fresh copy each call (callers set its dtype).
  """
  hf, model_config, variables = _converted(model, seed)
  return hf, copy.deepcopy(model_config), variables


@functools.lru_cache(maxsize=2)
def _converted(model: str, seed: int):
  if model == 'r50':
    return ref.converted_r50(seed)
  if model != 'tiny':
    raise ValueError(f'model {model!r}: expected r50 or tiny')
  hf_cfg = ref.hf_config('resnet_tiny', encoder_layers=1, decoder_layers=2, train_num_points=1024)
  hf = ref.hf_model(hf_cfg, seed)
  model_config = convert.model_config_from_hf(hf_cfg.to_dict())
  return hf, model_config, convert.params_from_hf(ref.state_dict_numpy(hf), model_config)
