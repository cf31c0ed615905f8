"""`minvis-jax export`: the frame-size buckets, the manifest, and the round trip: the exported
forward and the offline predictor run from it equal the live model (tiny; R50 at a small size)."""

import json
import os
import zipfile

import jax
import numpy as np
import pytest

from support import videos
from support.exported import assert_close_tracks
from support.variables import random_variables
from minvis_jax import cli
from minvis_jax import config_lib
from minvis_jax import export
from minvis_jax import exported
from minvis_jax import model_forward
from minvis_jax import predictor
from minvis_jax.models import ModelConfig


def test_parse_frame_sizes():
  assert export.parse_frame_sizes('720x1280, 480x640') == [(720, 1280), (480, 640)]
  assert export.parse_frame_sizes('') == list(export.DEFAULT_FRAME_SIZES)
  for bad in ('720', '720x', 'x640', '0x640', '720x-1', '720x1280,,'):
    with pytest.raises(ValueError, match='--frame_sizes: expected HEIGHTxWIDTH'):
      export.parse_frame_sizes(bad)


def test_unknown_platform(tiny_checkpoint, tmp_path):
  _, config, variables = tiny_checkpoint
  with pytest.raises(ValueError, match=r"--platforms: expected some of cpu, cuda, rocm, tpu; got "
                     r"\['cpu', 'gpu'\]"):
    export.write(str(tmp_path / 'm.jax'), config, variables, [(64, 96)], ['cpu', 'gpu'])
  assert not os.listdir(tmp_path)


def test_buckets_are_the_padded_test_sizes():
  data = config_lib.load_config('tiny').data   # short side 128, long side <= 224, multiple of 32
  assert (data.min_size_test, data.max_size_test, data.size_divisibility) == (128, 224, 32)
  # 720x1280: 128 x 227.6 is over 224 -> 126 x 224 -> padded 128 x 224. 480x640: 128 x 170.7 ->
  # 128 x 171 -> 128 x 192. 64x96 (2:3): 128 x 192. 1280x720 (portrait): 224 x 128.
  assert export.buckets([(720, 1280), (480, 640), (64, 96), (1280, 720)], data) == [
      (128, 192), (128, 224), (224, 128)]
  data = config_lib.load_config('minvis').data     # 360 / 1333, the MinVIS test size
  assert export.buckets([(720, 1280), (480, 640)], data) == [(384, 480), (384, 640)]


def _assert_round_trip(config, variables, model, frames):
  """The exported forward equals the live one for several batch sizes (a symbolic batch), and the
  offline predictor gives the same tracks from either."""
  inputs = list(predictor.preprocess(frames, config.data))
  for a, b in zip(inputs, predictor.preprocess(frames, model.data)):   # the manifest's settings
    np.testing.assert_array_equal(a, b)
  size = frames[0].shape[:2]
  valid = predictor.valid_size(*size, model.data)
  live = model_forward.from_config(config, variables)(inputs, valid, size)
  ours = model.video_predictor()(predictor.preprocess(frames, model.data), valid, size)
  apply = jax.jit(model_forward.forward(ModelConfig.from_config(config.model)).apply)
  for n in (1, 3):
    batch = np.stack(inputs[:n])
    want, got = apply(variables, batch), model.forward(batch)
    assert set(got) == set(exported.OUTPUTS)
    for key in exported.OUTPUTS:
      assert got[key].shape == want[key].shape and got[key].dtype == np.float32
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert len(live) == config.inference.top_k
  assert_close_tracks(live, ours)


def test_tiny_round_trip(tiny_exported):
  path, config, variables = tiny_exported
  model = exported.load(path)
  assert model.buckets == [(128, 192)]
  _assert_round_trip(config, variables, model, videos.moving_square_frames(5))


def test_manifest_and_modules(tiny_exported):
  path, config, _ = tiny_exported
  with zipfile.ZipFile(path) as archive:
    assert sorted(archive.namelist()) == ['forward_128x192.bin', 'manifest.json', 'weights.npz']
    manifest = json.loads(archive.read('manifest.json'))
  assert manifest['format'] == 'minvis-jax exported model' and manifest['format_version'] == 1
  assert manifest['jax_version'] == jax.__version__
  assert (jax.export.minimum_supported_calling_convention_version
          <= manifest['serialization_version']
          <= jax.export.maximum_supported_calling_convention_version)
  assert manifest['platforms'] == ['cpu', 'cuda', 'tpu']
  assert manifest['input'] == {'min_size_test': 128, 'max_size_test': 224, 'size_divisibility': 32,
                               'mean': list(config.data.mean), 'std': list(config.data.std)}
  assert manifest['category_ids'] == [1, 2, 3, 4]
  assert manifest['category_names'] == ['disc', 'square', 'triangle', 'cross']
  assert (manifest['num_classes'], manifest['num_queries'], manifest['hidden_dim']) == (4, 20, 64)
  assert manifest['inference'] == {
      'window': 'auto', 'top_k': config.inference.top_k,
      'tracker': {'kind': config.inference.tracker, 'momentum': config.inference.memory_momentum,
                  'min_score': config.inference.memory_min_score},
      'online': {'report_score': config.inference.online_report_score,
                 'retire_frames': config.inference.online_retire_frames}}
  module = exported.load(path).modules[(128, 192)]
  assert module.platforms == ('cpu', 'cuda', 'tpu')
  images = module.in_avals[-1]
  assert jax.export.is_symbolic_dim(images.shape[0]) and images.shape[1:] == (128, 192, 3)
  # The weights are the model's variables, in tree order.
  leaves = jax.tree.leaves(tiny_exported[2])
  assert len(module.in_avals) == len(leaves) + 1
  for a, b in zip(exported.load(path).weights, leaves):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_r50_round_trip(tmp_path):
  """configs/minvis.py's R50 model (40 classes, 100 queries) with random weights, at a 64x96 test
  size to keep it short."""
  config = config_lib.load_config('minvis')
  config.data.min_size_test, config.data.max_size_test = 64, 96
  variables = random_variables(config.model, seed=2)
  path = str(tmp_path / 'r50.jax')
  manifest = export.write(path, config, variables, [(48, 72)])
  assert manifest['buckets'] == [[64, 96]] and manifest['num_queries'] == 100
  model = exported.load(path)
  _assert_round_trip(config, variables, model, videos.moving_square_frames(4, 48, 72))


@pytest.mark.slow
def test_export_command_then_infer_exported(tiny_checkpoint, tmp_path, capsys):
  """`minvis-jax export` then `infer --exported`: the results file of `infer --checkpoint`."""
  ckpt, _, _ = tiny_checkpoint
  folder = videos.write_folder(tmp_path / 'frames', videos.moving_square_frames(4))
  artifact = str(tmp_path / 'model.jax')
  assert cli.main(['export', '--checkpoint', ckpt, '--out', artifact, '--frame_sizes',
                   '64x96,720x1280', '--platforms', 'cpu']) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith(f'wrote {artifact}: ') and 'input sizes 128x192, 128x224 on cpu' in line
  assert not os.path.exists(artifact + '.tmp')
  for flag, source in (('--checkpoint', ckpt), ('--exported', artifact)):
    assert cli.main(['infer', flag, source, '--video', folder, '--out', str(tmp_path / flag),
                     '--top_k', '3']) == 0
  live, ours = (json.load(open(tmp_path / flag / 'results.json'))
                for flag in ('--checkpoint', '--exported'))
  assert len(live) == 3
  assert_close_tracks(live, ours)
  assert f'(from {artifact})' in capsys.readouterr().out
