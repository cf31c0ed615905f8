"""Backbones against HF transformers (forward equivalence) and the weight-import key maps
(detectron2, torchvision, Swin v4 and official layouts)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support.backbones import make_backbone
from support.detectron2_layout import to_d2_resnet
from support.backbones import swin_config as _swin_config
from minvis_jax.configs import common
from minvis_jax.convert import backbones as convert

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

HF = convert.HF_PREFIX
STAGES = ('res2', 'res3', 'res4', 'res5')


def _hf_resnet(cfg):
  hf_cfg = transformers.ResNetConfig(
      embedding_size=cfg.stem_width, hidden_sizes=list(cfg.widths), depths=list(cfg.depths),
      layer_type='bottleneck', out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  return transformers.ResNetBackbone(hf_cfg)


def _hf_swin(cfg):
  hf_cfg = transformers.SwinConfig(
      embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
      window_size=cfg.window_size, out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  return transformers.SwinBackbone(hf_cfg)


def _randomise(model, seed):
  """Random weights everywhere, including BN running stats (eval mode uses them)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.is_floating_point():
        continue
      if name.endswith('running_var'):
        t.copy_(0.5 + torch.rand(t.shape, generator=gen))
      elif 'norm' in name and name.endswith('weight'):
        t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=gen))
      elif name.endswith('relative_position_bias_table'):
        t.copy_(torch.randn(t.shape, generator=gen))
      else:
        fan_in = int(np.prod(t.shape[1:])) if t.ndim > 1 else 10
        t.copy_(torch.randn(t.shape, generator=gen) / np.sqrt(fan_in))
  return model.eval()


def _hf_state(model):
  """HF backbone state dict as a Mask2Former checkpoint would hold it (numpy, full prefix)."""
  return {HF + k: v.numpy() for k, v in model.state_dict().items()}


def _compare(model, variables, cfg, size, seed=0):
  """Runs both backbones on the same random image; returns {stage: (max abs diff, max |ref|)}."""
  x = np.random.RandomState(seed).randn(1, size[0], size[1], 3).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).feature_maps
  ours = jax.jit(make_backbone(cfg).apply)(variables, jnp.asarray(x))
  out = {}
  for name, r in zip(STAGES, ref):
    r = r.numpy().transpose(0, 2, 3, 1)
    assert ours[name].shape == r.shape, (name, ours[name].shape, r.shape)
    out[name] = (float(np.max(np.abs(np.asarray(ours[name]) - r))), float(np.max(np.abs(r))))
  return out


def _check(diffs, label, tol=1e-4):
  for name, (diff, scale) in diffs.items():
    print(f'{label} {name}: max abs diff {diff:.3g}, max |ref| {scale:.3g}, '
          f'relative {diff / scale:.3g}')
    # Absolute 1e-4 at unit scale; relative to the output scale when activations are large.
    assert diff <= tol * max(1.0, scale), (label, name, diff, scale)


@pytest.mark.parametrize('name,size', [('resnet_tiny', 384), ('resnet50', 384)])
def test_resnet_matches_hf(name, size):
  cfg = {'resnet_tiny': common.tiny_model().backbone,
         'resnet50': common.resnet_backbone(50)}[name]
  model = _randomise(_hf_resnet(cfg), seed=1)
  state = _hf_state(model)
  variables, consumed = convert.backbone_from_hf(state, cfg)
  assert consumed == set(state)
  _check(_compare(model, variables, cfg, (size, size)), name)


@pytest.mark.parametrize('window,size', [(3, (128, 160)), (7, (256, 256)), (7, (64, 96))])
def test_swin_matches_hf(window, size):
  # (128, 160) and (256, 256): every stage larger than the window; window 3 also pads to a
  # multiple of the window. (64, 96): res4/res5 (4x6, 2x3) are smaller than the window; HF 5.24's
  # SwinBackbone runs its encoder with always_partition=True, i.e. detectron2 semantics (padding
  # and the shift kept), so it is a reference for that case too.
  cfg = _swin_config(window=window)
  model = _randomise(_hf_swin(cfg), seed=2)
  state = _hf_state(model)
  variables, consumed = convert.backbone_from_hf(state, cfg)
  assert consumed == set(state)
  _check(_compare(model, variables, cfg, size), f'swin_w{window}')


# ----------------------------------------------------------------------- other checkpoint formats


def _to_v4_swin(state):
  """HF v5 in-memory Swin names -> the v4 on-disk spelling (independent of the converter)."""
  rules = [(r'\.swin\.', '.'), (r'attention\.q_proj', 'attention.self.query'),
           (r'attention\.k_proj', 'attention.self.key'),
           (r'attention\.v_proj', 'attention.self.value'),
           (r'attention\.o_proj', 'attention.output.dense'),
           (r'attention\.relative_position_bias\.relative_position_bias_table',
            'attention.self.relative_position_bias_table'),
           (r'mlp\.fc1', 'intermediate.dense'), (r'mlp\.fc2', 'output.dense')]
  out = {}
  for k, v in state.items():
    if '.swin.layernorm.' in k:
      continue
    for pat, rep in rules:
      k = re.sub(pat, rep, k)
    out[k] = v
  return out


def _to_d2_swin(state, prefix):
  """HF v5 Swin names -> D2SwinTransformer names with packed qkv."""
  out = {}
  for k, v in state.items():
    k = k[len(HF):]
    if k.startswith('swin.layernorm.'):
      continue
    m = re.match(r'hidden_states_norms\.stage(\d)\.(\w+)', k)
    if m:
      out[f'{prefix}norm{int(m.group(1)) - 1}.{m.group(2)}'] = v
      continue
    k = k.replace('swin.embeddings.patch_embeddings.projection', 'patch_embed.proj')
    k = k.replace('swin.embeddings.norm', 'patch_embed.norm').replace('swin.encoder.', '')
    k = k.replace('layernorm_before', 'norm1').replace('layernorm_after', 'norm2')
    k = k.replace('attention.o_proj', 'attn.proj')
    k = k.replace('attention.relative_position_bias.relative_position_bias_table',
                  'attn.relative_position_bias_table')
    m = re.match(r'(.*)attention\.([qkv])_proj\.(\w+)', k)
    if m:
      if m.group(2) == 'q':
        parts = [state[HF + 'swin.encoder.' + m.group(1) + f'attention.{c}_proj.{m.group(3)}']
                 for c in 'qkv']
        out[f'{prefix}{m.group(1)}attn.qkv.{m.group(3)}'] = np.concatenate(parts, 0)
      continue
    out[prefix + k] = v
  return out


def _assert_same_tree(a, b):
  fa = jax.tree_util.tree_flatten_with_path(a)[0]
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(fa) == len(fb)
  for path, x in fa:
    np.testing.assert_array_equal(x, fb[path], err_msg=str(path))


@pytest.fixture(scope='module')
def tiny_resnet():
  cfg = common.tiny_model().backbone
  model = _randomise(_hf_resnet(cfg), seed=3)
  return cfg, model, _hf_state(model)


@pytest.fixture(scope='module')
def tiny_swin():
  cfg = _swin_config()
  model = _randomise(_hf_swin(cfg), seed=4)
  return cfg, model, _hf_state(model)


def test_resnet_detectron2_and_torchvision_import(tiny_resnet):
  cfg, model, state = tiny_resnet
  ref, _ = convert.backbone_from_hf(state, cfg)
  d2 = to_d2_resnet(state)
  d2['sem_seg_head.predictor.query_feat.weight'] = np.zeros((3, 4), np.float32)  # other prefix
  got, consumed = convert.backbone_from_detectron2(d2, cfg)
  assert 'sem_seg_head.predictor.query_feat.weight' not in consumed
  _assert_same_tree(got, ref)
  tv = to_d2_resnet(state, torchvision=True)
  got, consumed = convert.backbone_from_torchvision(tv, cfg)
  assert consumed == set(tv)
  _assert_same_tree(got, ref)
  # And the converted weights really compute HF's features.
  _check(_compare(model, got, cfg, (64, 64)), 'resnet_tiny_torchvision')


def test_swin_v4_detectron2_and_official_import(tiny_swin):
  cfg, model, state = tiny_swin
  ref, _ = convert.backbone_from_hf(state, cfg)
  v4 = _to_v4_swin(state)
  assert not any('.swin.' in k for k in v4)
  for k in list(v4):  # v4 files carry the buffer; it must be consumed, not imported.
    if k.endswith('relative_position_bias_table'):
      v4[k.replace('bias_table', 'index')] = np.zeros((9, 9), np.int64)
  got, consumed = convert.backbone_from_hf(v4, cfg)
  assert consumed == set(v4)
  _assert_same_tree(got, ref)
  # Early HF conversions (MaskFormerSwinBackbone): `model.` root and output norms numbered 0..3.
  renumber = lambda m: f'hidden_states_norms.{int(m.group(1)) - 1}'
  old = {re.sub(r'hidden_states_norms\.stage(\d)', renumber,
                k if 'hidden_states_norms' in k else k.replace(HF, HF + 'model.')): v
         for k, v in v4.items()}
  got, consumed = convert.backbone_from_hf(old, cfg)
  assert consumed == set(old)
  _assert_same_tree(got, ref)
  d2 = _to_d2_swin(state, 'backbone.')
  got, _ = convert.backbone_from_detectron2(d2, cfg)
  _assert_same_tree(got, ref)
  _check(_compare(model, got, cfg, (128, 160)), 'swin_detectron2')
  # Official ImageNet checkpoint: no norm0..3 (start at identity), a final norm and a head to drop.
  official = {k[len('backbone.'):]: v for k, v in d2.items() if not k.startswith('backbone.norm')}
  official.update({'norm.weight': np.ones(256, np.float32), 'norm.bias': np.zeros(256, np.float32),
                   'head.weight': np.zeros((5, 256), np.float32),
                   'head.bias': np.zeros(5, np.float32),
                   'layers.0.blocks.1.attn_mask': np.zeros((4, 9, 9), np.float32)})
  got, consumed = convert.backbone_from_swin({'model': official}, cfg)
  assert consumed == set(official)
  np.testing.assert_array_equal(got['params']['norm2']['scale'], np.ones(128))
  np.testing.assert_array_equal(got['params']['norm2']['bias'], np.zeros(128))
  np.testing.assert_array_equal(got['params']['layers_1']['blocks_0']['attn']['qkv']['kernel'],
                                ref['params']['layers_1']['blocks_0']['attn']['qkv']['kernel'])


def test_import_errors_name_the_key(tiny_resnet, tiny_swin):
  cfg, _, state = tiny_resnet
  key = HF + 'encoder.stages.1.layers.0.layer.1.convolution.weight'
  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(ValueError, match=re.escape(key)):
    convert.backbone_from_hf(missing, cfg)
  extra = dict(state, **{HF + 'encoder.stages.9.bogus.weight': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=re.escape(HF + 'encoder.stages.9.bogus.weight')):
    convert.backbone_from_hf(extra, cfg)
  bad = dict(state, **{key: np.zeros((16, 16, 1, 3), np.float32)})
  with pytest.raises(ValueError, match=re.escape(key)):
    convert.backbone_from_hf(bad, cfg)
  cfg, _, state = tiny_swin
  key = HF + 'swin.encoder.layers.2.blocks.1.attention.k_proj.bias'
  bad = dict(state, **{key: np.zeros(7, np.float32)})
  with pytest.raises(ValueError, match=re.escape(key)):
    convert.backbone_from_hf(bad, cfg)
