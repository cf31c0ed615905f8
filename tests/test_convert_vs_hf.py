"""Checkpoint import against HF transformers and torch: the HF and detectron2 key maps, key errors,
the HF config mapping, the convert command end to end, torch checkpoint files."""

import json
import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

from safetensors.numpy import save_file  # noqa: E402

from support import hf_reference as ref  # noqa: E402
from support.detectron2_layout import HF_TD, to_detectron2  # noqa: E402
from minvis_jax import checkpoints  # noqa: E402
from minvis_jax import cli  # noqa: E402
from minvis_jax import convert  # noqa: E402
from minvis_jax.data import synthetic  # noqa: E402
from minvis_jax.models import Mask2Former  # noqa: E402
from minvis_jax.models import ModelConfig  # noqa: E402

pytestmark = pytest.mark.torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  assert cli.main(['convert', '--source', 'hf', '--input', str(path), '--config', str(cfg_file),
                   '--out', str(out_dir)]) == 0
  restored = checkpoints.load_variables(str(out_dir))
  x = np.random.RandomState(2).randn(1, 64, 96, 3).astype(np.float32)
  ours = Mask2Former(ModelConfig.from_config(mc)).apply(restored, x)
  theirs = ref.hf_forward(model, x)
  assert np.abs(np.asarray(ours['pred_masks']) - theirs['pred_masks']).max() < 1e-4


def _minvis_checkpoint(tmp_path):
  """(an original-layout (detectron2) MinVIS .pth of a tiny R50-style model with 4 classes, a
  config file for it whose data.manual_dir holds 2 synthetic valid videos)."""
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
  return str(tmp_path / 'minvis_model_final.pth'), str(cfg_file)


def test_evaluate_from_a_converted_minvis_checkpoint(tmp_path, capsys):
  """An original-layout (detectron2) MinVIS checkpoint -> convert -> `minvis-jax evaluate`."""
  pth, cfg_file = _minvis_checkpoint(tmp_path)
  ckpt = tmp_path / 'ckpt'
  assert cli.main(['convert', '--source', 'detectron2', '--input', pth, '--config', cfg_file,
                   '--out', str(ckpt)]) == 0
  out = tmp_path / 'eval'
  assert cli.main(['evaluate', '--checkpoint', str(ckpt), '--out', str(out)]) == 0
  metrics = json.loads((out / 'metrics.json').read_text())
  assert set(metrics) >= {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10'}
  results = json.loads((out / 'results.json').read_text())
  assert len(results) == 2 * 10 and all(len(r['segmentations']) == 3 for r in results)
  assert 'AP50' in capsys.readouterr().out


def test_convert_into_a_bucket_then_evaluate_from_it_like_the_local_conversion(
    tmp_path, gcs_bucket, gcs_emulator):
  """`minvis-jax convert --out gs://...` (the storage emulator), then `evaluate --checkpoint` from
  the bucket with its outputs there too: the same variables, config, results and metrics as the
  local conversion and evaluation."""
  from minvis_jax import paths  # noqa: PLC0415
  from support import gcs_emulator as emulator  # noqa: PLC0415
  pth, cfg_file = _minvis_checkpoint(tmp_path)
  local, url = str(tmp_path / 'ckpt'), f'{gcs_bucket}/models/minvis'
  for out in (local, url):
    assert cli.main(['convert', '--source', 'detectron2', '--input', pth, '--config', cfg_file,
                     '--out', out]) == 0
  objects = emulator.list_objects(gcs_emulator, paths.bucket(url))
  assert 'models/minvis/config.json' in objects, objects
  assert not any(paths.WRITE_PROBE in o for o in objects), objects   # the probe was deleted
  assert not os.path.exists('gs:')
  config_url, variables_url = checkpoints.load_for_inference(url)
  config_local, variables_local = checkpoints.load_for_inference(local)
  assert config_url.to_json() == config_local.to_json()
  _same_tree(variables_url, variables_local)
  evals = {}
  for ckpt, out in ((local, str(tmp_path / 'eval')), (url, f'{gcs_bucket}/eval')):
    assert cli.main(['evaluate', '--checkpoint', ckpt, '--out', out]) == 0
    evals[ckpt] = [json.loads(paths.open(paths.join(out, name)).read())
                   for name in ('results.json', 'metrics.json')]
  assert evals[url] == evals[local]
  assert len(evals[url][0]) == 2 * 10


def test_unreadable_torch_checkpoint_files_name_the_file(tmp_path):
  state = {'a.weight': np.arange(4096, dtype=np.float32).reshape(64, 64),
           'b.bias': np.ones(3, np.float32)}
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / 'good.pth')
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / 'good.bin')
  cases = {}
  for name in ('good.pth', 'good.bin'):
    good = convert.read_state_dict(str(tmp_path / name))
    assert set(good) == set(state)
    np.testing.assert_array_equal(good['a.weight'], state['a.weight'])
    data = (tmp_path / name).read_bytes()
    cases['truncated_' + name] = data[:len(data) // 2]
  cases['empty.pth'] = b''
  cases['text.pth'] = b'hello, this is not a torch file\n'
  for name, data in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ': ') as info:
      convert.read_state_dict(str(path))
    assert len(str(info.value)) < 400 and '\n' not in str(info.value), str(info.value)
