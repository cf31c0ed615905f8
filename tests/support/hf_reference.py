"""Builds HF transformers Mask2Former reference models offline (random weights) for the tests."""

import numpy as np
import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from transformers import ResNetConfig, SwinConfig

STAGES = ['stage1', 'stage2', 'stage3', 'stage4']


def hf_config(backbone: str = 'resnet_tiny', **overrides) -> Mask2FormerConfig:
  if backbone == 'resnet_tiny':
    bb = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                      layer_type='bottleneck', out_features=STAGES)
  elif backbone == 'resnet50':
    bb = ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                      layer_type='bottleneck', out_features=STAGES)
  elif backbone == 'swin_tiny':
    bb = SwinConfig(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], window_size=4,
                    out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  else:
    raise ValueError(backbone)
  small = dict(hidden_dim=64, mask_feature_size=64, feature_size=64, encoder_layers=2,
               decoder_layers=4, num_attention_heads=4, encoder_feedforward_dim=128,
               dim_feedforward=128, num_queries=12, num_labels=5)
  full = dict(hidden_dim=256, mask_feature_size=256, feature_size=256, encoder_layers=6,
              decoder_layers=10, num_attention_heads=8, encoder_feedforward_dim=1024,
              dim_feedforward=2048, num_queries=100, num_labels=40)
  kw = full if backbone == 'resnet50' else small
  kw.update(overrides)
  return Mask2FormerConfig(backbone_config=bb, use_timm_backbone=False,
                           output_auxiliary_logits=True, **kw)


def hf_model(config: Mask2FormerConfig, seed: int = 0):
  """An eval-mode model whose every parameter and BN statistic is randomised (zeros hide bugs)."""
  torch.manual_seed(seed)
  model = Mask2FormerForUniversalSegmentation(config).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.is_floating_point() or name.endswith('empty_weight'):
        continue
      noise = torch.randn(t.shape, generator=g) * 0.05
      if name.endswith('running_var'):
        t.copy_(1.0 + noise.abs() * 4)
      elif name.endswith('running_mean'):
        t.copy_(noise * 4)
      else:
        t.add_(noise)
  return model


def state_dict_numpy(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_forward(model, images_nhwc: np.ndarray) -> dict:
  """HF outputs in our contract's layout: pred_logits, pred_masks, pred_embds, aux_outputs."""
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous())
  norm = model.model.transformer_module.decoder.layernorm
  with torch.no_grad():
    embds = norm(out.transformer_decoder_last_hidden_state).numpy()
  aux = [{'pred_logits': a['class_queries_logits'].numpy(),
          'pred_masks': a['masks_queries_logits'].numpy()} for a in out.auxiliary_logits]
  return {'pred_logits': out.class_queries_logits.numpy(),
          'pred_masks': out.masks_queries_logits.numpy(), 'pred_embds': embds,
          'aux_outputs': aux}


def converted_r50(seed: int = 0):
  """(HF R50 Mask2Former with random weights, our model config, the same weights as our
  variables)."""
  from minvis_jax import convert  # noqa: PLC0415
  hf_cfg = hf_config('resnet50')
  model = hf_model(hf_cfg, seed)
  model_config = convert.model_config_from_hf(hf_cfg.to_dict())
  return model, model_config, convert.params_from_hf(state_dict_numpy(model), model_config)
