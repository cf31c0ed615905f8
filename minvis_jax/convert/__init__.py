"""Checkpoint import: HF transformers and detectron2 Mask2Former / MinVIS, ImageNet backbones.

  python -m minvis_jax.convert --source {hf,detectron2,torchvision,swin} --input PATH \
      --config CONFIG --output DIR

Every function takes a flat {name: numpy array} mapping and returns the complete `variables` of
`Mask2Former(model_config).apply`. A missing, unexpected or mis-shaped key raises ValueError.
"""

import argparse
import os
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax.convert import backbones
from minvis_jax.convert import heads
from minvis_jax.models import Mask2Former

# Buffers of the original models that are recomputed or unused here.
_IGNORED = ('criterion.empty_weight', 'pixel_mean', 'pixel_std')


def _flat_shapes(tree) -> dict[tuple[str, ...], tuple]:
  return {tuple(p.key for p in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _abstract_variables(model_config):
  return jax.eval_shape(Mask2Former(model_config).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 64, 64, 3)))


def _assemble(state, model_config, entries, backbone_vars, consumed, source: str):
  """Head entries + imported backbone -> variables; checks every key both ways."""
  expected = _flat_shapes(_abstract_variables(model_config))
  flat = {}
  for collection, tree in backbone_vars.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      flat[(collection, 'backbone') + tuple(p.key for p in path)] = np.asarray(leaf)
  consumed = set(consumed)
  for path, key, transform in entries:
    if key not in state:
      raise ValueError(f'{source} checkpoint: missing key {key!r} (for {"/".join(path)})')
    value = np.asarray(transform(np.asarray(state[key])), np.float32)
    flat[('params',) + path] = value
    consumed.add(key)
  for path, shape in expected.items():
    if path not in flat:
      raise ValueError(f'{source} checkpoint: nothing provides {"/".join(path)} {shape}')
    if flat[path].shape != shape:
      raise ValueError(f'{source} checkpoint: {"/".join(path)} has shape {flat[path].shape}, '
                       f'expected {shape}')
  leftover = sorted(k for k in state if k not in consumed and k not in _IGNORED)
  if leftover:
    raise ValueError(f'{source} checkpoint: unexpected keys {leftover[:10]}'
                     f'{" ..." if len(leftover) > 10 else ""} ({len(leftover)} in all)')
  return _unflatten({p: flat[p] for p in expected})


def params_from_hf(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict):
  """HF `Mask2FormerForUniversalSegmentation` state dict -> Mask2Former variables."""
  bb, consumed = backbones.backbone_from_hf(state_dict, model_config.backbone)
  return _assemble(state_dict, model_config, heads.hf_entries(model_config), bb, consumed, 'HF')


def params_from_detectron2(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict):
  """detectron2 Mask2Former / MinVIS `model` state dict (torch or numpy) -> variables."""
  bb, consumed = backbones.backbone_from_detectron2(state_dict, model_config.backbone)
  return _assemble(state_dict, model_config, heads.detectron2_entries(model_config), bb,
                   consumed, 'detectron2')


def params_with_backbone(backbone_vars, model_config, seed: int = 0):
  """A randomly initialised head on an imported ImageNet backbone (training from scratch)."""
  variables = jax.tree.map(np.asarray, jax.jit(Mask2Former(model_config).init)(
      jax.random.PRNGKey(seed), jnp.zeros((1, 64, 64, 3))))
  for collection, tree in backbone_vars.items():
    if tree:
      variables[collection]['backbone'] = jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  expected = _flat_shapes(_abstract_variables(model_config))
  got = _flat_shapes(variables)
  if expected != got:
    raise ValueError(f'backbone import does not fit the model: {set(expected) ^ set(got)}')
  return variables


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
  model = config_lib.mask2former_model(backbone, num_classes=num_classes,
                                       num_queries=hf_config['num_queries'])
  model.update(dict(
      hidden_dim=hf_config['hidden_dim'], mask_dim=hf_config['mask_feature_size'],
      enc_layers=hf_config['encoder_layers'], enc_heads=hf_config['num_attention_heads'],
      enc_ffn_dim=hf_config['encoder_feedforward_dim'],
      dec_layers=hf_config['decoder_layers'] - 1,  # HF counts the prediction on the queries too
      dec_heads=hf_config['num_attention_heads'], dec_ffn_dim=hf_config['dim_feedforward']))
  return model


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """safetensors, torch (.pth/.bin/.pt, optionally under 'model' / 'state_dict') or a detectron2
  .pkl of numpy arrays -> {name: numpy array}.

  A file that is empty, truncated or of another format raises one ValueError naming it.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  if os.path.getsize(path) == 0:
    raise ValueError(f'{path}: empty file, not a checkpoint')
  if path.endswith('.safetensors'):
    kind = 'safetensors'
  elif path.endswith('.pkl'):
    kind = 'pickle (detectron2 .pkl)'
  else:
    kind = 'torch (.pth/.bin/.pt)'
    try:
      import torch
    except ImportError as e:
      raise ImportError(f'{path}: reading torch checkpoints needs torch (pip install torch)') from e
  try:
    if kind == 'safetensors':
      from safetensors.numpy import load_file
      data = dict(load_file(path))
    elif kind.startswith('pickle'):
      with open(path, 'rb') as f:
        data = pickle.load(f, encoding='latin1')
    else:
      data = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001  (each reader raises its own types)
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise ValueError(f'{path}: cannot read as a {kind} checkpoint (truncated or another format?): '
                     f'{type(e).__name__}: {first}') from None
  for key in ('model', 'state_dict'):
    if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
      data = data[key]
  if not isinstance(data, Mapping):
    raise ValueError(f'{path}: expected a mapping of parameter names to arrays, got '
                     f'{type(data).__name__}')
  out = {}
  for k, v in data.items():
    if hasattr(v, 'detach'):
      v = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    v = np.asarray(v) if isinstance(v, (np.ndarray, np.generic, int, float)) else v
    if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype.kind not in 'biuf':
      raise ValueError(f'{path}: entry {k!r} is not a numeric array ({type(v).__name__})')
    out[k] = v
  return out


def convert(source: str, state: Mapping[str, Any], model_config, seed: int = 0):
  if source == 'hf':
    return params_from_hf(state, model_config)
  if source == 'detectron2':
    return params_from_detectron2(state, model_config)
  if source == 'torchvision':
    bb, _ = backbones.backbone_from_torchvision(state, model_config.backbone)
    return params_with_backbone(bb, model_config, seed)
  if source == 'swin':
    bb, _ = backbones.backbone_from_swin(state, model_config.backbone)
    return params_with_backbone(bb, model_config, seed)
  raise ValueError(f'--source must be hf, detectron2, torchvision or swin, got {source!r}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=(argv or ['minvis-jax convert'])[0],
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--source', required=True,
                      choices=['hf', 'detectron2', 'torchvision', 'swin'])
  parser.add_argument('--input', required=True, help='checkpoint file')
  parser.add_argument('--config', required=True, help='config file[:arg], e.g. configs/minvis.py')
  parser.add_argument('--output', required=True, help='new orbax checkpoint directory')
  parser.add_argument('--seed', type=int, default=0, help='init of the head for backbone sources')
  args = parser.parse_args((argv or [None])[1:])
  config = config_lib.load_config(args.config)
  variables = convert(args.source, read_state_dict(args.input), config.model, args.seed)
  checkpoints.save_variables(args.output, variables)
  checkpoints.save_config(args.output, config)
  n = sum(x.size for x in jax.tree.leaves(variables))
  print(f'wrote {args.output}: {n:,} values from {args.input} ({args.source})')
  return 0
