"""Backbones: shapes under jit, forward equivalence with HF transformers, weight-import key maps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import config_lib  # noqa: F401  (registers minvis_jax.configs in a checkout)
from minvis_jax.configs import common
from minvis_jax.convert import backbones as convert
from minvis_jax.models import backbone as backbone_lib

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

HF = convert.HF_PREFIX
STAGES = ('res2', 'res3', 'res4', 'res5')


def make_backbone(cfg, dtype='float32'):
  """The backbone module of `config.model.backbone` (a ConfigDict)."""
  return backbone_lib.make_backbone(backbone_lib.backbone_config(cfg), dtype)


def backbone_channels(cfg) -> tuple[int, int, int, int]:
  """Channels (c2, c3, c4, c5) of res2..res5."""
  if cfg.name == 'resnet':
    return tuple(int(w) for w in cfg.widths)
  return tuple(int(cfg.embed_dim * 2 ** i) for i in range(4))


def _swin_config(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=3):
  cfg = common.swin_backbone('T')
  cfg.update(dict(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window))
  return cfg


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


# ----------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize('name', ['resnet_tiny', 'resnet50', 'swin_t'])
def test_shapes_under_jit(name):
  cfg = {'resnet_tiny': common.tiny_model().backbone,
         'resnet50': common.resnet_backbone(50),
         'swin_t': common.swin_backbone('T')}[name]
  module = make_backbone(cfg)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 96, 3), jnp.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x)
  out = jax.jit(module.apply)(variables, x)
  channels = backbone_channels(cfg)
  for i, stage in enumerate(STAGES):
    stride = 4 * 2 ** i
    assert out[stage].shape == (2, 64 // stride, 96 // stride, channels[i])
    assert out[stage].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out[stage])))
  if cfg.name == 'resnet':
    # BN constants are not trainable: they live in 'frozen', only conv kernels in 'params'.
    assert set(variables) == {'params', 'frozen'}
    leaves = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
    assert {path[-1].key for path, _ in leaves} == {'kernel'}
  else:
    assert set(variables) == {'params'}


@pytest.mark.parametrize('name', ['resnet_tiny', 'swin_tiny'])
def test_bfloat16_compute_keeps_float32_params(name):
  cfg = common.tiny_model().backbone if name == 'resnet_tiny' else _swin_config()
  x = jnp.asarray(np.random.RandomState(0).randn(1, 64, 64, 3), jnp.float32)
  variables = jax.jit(make_backbone(cfg).init)(jax.random.PRNGKey(0), x)
  ref = jax.jit(make_backbone(cfg).apply)(variables, x)
  out = jax.jit(make_backbone(cfg, 'bfloat16').apply)(variables, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
  for s in STAGES:
    assert out[s].dtype == jnp.bfloat16
    err = np.abs(np.asarray(out[s], np.float32) - np.asarray(ref[s]))
    assert np.mean(err) < 0.05 * np.mean(np.abs(np.asarray(ref[s]))) + 1e-3


def test_swin_drop_path_only_in_training():
  cfg = _swin_config()
  cfg.drop_path_rate = 0.5
  module = make_backbone(cfg)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(module.apply, static_argnames='train')
  a = apply(variables, x)
  b = apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(a['res5']), np.asarray(b['res5']))
  c = apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  d = apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(np.asarray(c['res5']), np.asarray(a['res5']))
  assert not np.allclose(np.asarray(c['res5']), np.asarray(d['res5']))


# ------------------------------------------------------------------------- equivalence against HF


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


def _to_d2_resnet(state, torchvision=False):
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
  d2 = _to_d2_resnet(state)
  d2['sem_seg_head.predictor.query_feat.weight'] = np.zeros((3, 4), np.float32)  # other prefix
  got, consumed = convert.backbone_from_detectron2(d2, cfg)
  assert 'sem_seg_head.predictor.query_feat.weight' not in consumed
  _assert_same_tree(got, ref)
  tv = _to_d2_resnet(state, torchvision=True)
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


# 1x1 with more input than output channels too: its kernel gradient transposes the other operand.
# The last map is large enough (64 x 65 x 512) for the kernel gradient one image at a time.
@pytest.mark.parametrize('k,stride,size,cin,cout', [
    (1, 1, 9, 5, 6), (1, 2, 9, 5, 6), (1, 1, 9, 7, 3), (1, 2, 9, 7, 3), (3, 1, 8, 5, 6),
    (3, 2, 9, 5, 6), (7, 2, 10, 5, 6), (3, 1, 64, 2, 512)])
def test_conv2d_and_its_gradients_equal_xla_conv(k, stride, size, cin, cout):
  from minvis_jax.models.conv import conv2d
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
  pad = k // 2

  def xla(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  ours = conv2d(x, kernel, stride, pad)
  ref = xla(x, kernel)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # A loss that weights every output differently, so each gradient entry is checked.
  w = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  grads = [jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) * w), argnums=(0, 1))(x, kernel)
           for f in (lambda a, b: conv2d(a, b, stride, pad), xla)]
  for g_ours, g_ref in zip(*grads):
    # Sums over up to 8320 products: rounding grows with the gradient's scale.
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=max(1e-4, 2e-6 * scale))


@pytest.mark.parametrize('cin,cout', [(5, 7), (7, 3)])
def test_dense_equals_flax_dense_with_gradients(cin, cout):
  import flax.linen as nn

  from minvis_jax.models.conv import Dense
  rng = np.random.default_rng(cin)
  x = jnp.asarray(rng.normal(size=(2, 11, cin)), jnp.float32)
  ours, ref = Dense(cout), nn.Dense(cout)
  variables = ref.init(jax.random.PRNGKey(0), x)
  # Same variables (names, shapes) as nn.Dense, so checkpoints and converters are unchanged.
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(
      jnp.shape, variables)
  variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype), variables)
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-6, atol=1e-6)
  w = jnp.asarray(rng.normal(size=(2, 11, cout)), jnp.float32)
  grads = [jax.grad(lambda v, a, m=m: jnp.sum(m.apply(v, a) * w), argnums=(0, 1))(variables, x)
           for m in (ours, ref)]
  for g_ours, g_ref in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 12, 12, 4), (1, 7, 10, 3), (2, 9, 5, 2)])
def test_max_pool_and_its_gradient_equal_flax_max_pool(shape):
  import flax.linen as nn

  from minvis_jax.models.conv import max_pool_3x3_s2
  rng = np.random.default_rng(sum(shape))
  # ReLU'd inputs (zeros tie in most windows) plus a channel of equal values: ties must go to the
  # same input (the window's first maximum) as in XLA's pool, or gradients differ by whole entries.
  x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
  x[..., 0] = 1.0
  x = jnp.asarray(x)

  def ref(a):
    return nn.max_pool(a, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  np.testing.assert_array_equal(max_pool_3x3_s2(x), ref(x))
  w = jnp.asarray(rng.normal(size=ref(x).shape), jnp.float32)
  grads = [jax.grad(lambda a, f=f: jnp.sum(f(a) * w))(x) for f in (max_pool_3x3_s2, ref)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)
  assert float(jnp.sum(grads[0] != 0)) > 0
