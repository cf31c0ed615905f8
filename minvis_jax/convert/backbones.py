"""Backbone weight import: HF transformers, detectron2, torchvision ResNet and official Swin names.

Each `backbone_from_*` takes a flat {name: numpy array} mapping and returns
(variables, consumed_keys): variables = {'params': ..., 'frozen': ...} of the module built by
`minvis_jax.models.backbone.make_backbone` ('frozen' is {} for Swin), consumed_keys the set of input
names used or deliberately dropped (buffers, classifier heads). Keys under the prefix that are not
consumed raise ValueError, as do missing or mis-shaped ones.
"""

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from minvis_jax.models.backbone import backbone_config as frozen_backbone_config
from minvis_jax.models.backbone import make_backbone

# One expected leaf: (collection, path in the backbone, source names, transform of their arrays).
Entry = tuple[str, tuple[str, ...], Sequence[str], Callable[..., np.ndarray]]

HF_PREFIX = 'model.pixel_level_module.encoder.'


def _conv(w):  # torch OIHW -> flax HWIO.
  return np.transpose(w, (2, 3, 1, 0))


def _linear(w):  # torch [out, in] -> flax [in, out].
  return np.transpose(w)


def _same(x):
  return x


def _cat_linear(*ws):  # q, k, v weights -> one packed [in, 3 * out] kernel.
  return np.transpose(np.concatenate(ws, axis=0))


def _cat(*bs):
  return np.concatenate(bs, axis=0)


def _expected_shapes(backbone_config: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple]:
  """{(collection, *path): shape} of the backbone's variables, without allocating them."""
  module = make_backbone(frozen_backbone_config(backbone_config))
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def _assemble(state: Mapping[str, Any], entries: Sequence[Entry], backbone_config,
              prefix: str, ignored: Callable[[str], bool]) -> tuple[dict, set[str]]:
  """Builds nested variables from `entries`, checking presence, shapes and leftovers."""
  expected = _expected_shapes(backbone_config)
  variables: dict = {'params': {}, 'frozen': {}}
  consumed: set[str] = set()
  seen = set()
  for collection, path, names, fn in entries:
    full = [prefix + n for n in names]
    for k in full:
      if k not in state:
        target = '/'.join((collection,) + tuple(path))
        raise ValueError(f'backbone checkpoint: missing key {k!r} (for {target})')
    value = np.asarray(fn(*[np.asarray(state[k], dtype=np.float32) for k in full]), np.float32)
    key = (collection,) + tuple(path)
    if key not in expected:
      raise ValueError(f'internal key map error: {key} is not a backbone variable')
    if value.shape != expected[key]:
      got = ', '.join(f'{k!r} {tuple(np.shape(state[k]))}' for k in full) or '(generated)'
      raise ValueError(f'backbone checkpoint: mis-shaped key(s) {got} give {value.shape} for '
                       f'{"/".join(key)}, expected {expected[key]}')
    node = variables[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
    consumed.update(full)
    seen.add(key)
  unset = sorted('/'.join(k) for k in expected if k not in seen)
  if unset:
    raise ValueError(f'internal key map error: backbone variables not covered: {unset[:10]}')
  for k in state:
    if k.startswith(prefix) and k not in consumed and ignored(k[len(prefix):]):
      consumed.add(k)
  leftover = sorted(k for k in state if k.startswith(prefix) and k not in consumed)
  if leftover:
    raise ValueError(f'backbone checkpoint: {len(leftover)} unexpected key(s) under {prefix!r}: '
                     f'{leftover[:20]}')
  return variables, consumed


# ----------------------------------------------------------------------------------------- ResNet


def _resnet_entries(cfg, conv_name: Callable[[int, int, str], str],
                    bn_names: Callable[[int, int, str], tuple[str, str, str, str]]) -> list[Entry]:
  """Entries for a ResNet given name functions of (stage 2..5 or 1 for the stem, block, conv).

  conv is one of 'stem', 'conv1', 'conv2', 'conv3', 'shortcut'.
  """
  entries = []

  def add(path, stage, block, conv):
    entries.append(('params', path + ('kernel',), [conv_name(stage, block, conv)], _conv))
    for leaf, name in zip(('scale', 'bias', 'mean', 'var'), bn_names(stage, block, conv)):
      entries.append(('frozen', path + (leaf,), [name], _same))

  add(('stem',), 1, 0, 'stem')
  in_ch = cfg.stem_width
  for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
    stage = i + 2
    for b in range(depth):
      stride = 2 if (b == 0 and stage > 2) else 1
      for conv in ('conv1', 'conv2', 'conv3'):
        add((f'res{stage}_{b}', conv), stage, b, conv)
      if in_ch != width or stride != 1:
        add((f'res{stage}_{b}', 'shortcut'), stage, b, 'shortcut')
      in_ch = width
  return entries


def _resnet_hf_names(stage, block, conv):
  if conv == 'stem':
    base = 'embedder.embedder.'
  elif conv == 'shortcut':
    base = f'encoder.stages.{stage - 2}.layers.{block}.shortcut.'
  else:
    base = f'encoder.stages.{stage - 2}.layers.{block}.layer.{int(conv[-1]) - 1}.'
  return base + 'convolution.weight', tuple(
      base + 'normalization.' + n for n in ('weight', 'bias', 'running_mean', 'running_var'))


def _resnet_d2_names(stage, block, conv):
  base = 'stem.conv1' if conv == 'stem' else f'res{stage}.{block}.{conv}'
  return base + '.weight', tuple(
      f'{base}.norm.{n}' for n in ('weight', 'bias', 'running_mean', 'running_var'))


def _resnet_tv_names(stage, block, conv):
  if conv == 'stem':
    conv_key, bn = 'conv1.weight', 'bn1'
  else:
    base = f'layer{stage - 1}.{block}.'
    if conv == 'shortcut':
      conv_key, bn = base + 'downsample.0.weight', base + 'downsample.1'
    else:
      conv_key, bn = base + conv + '.weight', base + 'bn' + conv[-1]
  return conv_key, tuple(f'{bn}.{n}' for n in ('weight', 'bias', 'running_mean', 'running_var'))


def _resnet(state, cfg, names, prefix, ignored):
  entries = _resnet_entries(cfg, lambda s, b, c: names(s, b, c)[0],
                            lambda s, b, c: names(s, b, c)[1])
  return _assemble(state, entries, cfg, prefix, ignored)


# ------------------------------------------------------------------------------------------- Swin


def _swin_entries(cfg, names: Mapping[str, Callable[..., Any]],
                  with_out_norms: bool) -> list[Entry]:
  """Entries for Swin; `names[kind](i, j)` gives the source name(s) of each leaf kind."""
  e = []
  pe = ('patch_embed',)
  e.append(('params', pe + ('proj', 'kernel'), [names['patch_proj_w']()], _conv))
  e.append(('params', pe + ('proj', 'bias'), [names['patch_proj_b']()], _same))
  e.append(('params', pe + ('norm', 'scale'), [names['patch_norm_w']()], _same))
  e.append(('params', pe + ('norm', 'bias'), [names['patch_norm_b']()], _same))
  for i, depth in enumerate(cfg.depths):
    stage = (f'layers_{i}',)
    for j in range(depth):
      blk = stage + (f'blocks_{j}',)
      for ours, kind, fn in (
          (('norm1', 'scale'), 'norm1_w', _same), (('norm1', 'bias'), 'norm1_b', _same),
          (('attn', 'qkv', 'kernel'), 'qkv_w', _cat_linear),
          (('attn', 'qkv', 'bias'), 'qkv_b', _cat),
          (('attn', 'proj', 'kernel'), 'proj_w', _linear),
          (('attn', 'proj', 'bias'), 'proj_b', _same),
          (('attn', 'relative_position_bias_table'), 'table', _same),
          (('norm2', 'scale'), 'norm2_w', _same), (('norm2', 'bias'), 'norm2_b', _same),
          (('fc1', 'kernel'), 'fc1_w', _linear), (('fc1', 'bias'), 'fc1_b', _same),
          (('fc2', 'kernel'), 'fc2_w', _linear), (('fc2', 'bias'), 'fc2_b', _same)):
        src = names[kind](i, j)
        e.append(('params', blk + ours, [src] if isinstance(src, str) else list(src), fn))
    if i < len(cfg.depths) - 1:
      ds = stage + ('downsample',)
      e.append(('params', ds + ('norm', 'scale'), [names['down_norm_w'](i)], _same))
      e.append(('params', ds + ('norm', 'bias'), [names['down_norm_b'](i)], _same))
      e.append(('params', ds + ('reduction', 'kernel'), [names['down_red_w'](i)], _linear))
    if with_out_norms:
      e.append(('params', (f'norm{i}', 'scale'), [names['out_norm_w'](i)], _same))
      e.append(('params', (f'norm{i}', 'bias'), [names['out_norm_b'](i)], _same))
  return e


def _swin_d2_names() -> dict[str, Callable[..., Any]]:
  """D2SwinTransformer / official Swin names (no prefix); qkv is already packed."""
  block_leaves = dict(
      norm1_w='norm1.weight', norm1_b='norm1.bias', qkv_w='attn.qkv.weight',
      qkv_b='attn.qkv.bias', proj_w='attn.proj.weight', proj_b='attn.proj.bias',
      table='attn.relative_position_bias_table', norm2_w='norm2.weight', norm2_b='norm2.bias',
      fc1_w='mlp.fc1.weight', fc1_b='mlp.fc1.bias', fc2_w='mlp.fc2.weight', fc2_b='mlp.fc2.bias')
  names = {kind: (lambda i, j, leaf=leaf: f'layers.{i}.blocks.{j}.{leaf}')
           for kind, leaf in block_leaves.items()}
  names.update(
      patch_proj_w=lambda: 'patch_embed.proj.weight', patch_proj_b=lambda: 'patch_embed.proj.bias',
      patch_norm_w=lambda: 'patch_embed.norm.weight', patch_norm_b=lambda: 'patch_embed.norm.bias',
      down_norm_w=lambda i: f'layers.{i}.downsample.norm.weight',
      down_norm_b=lambda i: f'layers.{i}.downsample.norm.bias',
      down_red_w=lambda i: f'layers.{i}.downsample.reduction.weight',
      out_norm_w=lambda i: f'norm{i}.weight', out_norm_b=lambda i: f'norm{i}.bias',
  )
  return names


def _swin_hf_names(v5: bool, root: str, norm_stage_names: bool) -> dict[str, Callable[..., Any]]:
  """HF Swin names: v5 in-memory (q/k/v/o_proj, mlp.fc1) or v4 on-disk (attention.self.query...).

  root is 'swin.' (v5 SwinBackbone), '' (v4 SwinBackbone) or 'model.' (MaskFormerSwinBackbone,
  whose output norms are numbered 0..3 instead of stage1..stage4).
  """
  blk = lambda i, j: f'{root}encoder.layers.{i}.blocks.{j}.'
  if v5:
    q, k, v = 'attention.q_proj', 'attention.k_proj', 'attention.v_proj'
    o, table = 'attention.o_proj', 'attention.relative_position_bias.relative_position_bias_table'
    fc1, fc2 = 'mlp.fc1', 'mlp.fc2'
  else:
    q, k, v = 'attention.self.query', 'attention.self.key', 'attention.self.value'
    o, table = 'attention.output.dense', 'attention.self.relative_position_bias_table'
    fc1, fc2 = 'intermediate.dense', 'output.dense'
  emb = f'{root}embeddings.'
  stage = lambda i: f'stage{i + 1}' if norm_stage_names else str(i)
  return dict(
      patch_proj_w=lambda: emb + 'patch_embeddings.projection.weight',
      patch_proj_b=lambda: emb + 'patch_embeddings.projection.bias',
      patch_norm_w=lambda: emb + 'norm.weight', patch_norm_b=lambda: emb + 'norm.bias',
      norm1_w=lambda i, j: blk(i, j) + 'layernorm_before.weight',
      norm1_b=lambda i, j: blk(i, j) + 'layernorm_before.bias',
      qkv_w=lambda i, j: [blk(i, j) + f'{n}.weight' for n in (q, k, v)],
      qkv_b=lambda i, j: [blk(i, j) + f'{n}.bias' for n in (q, k, v)],
      proj_w=lambda i, j: blk(i, j) + f'{o}.weight', proj_b=lambda i, j: blk(i, j) + f'{o}.bias',
      table=lambda i, j: blk(i, j) + table,
      norm2_w=lambda i, j: blk(i, j) + 'layernorm_after.weight',
      norm2_b=lambda i, j: blk(i, j) + 'layernorm_after.bias',
      fc1_w=lambda i, j: blk(i, j) + f'{fc1}.weight', fc1_b=lambda i, j: blk(i, j) + f'{fc1}.bias',
      fc2_w=lambda i, j: blk(i, j) + f'{fc2}.weight', fc2_b=lambda i, j: blk(i, j) + f'{fc2}.bias',
      down_norm_w=lambda i: f'{root}encoder.layers.{i}.downsample.norm.weight',
      down_norm_b=lambda i: f'{root}encoder.layers.{i}.downsample.norm.bias',
      down_red_w=lambda i: f'{root}encoder.layers.{i}.downsample.reduction.weight',
      out_norm_w=lambda i: f'hidden_states_norms.{stage(i)}.weight',
      out_norm_b=lambda i: f'hidden_states_norms.{stage(i)}.bias',
  )


def _is_buffer(name: str) -> bool:
  """Buffers that are recomputed, never imported."""
  return (name.endswith('relative_position_index') or name.endswith('num_batches_tracked')
          or name.endswith('.attn_mask'))


# ---------------------------------------------------------------------------------- public entries


def backbone_from_hf(state: Mapping[str, Any], backbone_config: ml_collections.ConfigDict,
                     prefix: str = HF_PREFIX) -> tuple[dict, set[str]]:
  """HF transformers Mask2Former backbone: ResNetBackbone, or Swin in any of its spellings.

  Swin: v5 in-memory SwinBackbone (`swin.embeddings`, `attention.q_proj`, `mlp.fc1`), v4 on-disk
  SwinBackbone (`embeddings`, `attention.self.query`, `intermediate.dense`,
  `hidden_states_norms.stage1`), and early conversions with MaskFormerSwinBackbone names
  (`model.embeddings`, `hidden_states_norms.0`).
  """
  if backbone_config.name == 'resnet':
    return _resnet(state, backbone_config, _resnet_hf_names, prefix, _is_buffer)
  root = ''
  for r in ('swin.', 'model.'):
    if prefix + r + 'embeddings.patch_embeddings.projection.weight' in state:
      root = r
  first_block = f'{prefix}{root}encoder.layers.0.blocks.0.'
  v5 = first_block + 'attention.q_proj.weight' in state
  names = _swin_hf_names(v5, root, norm_stage_names=root != 'model.')
  # v5's SwinBackbone wraps a SwinModel whose final `layernorm` the backbone output never uses.
  ignored = lambda n: _is_buffer(n) or n.startswith(root + 'layernorm.')
  entries = _swin_entries(backbone_config, names, with_out_norms=True)
  return _assemble(state, entries, backbone_config, prefix, ignored)


def backbone_from_detectron2(state: Mapping[str, Any], backbone_config: ml_collections.ConfigDict,
                             prefix: str = 'backbone.') -> tuple[dict, set[str]]:
  """detectron2 ResNet (stem.conv1, resN.M.convK(.norm), shortcut) or D2SwinTransformer names."""
  if backbone_config.name == 'resnet':
    return _resnet(state, backbone_config, _resnet_d2_names, prefix, _is_buffer)
  entries = _swin_entries(backbone_config, _swin_d2_names(), with_out_norms=True)
  return _assemble(state, entries, backbone_config, prefix, _is_buffer)


def backbone_from_torchvision(state: Mapping[str, Any], backbone_config: ml_collections.ConfigDict,
                              prefix: str = '') -> tuple[dict, set[str]]:
  """torchvision ResNet state dict (conv1, bn1, layerN.M..., downsample.0/1); `fc` is dropped."""
  if backbone_config.name != 'resnet':
    raise ValueError(f'torchvision import needs a resnet backbone, got {backbone_config.name!r}')
  ignored = lambda n: _is_buffer(n) or n.startswith('fc.')
  return _resnet(state, backbone_config, _resnet_tv_names, prefix, ignored)


def backbone_from_swin(state: Mapping[str, Any], backbone_config: ml_collections.ConfigDict,
                       prefix: str = '') -> tuple[dict, set[str]]:
  """Official Swin ImageNet checkpoint (optionally nested under 'model').

  The classifier `head` and final `norm` are dropped; the four output LayerNorms (norm0..norm3),
  absent from ImageNet checkpoints, start at identity (scale 1, bias 0) as in detectron2.
  """
  if backbone_config.name != 'swin':
    raise ValueError(f'Swin import needs a swin backbone, got {backbone_config.name!r}')
  if 'model' in state and isinstance(state['model'], Mapping):
    state = state['model']
  ignored = lambda n: _is_buffer(n) or n.startswith('head.') or n.startswith('norm.')
  entries = _swin_entries(backbone_config, _swin_d2_names(), with_out_norms=False)
  for i in range(len(backbone_config.depths)):
    dim = backbone_config.embed_dim * 2 ** i
    entries.append(('params', (f'norm{i}', 'scale'), [], lambda d=dim: np.ones((d,), np.float32)))
    entries.append(('params', (f'norm{i}', 'bias'), [], lambda d=dim: np.zeros((d,), np.float32)))
  return _assemble(state, entries, backbone_config, prefix, ignored)
