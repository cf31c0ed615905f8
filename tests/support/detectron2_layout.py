"""HF Mask2Former state dicts renamed to the detectron2 (and torchvision) layouts, written
independently of minvis_jax.convert, to test its detectron2/torchvision key maps against HF."""

import re

import numpy as np

HF = 'model.pixel_level_module.encoder.'
HF_PD = 'model.pixel_level_module.decoder.'
HF_TD = 'model.transformer_module.'
D2_PD = 'sem_seg_head.pixel_decoder.'
D2_TD = 'sem_seg_head.predictor.'

# HF head names -> detectron2 Mask2Former names, written independently of minvis_jax.convert.
_RULES = [
    (HF_PD + r'level_embed', D2_PD + 'transformer.level_embed'),
    (HF_PD + r'input_projections\.(\d)\.(\d)\.(\w+)', D2_PD + r'input_proj.\1.\2.\3'),
    (HF_PD + r'encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(\w+)',
     D2_PD + r'transformer.encoder.layers.\1.self_attn.\2.\3'),
    (HF_PD + r'encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)',
     D2_PD + r'transformer.encoder.layers.\1.norm1.\2'),
    (HF_PD + r'encoder\.layers\.(\d+)\.fc(\d)\.(\w+)',
     D2_PD + r'transformer.encoder.layers.\1.linear\2.\3'),
    (HF_PD + r'encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)',
     D2_PD + r'transformer.encoder.layers.\1.norm2.\2'),
    (HF_PD + r'adapter_1\.0\.weight', D2_PD + 'adapter_1.weight'),
    (HF_PD + r'adapter_1\.1\.(\w+)', D2_PD + r'adapter_1.norm.\1'),
    (HF_PD + r'layer_1\.0\.weight', D2_PD + 'layer_1.weight'),
    (HF_PD + r'layer_1\.1\.(\w+)', D2_PD + r'layer_1.norm.\1'),
    (HF_PD + r'mask_projection\.(\w+)', D2_PD + r'mask_features.\1'),
    (HF_TD + r'queries_features\.weight', D2_TD + 'query_feat.weight'),
    (HF_TD + r'queries_embedder\.weight', D2_TD + 'query_embed.weight'),
    (HF_TD + r'level_embed\.weight', D2_TD + 'level_embed.weight'),
    (HF_TD + r'decoder\.layers\.(\d+)\.cross_attn\.(\w+)\.?(\w*)',
     D2_TD + r'transformer_cross_attention_layers.\1.multihead_attn.\2.\3'),
    (HF_TD + r'decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(\w+)',
     D2_TD + r'transformer_cross_attention_layers.\1.norm.\2'),
    (HF_TD + r'decoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)',
     D2_TD + r'transformer_self_attention_layers.\1.norm.\2'),
    (HF_TD + r'decoder\.layers\.(\d+)\.fc(\d)\.(\w+)',
     D2_TD + r'transformer_ffn_layers.\1.linear\2.\3'),
    (HF_TD + r'decoder\.layers\.(\d+)\.final_layer_norm\.(\w+)',
     D2_TD + r'transformer_ffn_layers.\1.norm.\2'),
    (HF_TD + r'decoder\.layernorm\.(\w+)', D2_TD + r'decoder_norm.\1'),
    (HF_TD + r'decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(\w+)',
     D2_TD + r'mask_embed.layers.\1.\2'),
    (r'class_predictor\.(\w+)', D2_TD + r'class_embed.\1'),
]


def to_detectron2(state: dict) -> dict:
  """An HF state dict renamed to detectron2's layout (self-attention q/k/v packed into in_proj)."""
  out = to_d2_resnet({k: v for k, v in state.items()
                       if k.startswith('model.pixel_level_module.encoder.')})
  packs = {}
  for k, v in state.items():
    if k.startswith('model.pixel_level_module.encoder.') or k == 'criterion.empty_weight':
      continue
    m = re.fullmatch(HF_TD + r'decoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(\w+)', k)
    if m:
      i, proj, leaf = m.groups()
      base = D2_TD + f'transformer_self_attention_layers.{i}.self_attn.'
      if proj == 'out':
        out[base + f'out_proj.{leaf}'] = v
      else:
        packs.setdefault(base + f'in_proj_{leaf}', {})[proj] = v
      continue
    for pattern, repl in _RULES:
      if re.fullmatch(pattern, k):
        out[re.sub(pattern, repl, k).rstrip('.').replace('.in_proj_weight.', '.in_proj_weight')
            .replace('.in_proj_bias.', '.in_proj_bias')] = v
        break
    else:
      raise AssertionError(f'no detectron2 name for {k}')
  for name, parts in packs.items():
    out[name] = np.concatenate([parts['q'], parts['k'], parts['v']], axis=0)
  out['pixel_mean'] = np.zeros((3, 1, 1), np.float32)  # buffers of the original, ignored
  out['pixel_std'] = np.ones((3, 1, 1), np.float32)
  return out


def to_d2_resnet(state, torchvision=False):
  """HF ResNet names -> detectron2 (`backbone.` prefix) or torchvision names."""
  out = {}
  for k, v in state.items():
    k = k[len(HF):]
    if k.endswith('num_batches_tracked'):
      if torchvision:
        out[k.replace('embedder.embedder.normalization', 'bn1')] = v  # one representative buffer
      continue
    bn = {'weight': 'weight', 'bias': 'bias', 'running_mean': 'running_mean',
          'running_var': 'running_var'}
    m = re.match(r'embedder\.embedder\.(convolution|normalization)\.(\w+)', k)
    if m:
      if torchvision:
        name = 'conv1.weight' if m.group(1) == 'convolution' else f'bn1.{bn[m.group(2)]}'
      else:
        name = ('stem.conv1.weight' if m.group(1) == 'convolution'
                else f'stem.conv1.norm.{m.group(2)}')
      out[name if torchvision else 'backbone.' + name] = v
      continue
    m = re.match(r'encoder\.stages\.(\d)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.'
                 r'(convolution|normalization)\.(\w+)', k)
    s, b, is_conv, leaf = int(m.group(1)), m.group(2), m.group(5) == 'convolution', m.group(6)
    if torchvision:
      base = f'layer{s + 1}.{b}.'
      if m.group(3) == 'shortcut':
        name = base + ('downsample.0.weight' if is_conv else f'downsample.1.{leaf}')
      else:
        c = int(m.group(4)) + 1
        name = base + (f'conv{c}.weight' if is_conv else f'bn{c}.{leaf}')
    else:
      base = f'backbone.res{s + 2}.{b}.'
      conv = 'shortcut' if m.group(3) == 'shortcut' else f'conv{int(m.group(4)) + 1}'
      name = base + conv + ('.weight' if is_conv else f'.norm.{leaf}')
    out[name] = v
  if torchvision:
    out['fc.weight'] = np.zeros((10, 4), np.float32)
    out['fc.bias'] = np.zeros((10,), np.float32)
  return out
