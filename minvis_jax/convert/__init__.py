"""Checkpoint import: HF transformers and detectron2 Mask2Former / MinVIS, ImageNet backbones.

  minvis-jax convert --source {hf,detectron2,torchvision,swin} --input PATH \
      [--config CONFIG] [--hf_config config.json] --output DIR

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
from minvis_jax.configs import common
from minvis_jax.convert import backbones
from minvis_jax.convert import heads
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig

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
  model = Mask2Former(ModelConfig.from_config(model_config))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


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
  model = Mask2Former(ModelConfig.from_config(model_config))
  variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(seed),
                                                           jnp.zeros((1, 64, 64, 3))))
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
  model = common.mask2former_model(backbone, num_classes=num_classes,
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


# Fields of a model config that fix the weights' shapes and meaning (not dtype or drop-path rate).
_ARCHITECTURE = ('num_classes', 'num_queries', 'hidden_dim', 'mask_dim', 'enc_layers', 'enc_heads',
                 'enc_ffn_dim', 'enc_points', 'num_feature_levels', 'dec_layers', 'dec_heads',
                 'dec_ffn_dim')
_BACKBONE = ('name', 'depths', 'stem_width', 'widths', 'embed_dim', 'num_heads', 'window_size',
             'patch_size')
_HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json')


def hf_files(path: str, hf_config: str = '') -> tuple[str, str | None]:
  """(weights file, HF config.json or None) of an HF checkpoint: a `save_pretrained` folder, or a
  weights file with `config.json` beside it; `hf_config` names the config.json explicitly."""
  if os.path.isdir(path):
    found = [os.path.join(path, f) for f in _HF_WEIGHTS if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise FileNotFoundError(f'{path}: no {", ".join(_HF_WEIGHTS)} in this folder')
    weights = found[0]
  elif os.path.isfile(path):
    weights = path
  else:
    raise FileNotFoundError(f'{path}: no such checkpoint file or folder')
  if hf_config:
    if not os.path.isfile(hf_config):
      raise FileNotFoundError(f'{hf_config}: no such HF config file')
    return weights, hf_config
  beside = os.path.join(os.path.dirname(os.path.abspath(weights)), 'config.json')
  return weights, (beside if os.path.isfile(beside) else None)


def read_hf_config(path: str) -> dict:
  """An HF Mask2Former config.json as a dict; ValueError names the file when it is not one."""
  import json  # noqa: PLC0415
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a JSON file ({e})') from None
  if not isinstance(data, dict) or data.get('model_type') != 'mask2former':
    kind = data.get('model_type') if isinstance(data, dict) else type(data).__name__
    raise ValueError(f'{path}: not an HF Mask2Former config (model_type {kind!r}, expected '
                     f"'mask2former')")
  return data


def read_weights(path: str) -> dict[str, np.ndarray]:
  """`read_state_dict`, plus sharded HF safetensors (`model.safetensors.index.json`)."""
  if not path.endswith('.index.json'):
    return read_state_dict(path)
  import json  # noqa: PLC0415
  with open(path) as f:
    shards = sorted(set(json.load(f).get('weight_map', {}).values()))
  if not shards:
    raise ValueError(f'{path}: no "weight_map" entries')
  state = {}
  for shard in shards:
    state.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
  return state


def _rows(state: Mapping[str, Any], suffixes: tuple[str, ...]) -> int | None:
  for key, value in state.items():
    if key.endswith(suffixes):
      return int(np.shape(value)[0])
  return None


def check_architecture(model, config_model, config_spec: str, origin: str) -> None:
  """ValueError (one line, both values) where the checkpoint's model config (from `origin`, e.g.
  its config.json) and the experiment config's `model` disagree on the architecture."""
  def norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
  pairs = [(k, k, model.get(k), config_model.get(k)) for k in _ARCHITECTURE]
  pairs += [(f'backbone.{k}', k, model.backbone.get(k), config_model.backbone.get(k))
            for k in _BACKBONE]
  for key, short, a, b in pairs:
    if norm(a) != norm(b):
      what = {'num_classes': f'{a} classes', 'num_queries': f'{a} queries'}.get(short,
                                                                               f'{key}={a!r}')
      raise ValueError(f'the checkpoint has {what} ({origin}); --config {config_spec} has '
                       f'model.{key}={b!r}')


def check_state_shapes(state: Mapping[str, Any], model_config, config_spec: str,
                       source: str) -> None:
  """The class and query counts of a state dict against `model_config`, as one-line errors."""
  classes = _rows(state, ('class_predictor.weight', 'class_embed.weight'))
  if classes is not None and classes - 1 != model_config.num_classes:
    raise ValueError(f'{source}: the checkpoint has {classes - 1} classes (its class head has '
                     f'{classes} outputs); --config {config_spec} has '
                     f'model.num_classes={model_config.num_classes}')
  queries = _rows(state, ('queries_features.weight', 'query_feat.weight'))
  if queries is not None and queries != model_config.num_queries:
    raise ValueError(f'{source}: the checkpoint has {queries} queries; --config {config_spec} has '
                     f'model.num_queries={model_config.num_queries}')


def experiment_for(model, labels: list[str]) -> ml_collections.ConfigDict:
  """The experiment of a checkpoint that carries only its model config: the MinVIS recipe
  (`--config minvis`: test short side 360, window 30, top-10) with this model and its classes
  (a dataset's table when `labels` name its classes, else ids 1..K with these names)."""
  from minvis_jax.data import categories  # noqa: PLC0415
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


def _hf_labels(hf: dict, num_classes: int) -> list[str]:
  id2label = {int(k): str(v) for k, v in (hf.get('id2label') or {}).items()}
  return [id2label.get(i, f'class {i + 1}') for i in range(num_classes)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog=(argv or ['minvis-jax convert'])[0],
      description='Converts a Mask2Former / MinVIS checkpoint (HF transformers, detectron2) or an\n'
      'ImageNet backbone to a minvis-jax checkpoint directory, read by `minvis-jax infer`,\n'
      '`evaluate` and training (init.checkpoint).',
      epilog='examples:\n'
      '  minvis-jax convert --source hf --input mask2former-swin-small-coco-instance \\\n'
      '      --output ckpt\n'
      '  minvis-jax convert --source detectron2 --input model_final_3c8ec9.pkl \\\n'
      '      --config coco:backbone=r50 --output pretrained/coco_r50\n'
      '  minvis-jax convert --source detectron2 --input minvis_ytvis19_R50.pth \\\n'
      '      --config minvis:dataset=ytvis_2019 --output ckpt_ytvis19',
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--source', required=True,
                      choices=['hf', 'detectron2', 'torchvision', 'swin'])
  parser.add_argument('--input', required=True,
                      help='checkpoint file (.safetensors, .bin, .pth, .pkl), or for --source hf '
                      'an HF model folder (save_pretrained: config.json + weights)')
  parser.add_argument('--hf_config', default='',
                      help='HF config.json of --input when it is not beside the weights')
  parser.add_argument('--config', default='',
                      help='the experiment: a shipped config name[:arg] (minvis, '
                      'minvis:dataset=ovis, coco:backbone=swin_l, tiny) or a config file. It '
                      'gives the data, category names, test resolution, window and top-k. With '
                      'an HF config.json the model comes from it and --config must agree; '
                      'without --config an HF checkpoint gets the MinVIS recipe and its own '
                      'classes. Required for detectron2/torchvision/swin (no model config inside)')
  parser.add_argument('--output', required=True, help='new checkpoint directory')
  parser.add_argument('--seed', type=int, default=0, help='init of the head for backbone sources')
  args = parser.parse_args((argv or [None])[1:])

  hf, origin = None, ''
  weights = args.input
  if args.source == 'hf':
    weights, hf_path = hf_files(args.input, args.hf_config)
    if hf_path:
      hf, origin = read_hf_config(hf_path), hf_path
  elif args.hf_config:
    raise ValueError('--hf_config is for --source hf')
  model = model_config_from_hf(hf) if hf else None
  if args.config:
    config = config_lib.load_config(args.config)
    if model is not None:
      check_architecture(model, config.model, args.config, origin)
  elif model is not None:
    config = experiment_for(model, _hf_labels(hf, model.num_classes))
  else:
    raise ValueError(f'--source {args.source}: {args.input} carries no model config; pass '
                     f'--config (e.g. --config coco:backbone=r50 for a COCO Mask2Former, '
                     f'--config minvis:dataset=ovis for a MinVIS OVIS model)')
  state = read_weights(weights)
  if args.source in ('hf', 'detectron2'):
    check_state_shapes(state, config.model, args.config or origin, weights)
  variables = convert(args.source, state, config.model, args.seed)
  checkpoints.save_variables(args.output, variables)
  checkpoints.save_config(args.output, config)
  n = sum(x.size for x in jax.tree.leaves(variables))
  k = config.model.num_classes
  dataset = (config.get('data', None) or {}).get('dataset', '?')
  print(f'wrote {args.output}: {n:,} values from {weights} ({args.source}); {dataset} experiment, '
        f'{k} classes')
  return 0
