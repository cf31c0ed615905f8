"""Weight files -> {name: numpy array} -> the model's variables, checked key by key: the steps
every source (HF, detectron2, an ImageNet backbone) shares."""

import pickle
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from minvis_jax.convert import backbones
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig
from minvis_jax import paths

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


def assemble(state: Mapping[str, Any], model_config: ml_collections.ConfigDict,
             entries: Sequence[tuple[tuple[str, ...], str, Callable]], backbone_vars: dict,
             consumed: Iterable[str], source: str) -> dict:
  """Head entries (path, source key, transform) + imported backbone variables -> the model's
  variables; checks every key both ways (`consumed`: source keys the backbone import used)."""
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


def params_with_backbone(backbone_vars: dict, model_config: ml_collections.ConfigDict,
                         seed: int = 0) -> dict:
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


def params_from_backbone(source: str, state: Mapping[str, Any],
                         model_config: ml_collections.ConfigDict, seed: int = 0) -> dict:
  """An ImageNet backbone (`source` torchvision or swin) under a randomly initialised head."""
  if source == 'torchvision':
    bb, _ = backbones.backbone_from_torchvision(state, model_config.backbone)
  elif source == 'swin':
    bb, _ = backbones.backbone_from_swin(state, model_config.backbone)
  else:
    raise ValueError(f'backbone source must be torchvision or swin, got {source!r}')
  return params_with_backbone(bb, model_config, seed)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """safetensors, torch (.pth/.bin/.pt, optionally under 'model' / 'state_dict') or a detectron2
  .pkl of numpy arrays -> {name: numpy array}.

  A file that is empty, truncated or of another format raises one ValueError naming it.
  """
  if not paths.isfile(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  if paths.getsize(path) == 0:
    raise ValueError(f'{path}: empty file, not a checkpoint')
  if path.endswith('.safetensors'):
    kind = 'safetensors'
  elif path.endswith('.pkl'):
    kind = 'pickle (detectron2 .pkl)'
  else:
    kind = 'torch (.pth/.bin/.pt)'
    try:
      import torch  # noqa: PLC0415  (optional: only for torch checkpoints)
    except ImportError as e:
      raise ImportError(f'{path}: reading torch checkpoints needs torch (pip install torch)') from e
  try:
    if kind == 'safetensors':
      from safetensors.numpy import load_file  # noqa: PLC0415  (optional)
      data = dict(load_file(path))
    elif kind.startswith('pickle'):
      with paths.open(path, 'rb') as f:
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


def _rows(state: Mapping[str, Any], suffixes: tuple[str, ...]) -> int | None:
  for key, value in state.items():
    if key.endswith(suffixes):
      return int(np.shape(value)[0])
  return None


def check_state_shapes(state: Mapping[str, Any], model_config: ml_collections.ConfigDict,
                       config_spec: str, source: str) -> None:
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
