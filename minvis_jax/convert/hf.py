"""HF transformers Mask2Former checkpoints: the model config from their config.json, the weight
files of a `save_pretrained` folder (sharded or not), the key map to our variables."""

import json
from typing import Any, Mapping

import ml_collections
import numpy as np

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import user_input
from minvis_jax.configs import common
from minvis_jax.convert import backbones
from minvis_jax.convert import heads
from minvis_jax.convert import weights
from minvis_jax.data import categories
from minvis_jax import paths

# The weights of an HF `save_pretrained` folder, in the order they are looked for.
HF_WEIGHT_FILES = checkpoints.HF_WEIGHT_FILES


def params_from_hf(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict) -> dict:
  """HF `Mask2FormerForUniversalSegmentation` state dict -> Mask2Former variables."""
  bb, consumed = backbones.backbone_from_hf(state_dict, model_config.backbone)
  return weights.assemble(state_dict, model_config, heads.hf_entries(model_config), bb, consumed,
                          'HF')


def model_config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The model config that reproduces an HF `Mask2FormerConfig` (given as its to_dict())."""
  bb = dict(hf_config['backbone_config'])
  kind = bb.get('model_type')
  if kind == 'resnet':
    if bb.get('layer_type', 'bottleneck') != 'bottleneck':
      raise ValueError('HF config: only bottleneck ResNets are supported')
    backbone = ml_collections.ConfigDict(dict(
        name='resnet', depths=tuple(bb['depths']), stem_width=bb['embedding_size'],
        widths=tuple(bb['hidden_sizes'])))
  elif kind == 'swin':
    backbone = ml_collections.ConfigDict(dict(
        name='swin', embed_dim=bb['embed_dim'], depths=tuple(bb['depths']),
        num_heads=tuple(bb['num_heads']), window_size=bb['window_size'],
        patch_size=bb.get('patch_size', 4), mlp_ratio=bb.get('mlp_ratio', 4.0),
        drop_path_rate=bb.get('drop_path_rate', 0.3)))
  else:
    raise ValueError(f'HF config: backbone model_type {kind!r} is not supported (resnet, swin)')
  if hf_config['feature_size'] != hf_config['hidden_dim']:
    raise ValueError('HF config: feature_size != hidden_dim is not supported')
  num_classes = hf_config.get('num_labels') or len(hf_config.get('id2label') or {})
  model = common.mask2former_model(backbone, num_classes=num_classes,
                                   num_queries=hf_config['num_queries'])
  model.update(dict(
      hidden_dim=hf_config['hidden_dim'], mask_dim=hf_config['mask_feature_size'],
      enc_layers=hf_config['encoder_layers'], enc_heads=hf_config['num_attention_heads'],
      enc_ffn_dim=hf_config['encoder_feedforward_dim'],
      dec_layers=hf_config['decoder_layers'] - 1,  # HF counts the prediction on the queries too
      dec_heads=hf_config['num_attention_heads'], dec_ffn_dim=hf_config['dim_feedforward']))
  return model


def hf_files(path: str, hf_config: str = '') -> tuple[str, str | None]:
  """(weights file, HF config.json or None) of an HF checkpoint: a `save_pretrained` folder, or a
  weights file with `config.json` beside it; `hf_config` names the config.json explicitly."""
  if paths.isdir(path):
    found = [paths.join(path, f) for f in HF_WEIGHT_FILES
             if paths.isfile(paths.join(path, f))]
    if not found:
      raise FileNotFoundError(f'{path}: no {", ".join(HF_WEIGHT_FILES)} in this folder')
    weights_file = found[0]
  elif paths.isfile(path):
    weights_file = path
  else:
    raise FileNotFoundError(f'{path}: no such checkpoint file or folder')
  if hf_config:
    if not paths.isfile(hf_config):
      raise FileNotFoundError(f'{hf_config}: no such HF config file')
    return weights_file, hf_config
  beside = paths.join(paths.dirname(paths.abspath(weights_file)), 'config.json')
  return weights_file, (beside if paths.isfile(beside) else None)


def read_hf_config(path: str) -> dict:
  """An HF Mask2Former config.json as a dict; ValueError names the file when it is not one."""
  try:
    with paths.open(path, 'rb') as f:
      data = user_input.parse_json(f.read(), path, 'config')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not a JSON file ({e})') from None
  if not isinstance(data, dict) or data.get('model_type') != 'mask2former':
    kind = data.get('model_type') if isinstance(data, dict) else type(data).__name__
    raise ValueError(f'{path}: not an HF Mask2Former config (model_type {kind!r}, expected '
                     f"'mask2former')")
  return data


def read_weights(path: str) -> dict[str, np.ndarray]:
  """`read_state_dict`, plus sharded HF safetensors (`model.safetensors.index.json`)."""
  if not path.endswith('.index.json'):
    return weights.read_state_dict(path)
  with paths.open(path) as f:
    shards = sorted(set(json.load(f).get('weight_map', {}).values()))
  if not shards:
    raise ValueError(f'{path}: no "weight_map" entries')
  state = {}
  for shard in shards:
    state.update(weights.read_state_dict(paths.join(paths.dirname(path), shard)))
  return state


def experiment_for(model: ml_collections.ConfigDict,
                   labels: list[str]) -> ml_collections.ConfigDict:
  """The experiment of a checkpoint that carries only its model config: the MinVIS recipe
  (`--config minvis`: test short side 360, window 30, top-10) with this model and its classes
  (a dataset's table when `labels` name its classes, else ids 1..K with these names)."""
  config = config_lib.load_config('minvis')
  config.model = model
  config.init.checkpoint = ''
  dataset = categories.find(labels)
  if dataset:
    config.data.dataset = dataset
    config.data.category_ids, config.data.category_names = categories.table(dataset)
  else:
    config.data.dataset = 'custom'
    config.data.category_ids = tuple(range(1, model.num_classes + 1))
    config.data.category_names = tuple(labels)
  return config


def hf_labels(hf: dict, num_classes: int) -> list[str]:
  """Class names 0..K-1 from an HF config's id2label (`class i+1` where it has none)."""
  id2label = {int(k): str(v) for k, v in (hf.get('id2label') or {}).items()}
  return [id2label.get(i, f'class {i + 1}') for i in range(num_classes)]


def experiment_config(source: str, input_path: str, hf_config: str, config_name: str,
                      overrides: list[str]) -> tuple[ml_collections.ConfigDict, str, str]:
  """`minvis-jax convert`'s experiment: (config, weights file, HF config.json or ''), checked
  against each other. source/input_path/hf_config/config_name: its --source, --input, --hf_config
  and --config; overrides: its --set items."""
  hf, origin, weights_path = None, '', input_path
  if source == 'hf':
    weights_path, hf_path = hf_files(input_path, hf_config)
    if hf_path:
      hf, origin = read_hf_config(hf_path), hf_path
  elif hf_config:
    raise ValueError('--hf_config is for --source hf')
  model = model_config_from_hf(hf) if hf else None
  if config_name:
    config = config_lib.load_config(config_name)
    if model is not None:
      checkpoints.check_architecture(model, config.model, config_name, origin)
  elif model is not None:
    config = experiment_for(model, hf_labels(hf, model.num_classes))
  else:
    raise ValueError(f'--source {source}: {input_path} carries no model config; pass '
                     f'--config (e.g. --config coco:backbone=r50 for a COCO Mask2Former, '
                     f'--config minvis:dataset=ovis for a MinVIS OVIS model)')
  config_lib.apply_overrides(config, overrides)
  return config, weights_path, origin
