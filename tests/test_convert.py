"""Checkpoint import: detectron2 key map, key errors, HF config mapping, the convert command."""

import os
import re

import jax
import numpy as np
import pytest

from support import hf_reference as ref
from minvis_jax import checkpoints
from minvis_jax import convert
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig
from test_backbones import _to_d2_resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  out = _to_d2_resnet({k: v for k, v in state.items()
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


@pytest.fixture(scope='module')
def tiny():
  hf_cfg = ref.hf_config('resnet_tiny')
  model = ref.hf_model(hf_cfg, seed=3)
  model_config = convert.model_config_from_hf(hf_cfg.to_dict())
  return hf_cfg, model, model_config, ref.state_dict_numpy(model)


def _same_tree(a, b):
  fa = jax.tree_util.tree_flatten_with_path(a)[0]
  fb = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_model_config_from_hf(tiny):
  hf_cfg, _, mc, _ = tiny
  assert mc.backbone.name == 'resnet' and tuple(mc.backbone.widths) == (32, 64, 128, 256)
  assert mc.dec_layers == hf_cfg.decoder_layers - 1
  assert (mc.num_queries, mc.num_classes, mc.hidden_dim) == (12, 5, 64)
  assert mc.enc_layers == 2 and mc.dec_ffn_dim == 128 and mc.enc_ffn_dim == 128


def test_detectron2_import_equals_hf_import(tiny):
  _, _, mc, state = tiny
  from_hf = convert.params_from_hf(state, mc)
  from_d2 = convert.params_from_detectron2(to_detectron2(state), mc)
  _same_tree(from_hf, from_d2)


def test_key_errors_name_the_key(tiny):
  _, _, mc, state = tiny
  key = HF_TD + 'decoder.layers.1.fc1.weight'
  missing = dict(state)
  del missing[key]
  with pytest.raises(ValueError, match=re.escape(key)):
    convert.params_from_hf(missing, mc)
  extra = dict(state, **{HF_TD + 'decoder.extra.weight': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match='decoder.extra.weight'):
    convert.params_from_hf(extra, mc)
  bad = dict(state, **{'class_predictor.weight': np.zeros((7, 64), np.float32)})
  with pytest.raises(ValueError, match='class_embed'):
    convert.params_from_hf(bad, mc)


def test_convert_command_writes_a_checkpoint_that_restores(tiny, tmp_path):
  from safetensors.numpy import save_file
  hf_cfg, model, mc, state = tiny
  path = tmp_path / 'model.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
  # A config file for this model, as a user would write one.
  cfg_file = tmp_path / 'cfg.py'
  cfg_file.write_text(
      'import ml_collections\n'
      'from minvis_jax import convert\n'
      f'HF = {hf_cfg.to_dict()!r}\n'
      'def get_config(arg=None):\n'
      '  return ml_collections.ConfigDict(dict(model=convert.model_config_from_hf(HF)))\n')
  out_dir = tmp_path / 'ckpt'
  from minvis_jax import cli
  assert cli.main(['convert', '--source', 'hf', '--input', str(path), '--config', str(cfg_file),
                   '--output', str(out_dir)]) == 0
  restored = checkpoints.load_variables(str(out_dir))
  x = np.random.RandomState(2).randn(1, 64, 96, 3).astype(np.float32)
  ours = Mask2Former(ModelConfig.from_config(mc)).apply(restored, x)
  theirs = ref.hf_forward(model, x)
  assert np.abs(np.asarray(ours['pred_masks']) - theirs['pred_masks']).max() < 1e-4


def test_evaluate_from_a_converted_minvis_checkpoint(tmp_path, capsys):
  """An original-layout (detectron2) MinVIS checkpoint -> convert -> `minvis-jax evaluate`."""
  import json

  import torch

  from minvis_jax import cli
  from minvis_jax.data import synthetic
  hf_cfg = ref.hf_config('resnet_tiny', num_labels=4)
  state = to_detectron2(ref.state_dict_numpy(ref.hf_model(hf_cfg, seed=4)))
  torch.save({'model': {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
              'iteration': 6000}, tmp_path / 'minvis_model_final.pth')
  data_dir = tmp_path / 'data'
  synthetic.generate(str(data_dir), 'valid', 2, 3, height=64, width=96, seed=0)
  cfg_file = tmp_path / 'cfg.py'
  cfg_file.write_text(
      'from minvis_jax import config_lib, convert\n'
      f'HF = {hf_cfg.to_dict()!r}\n'
      'def get_config(arg=None):\n'
      f'  c = config_lib.load_config({os.path.join(REPO, "configs", "tiny.py")!r})\n'
      '  c.model = convert.model_config_from_hf(HF)\n'
      f'  c.data.manual_dir = {str(data_dir)!r}\n'
      '  return c\n')
  ckpt = tmp_path / 'ckpt'
  assert cli.main(['convert', '--source', 'detectron2', '--input',
                   str(tmp_path / 'minvis_model_final.pth'), '--config', str(cfg_file),
                   '--output', str(ckpt)]) == 0
  out = tmp_path / 'eval'
  assert cli.main(['evaluate', '--checkpoint', str(ckpt), '--out', str(out)]) == 0
  metrics = json.loads((out / 'metrics.json').read_text())
  assert set(metrics) >= {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10'}
  results = json.loads((out / 'results.json').read_text())
  assert len(results) == 2 * 10 and all(len(r['segmentations']) == 3 for r in results)
  assert 'AP50' in capsys.readouterr().out


def test_unreadable_checkpoint_files_name_the_file(tmp_path):
  import pickle

  import torch
  from safetensors.numpy import save_file
  state = {'a.weight': np.arange(4096, dtype=np.float32).reshape(64, 64),
           'b.bias': np.ones(3, np.float32)}
  good = {}
  save_file(state, str(tmp_path / 'good.safetensors'))
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / 'good.pth')
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / 'good.bin')
  with open(tmp_path / 'good.pkl', 'wb') as f:
    pickle.dump({'model': state, '__author__': 'test'}, f)
  for name in ('good.safetensors', 'good.pth', 'good.bin', 'good.pkl'):
    good[name] = convert.read_state_dict(str(tmp_path / name))
    assert set(good[name]) == set(state)
    np.testing.assert_array_equal(good[name]['a.weight'], state['a.weight'])
  cases = {}
  for name in good:   # truncated to half
    data = (tmp_path / name).read_bytes()
    cases['truncated_' + name] = data[:len(data) // 2]
  cases['empty.safetensors'] = b''
  cases['empty.pth'] = b''
  cases['text.safetensors'] = b'{"not": "a checkpoint"}'
  cases['text.pth'] = b'hello, this is not a torch file\n'
  cases['text.pkl'] = b'hello, this is not a pickle\n'
  cases['list.pkl'] = pickle.dumps([1, 2, 3])
  cases['strings.pkl'] = pickle.dumps({'model': {'a.weight': 'oops'}})
  for name, data in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ': ') as info:
      convert.read_state_dict(str(path))
    assert len(str(info.value)) < 400 and '\n' not in str(info.value), str(info.value)
  with pytest.raises(ValueError, match=r"strings.pkl: entry 'a.weight' is not a numeric array"):
    convert.read_state_dict(str(tmp_path / 'strings.pkl'))
