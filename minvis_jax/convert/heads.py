"""Key maps of the Mask2Former pixel decoder and transformer decoder: HF transformers and
detectron2.

Each map is a list of (flax path, source key, transform); transforms turn torch layouts into flax
ones (OIHW -> HWIO, [out, in] -> [in, out], packed in_proj rows q, k, v -> one of them).
"""

from typing import Callable

import numpy as np

Path = tuple[str, ...]


def conv(w):
  return np.transpose(w, (2, 3, 1, 0))


def linear(w):
  return np.transpose(w, (1, 0))


def same(x):
  return x


def packed(i: int, weight: bool) -> Callable:
  """Row block i (0 = q, 1 = k, 2 = v) of a packed in_proj weight [3C, C] or bias [3C]."""
  def take(x):
    c = x.shape[0] // 3
    part = x[i * c:(i + 1) * c]
    return linear(part) if weight else part
  return take


def _dense(path: Path, key: str) -> list:
  return [(path + ('kernel',), f'{key}.weight', linear), (path + ('bias',), f'{key}.bias', same)]


def _norm(path: Path, key: str) -> list:
  return [(path + ('scale',), f'{key}.weight', same), (path + ('bias',), f'{key}.bias', same)]


def _conv(path: Path, key: str, bias: bool = True) -> list:
  out = [(path + ('kernel',), f'{key}.weight', conv)]
  return out + ([(path + ('bias',), f'{key}.bias', same)] if bias else [])


def _packed_attention(path: Path, key: str) -> list:
  out = []
  for i, proj in enumerate(('q_proj', 'k_proj', 'v_proj')):
    out.append((path + (proj, 'kernel'), f'{key}.in_proj_weight', packed(i, True)))
    out.append((path + (proj, 'bias'), f'{key}.in_proj_bias', packed(i, False)))
  return out + _dense(path + ('out_proj',), f'{key}.out_proj')


def _split_attention(path: Path, key: str) -> list:
  out = []
  for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
    out += _dense(path + (proj,), f'{key}.{proj}')
  return out


def hf_entries(model_config) -> list:
  """HF `Mask2FormerForUniversalSegmentation` names of everything but the backbone."""
  pd, td = 'model.pixel_level_module.decoder', 'model.transformer_module'
  P, D = ('pixel_decoder',), ('decoder',)
  e = [(P + ('level_embed',), f'{pd}.level_embed', same)]
  for lvl in range(model_config.num_feature_levels):
    e += _conv(P + (f'input_proj_{lvl}',), f'{pd}.input_projections.{lvl}.0')
    e += _norm(P + (f'input_proj_norm_{lvl}',), f'{pd}.input_projections.{lvl}.1')
  for i in range(model_config.enc_layers):
    k, p = f'{pd}.encoder.layers.{i}', P + (f'encoder_layer_{i}',)
    for proj in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj'):
      e += _dense(p + ('self_attn', proj), f'{k}.self_attn.{proj}')
    e += _norm(p + ('self_attn_norm',), f'{k}.self_attn_layer_norm')
    e += _dense(p + ('fc1',), f'{k}.fc1') + _dense(p + ('fc2',), f'{k}.fc2')
    e += _norm(p + ('final_norm',), f'{k}.final_layer_norm')
  e += _conv(P + ('lateral',), f'{pd}.adapter_1.0', bias=False)
  e += _norm(P + ('lateral_norm',), f'{pd}.adapter_1.1')
  e += _conv(P + ('output',), f'{pd}.layer_1.0', bias=False)
  e += _norm(P + ('output_norm',), f'{pd}.layer_1.1')
  e += _conv(P + ('mask_projection',), f'{pd}.mask_projection')
  e += [(D + ('query_feat',), f'{td}.queries_features.weight', same),
        (D + ('query_pos',), f'{td}.queries_embedder.weight', same),
        (D + ('level_embed',), f'{td}.level_embed.weight', same)]
  for i in range(model_config.dec_layers):
    k, p = f'{td}.decoder.layers.{i}', D + (f'layer_{i}',)
    e += _packed_attention(p + ('cross_attn',), f'{k}.cross_attn')
    e += _norm(p + ('cross_attn_norm',), f'{k}.cross_attn_layer_norm')
    e += _split_attention(p + ('self_attn',), f'{k}.self_attn')
    e += _norm(p + ('self_attn_norm',), f'{k}.self_attn_layer_norm')
    e += _dense(p + ('fc1',), f'{k}.fc1') + _dense(p + ('fc2',), f'{k}.fc2')
    e += _norm(p + ('final_norm',), f'{k}.final_layer_norm')
  e += _norm(D + ('decoder_norm',), f'{td}.decoder.layernorm')
  for i in range(3):
    e += _dense(D + (f'mask_embed_{i}',), f'{td}.decoder.mask_predictor.mask_embedder.{i}.0')
  e += _dense(D + ('class_embed',), 'class_predictor')
  return e


def detectron2_entries(model_config) -> list:
  """detectron2 Mask2Former / MinVIS names (`sem_seg_head.`) of everything but the backbone."""
  pd, td = 'sem_seg_head.pixel_decoder', 'sem_seg_head.predictor'
  P, D = ('pixel_decoder',), ('decoder',)
  e = [(P + ('level_embed',), f'{pd}.transformer.level_embed', same)]
  for lvl in range(model_config.num_feature_levels):
    e += _conv(P + (f'input_proj_{lvl}',), f'{pd}.input_proj.{lvl}.0')
    e += _norm(P + (f'input_proj_norm_{lvl}',), f'{pd}.input_proj.{lvl}.1')
  for i in range(model_config.enc_layers):
    k, p = f'{pd}.transformer.encoder.layers.{i}', P + (f'encoder_layer_{i}',)
    for proj in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj'):
      e += _dense(p + ('self_attn', proj), f'{k}.self_attn.{proj}')
    e += _norm(p + ('self_attn_norm',), f'{k}.norm1')
    e += _dense(p + ('fc1',), f'{k}.linear1') + _dense(p + ('fc2',), f'{k}.linear2')
    e += _norm(p + ('final_norm',), f'{k}.norm2')
  e += _conv(P + ('lateral',), f'{pd}.adapter_1', bias=False)
  e += _norm(P + ('lateral_norm',), f'{pd}.adapter_1.norm')
  e += _conv(P + ('output',), f'{pd}.layer_1', bias=False)
  e += _norm(P + ('output_norm',), f'{pd}.layer_1.norm')
  e += _conv(P + ('mask_projection',), f'{pd}.mask_features')
  e += [(D + ('query_feat',), f'{td}.query_feat.weight', same),
        (D + ('query_pos',), f'{td}.query_embed.weight', same),
        (D + ('level_embed',), f'{td}.level_embed.weight', same)]
  for i in range(model_config.dec_layers):
    p = D + (f'layer_{i}',)
    e += _packed_attention(p + ('cross_attn',),
                           f'{td}.transformer_cross_attention_layers.{i}.multihead_attn')
    e += _norm(p + ('cross_attn_norm',), f'{td}.transformer_cross_attention_layers.{i}.norm')
    e += _packed_attention(p + ('self_attn',),
                           f'{td}.transformer_self_attention_layers.{i}.self_attn')
    e += _norm(p + ('self_attn_norm',), f'{td}.transformer_self_attention_layers.{i}.norm')
    e += _dense(p + ('fc1',), f'{td}.transformer_ffn_layers.{i}.linear1')
    e += _dense(p + ('fc2',), f'{td}.transformer_ffn_layers.{i}.linear2')
    e += _norm(p + ('final_norm',), f'{td}.transformer_ffn_layers.{i}.norm')
  e += _norm(D + ('decoder_norm',), f'{td}.decoder_norm')
  for i in range(3):
    e += _dense(D + (f'mask_embed_{i}',), f'{td}.mask_embed.layers.{i}')
  e += _dense(D + ('class_embed',), f'{td}.class_embed')
  return e
