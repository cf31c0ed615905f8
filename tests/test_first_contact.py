"""A new user's path: an HF checkpoint folder and an mp4 -> `convert` -> `infer`, from anywhere.

Covers config names resolved from any directory, the HF config.json as the model config, one-line
user errors with exit status 2, the overlay at the source frame rate, the progress bar, and (slow)
the same from a wheel installed outside the checkout.
"""

import configparser
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import setuptools

from minvis_jax import checkpoints
from minvis_jax import cli
from minvis_jax import config_lib
from minvis_jax import convert
from minvis_jax import video_io
from minvis_jax import visualize
from minvis_jax.data import categories

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny model at the video's own size (64x96): the experiment's 360 short side only costs time.
SMALL = ['--set', 'data.min_size_test=64', '--set', 'data.max_size_test=96', '--window', '3']
needs_mp4 = pytest.mark.skipif(not visualize.mp4_available(), reason='imageio-ffmpeg missing')


def _hf_reference():
  """tests/support/hf_reference (torch and transformers); the test is skipped without them."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from support import hf_reference  # noqa: PLC0415
  return hf_reference


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
  """`save_pretrained` of a tiny random HF Mask2Former whose labels are OVIS's classes."""
  ref = _hf_reference()
  names = categories.table('ovis')[1]
  config = ref.hf_config('resnet_tiny', num_labels=25, id2label=dict(enumerate(names)))
  model = ref.hf_model(config, seed=3)
  path = tmp_path_factory.mktemp('hf') / 'mask2former-tiny-ovis'
  model.save_pretrained(str(path))
  return str(path), config, model


def _frames(n=7, h=64, w=96):
  frames = []
  for t in range(n):
    f = np.random.default_rng(t).integers(0, 40, (h, w, 3), dtype=np.uint8)
    f[10 + 2 * t:34 + 2 * t, 8 + 5 * t:40 + 5 * t] = (220, 60, 30)
    frames.append(f)
  return frames


def _write_video(path, frames, fps):
  with video_io.ffmpeg_without_preexec():   # no fork warning from the test's own writer
    return visualize.write_video(path, frames, fps)


def _overlay_fps_and_frames(path):
  import imageio.v2 as imageio  # noqa: PLC0415
  with video_io.ffmpeg_without_preexec(), imageio.get_reader(path) as reader:
    return reader.get_meta_data()['fps'], len([f for f in reader])


def _one_line_error(capsys, argv, prefix):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and err.startswith(prefix), err
  return err


# --- Configs from anywhere. ---------------------------------------------------------------------

def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ovis = config_lib.load_config('minvis:dataset=ovis')
  assert (ovis.data.dataset, ovis.model.num_classes) == ('ovis', 25)
  assert config_lib.load_config('minvis.py:dataset=ovis').to_dict() == ovis.to_dict()
  assert config_lib.load_config('tiny').data.dataset == 'synthetic'
  # A file path still works, and a local file shadows a shipped name.
  (tmp_path / 'minvis').write_text('def get_config(arg=None):\n  return {"mine": arg}\n')
  assert config_lib.load_config('minvis:x') == {'mine': 'x'}
  assert config_lib.load_config(os.path.join(REPO, 'configs', 'coco.py')).model.num_classes == 80
  for spec in ('configs/minvis.py', 'nosuch', 'common'):
    with pytest.raises(FileNotFoundError, match='no such config file or shipped config; shipped '
                                                'configs: coco, minvis, tiny'):
      config_lib.load_config(spec)


def test_setup_cfg_ships_every_subpackage_and_the_configs():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, 'setup.cfg'))
  listed = cfg['options']['packages'].split()
  found = setuptools.find_packages(REPO, include=['minvis_jax', 'minvis_jax.*'])
  assert sorted(listed) == sorted(found + ['minvis_jax.configs'])
  assert cfg['options']['package_dir'].split() == ['minvis_jax.configs', '=', 'configs']


def test_help_shows_real_examples(capsys):
  assert cli.main(['--help']) == 0
  out = capsys.readouterr().out
  assert 'configs/r50.py' not in out and '--config minvis:dataset=ovis' in out
  for name in config_lib.config_names():
    assert os.path.isfile(os.path.join(config_lib.configs_dir(), name + '.py'))
  with pytest.raises(SystemExit):
    cli.main(['infer', '--help'])
  out = capsys.readouterr().out
  assert 'data.min_size_test' in out and 'inference.window' in out and 'inference.top_k' in out


# --- One-line user errors. -----------------------------------------------------------------------

@pytest.mark.torch
def test_user_errors_are_one_line_with_exit_2(hf_folder, tmp_path, capsys):
  folder, _, _ = hf_folder
  frames = str(tmp_path / 'frames')
  os.makedirs(frames)
  missing = str(tmp_path / 'missing')
  err = _one_line_error(capsys, ['infer', '--checkpoint', missing, '--video', frames, '--out',
                                 str(tmp_path / 'o')], 'minvis-jax infer: error: ')
  assert err.endswith('missing: no such checkpoint directory')
  err = _one_line_error(capsys, ['infer', '--checkpoint', folder, '--video', frames, '--out',
                                 str(tmp_path / 'o')], 'minvis-jax infer: error: ')
  assert 'an HF model folder' in err and f'minvis-jax convert --source hf --input {folder}' in err
  weights = os.path.join(folder, 'model.safetensors')
  err = _one_line_error(capsys, ['evaluate', '--checkpoint', weights],
                        'minvis-jax evaluate: error: ')
  assert f'{weights}: a .safetensors weights file, not a minvis-jax checkpoint' in err
  err = _one_line_error(capsys, ['convert', '--source', 'hf', '--input', missing, '--out',
                                 str(tmp_path / 'c')], 'minvis-jax convert: error: ')
  assert err.endswith('missing: no such checkpoint file or folder')
  err = _one_line_error(capsys, ['convert', '--source', 'detectron2', '--input', weights,
                                 '--out', str(tmp_path / 'c')], 'minvis-jax convert: error: ')
  assert 'carries no model config; pass --config' in err
  # A config that does not describe the checkpoint's model (the HF-converted one has 12 queries).
  ckpt = str(tmp_path / 'ckpt')
  assert cli.main(['convert', '--source', 'hf', '--input', folder, '--out', ckpt]) == 0
  capsys.readouterr()
  err = _one_line_error(capsys, ['infer', '--checkpoint', ckpt, '--config', 'minvis:dataset=ovis',
                                 '--video', frames, '--out', str(tmp_path / 'o')],
                        'minvis-jax infer: error: ')
  assert err.endswith(f'the checkpoint has 12 queries ({ckpt}/config.json); --config '
                      'minvis:dataset=ovis has model.num_queries=100')
  err = _one_line_error(capsys, ['train', '--config', 'nosuch', '--workdir', str(tmp_path / 't')],
                        'minvis-jax train: error: ')
  assert 'nosuch: no such config file or shipped config' in err
  # --debug: the exception itself, with its traceback.
  with pytest.raises(FileNotFoundError, match='no such checkpoint directory'):
    cli.main(['infer', '--debug', '--checkpoint', missing, '--video', frames, '--out', missing])


# --- convert takes the model from the HF config.json. ---------------------------------------------

@pytest.mark.torch
def test_convert_hf_folder_without_a_config(hf_folder, tmp_path, capsys):
  folder, hf_cfg, model = hf_folder
  ckpt = str(tmp_path / 'ckpt')
  assert cli.main(['convert', '--source', 'hf', '--input', folder, '--out', ckpt]) == 0
  assert 'ovis experiment, 25 classes' in capsys.readouterr().out
  config, variables = checkpoints.load_for_inference(ckpt)
  assert json.loads(config.model.to_json()) == json.loads(
      convert.model_config_from_hf(hf_cfg.to_dict()).to_json())
  # The labels are OVIS's, so the experiment is OVIS's: its ids and names, the MinVIS recipe.
  assert (config.data.dataset, config.model.num_classes) == ('ovis', 25)
  assert tuple(config.data.category_names) == categories.table('ovis')[1]
  assert (config.data.min_size_test, config.inference.window, config.inference.top_k) == (
      360, 'auto', 10)
  expected = _flat(convert.params_from_hf(_hf_reference().state_dict_numpy(model), config.model))
  restored = _flat(variables)
  assert sorted(restored) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(restored[key], value, err_msg=key)
  # --config now only picks the experiment; a class-count or architecture mismatch is one line.
  err = _one_line_error(capsys, ['convert', '--source', 'hf', '--input', folder, '--out',
                                 str(tmp_path / 'x'), '--config', 'minvis'],
                        'minvis-jax convert: error: ')
  assert err.endswith('the checkpoint has 25 classes '
                      f'({folder}/config.json); --config minvis has model.num_classes=40')
  err = _one_line_error(capsys, ['convert', '--source', 'hf', '--input', folder, '--out',
                                 str(tmp_path / 'x'), '--config', 'minvis:dataset=ovis'],
                        'minvis-jax convert: error: ')
  assert 'the checkpoint has 12 queries' in err and 'model.num_queries=100' in err
  # A sharded save (model.safetensors.index.json + shards) reads as the same state dict.
  sharded = tmp_path / 'sharded'
  model.save_pretrained(str(sharded), max_shard_size='1MB')
  capsys.readouterr()   # transformers' progress bar
  assert (sharded / 'model.safetensors.index.json').exists()
  weights, beside = convert.hf_files(str(sharded))
  assert weights.endswith('model.safetensors.index.json') and beside == str(sharded / 'config.json')
  whole = convert.read_state_dict(os.path.join(folder, 'model.safetensors'))
  parts = convert.read_weights(weights)
  assert sorted(parts) == sorted(whole)
  for key, value in whole.items():
    np.testing.assert_array_equal(parts[key], value, err_msg=key)
  # A weights file without config.json beside it, with --hf_config.
  alone = tmp_path / 'alone.safetensors'
  shutil.copy(os.path.join(folder, 'model.safetensors'), alone)
  assert cli.main(['convert', '--source', 'hf', '--input', str(alone), '--hf_config',
                   os.path.join(folder, 'config.json'), '--out', str(tmp_path / 'c2')]) == 0
  # A detectron2-style check without any HF config: the class head's rows against --config.
  err = _one_line_error(capsys, ['convert', '--source', 'hf', '--input', str(alone), '--out',
                                 str(tmp_path / 'x'), '--config', 'tiny'],
                        'minvis-jax convert: error: ')
  assert 'the checkpoint has 25 classes (its class head has 26 outputs); --config tiny has ' \
         'model.num_classes=4' in err


def _flat(tree) -> dict:
  return {'/'.join(str(p.key) for p in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- infer: frame rate, progress, names, no warnings. --------------------------------------------

def test_frame_count_and_rate_from_the_container(tmp_path):
  if visualize.mp4_available():
    path = _write_video(str(tmp_path / 'a.mp4'), _frames(7), fps=12.5)
    video = video_io.open_video(path)
    assert (video.num_frames, video.fps) == (7, 12.5)
    assert len(list(video.frames)) == 7
  gif = _write_video(str(tmp_path / 'a.gif'), _frames(3), fps=20)
  video = video_io.open_video(gif)
  assert (video.num_frames, video.fps) == (3, 20.0)


@needs_mp4
def test_bad_video_error_is_ffmpegs_reason_not_its_banner(tmp_path):
  (tmp_path / 'notes.mp4').write_text('not a video')
  with pytest.raises(ValueError) as e:
    video_io.open_video(str(tmp_path / 'notes.mp4'))
  assert 'notes.mp4: not a readable video (ffmpeg: ' in str(e.value)
  assert '\n' not in str(e.value) and 'configuration:' not in str(e.value)


@needs_mp4
@pytest.mark.torch
def test_infer_overlay_at_source_fps_with_progress_and_no_warnings(hf_folder, tmp_path, capsys):
  folder, _, _ = hf_folder
  ckpt = str(tmp_path / 'ckpt')
  assert cli.main(['convert', '--source', 'hf', '--input', folder, '--out', ckpt]) == 0
  # A window is --window frames on each local device (8 fake CPU devices in the tests): one frame
  # each, so the bar moves by n frames, over three windows.
  n = jax.local_device_count()
  t = 2 * n + 1
  small = SMALL[:-1] + ['1']
  video = _write_video(str(tmp_path / 'clip.mp4'), _frames(t), fps=25)
  out = tmp_path / 'out'
  capsys.readouterr()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    assert cli.main(['infer', '--checkpoint', ckpt, '--video', video, '--out', str(out),
                     '--top_k', '4'] + small) == 0
  assert not [w for w in caught if 'fork' in str(w.message)], [str(w.message) for w in caught]
  printed = capsys.readouterr()
  # The progress bar: a total from the container, 'compiling' first, then processed frames.
  bar = printed.err.replace('\r', '\n')
  assert all(f'{k}/{t}' in bar for k in (0, n, 2 * n, t)) and 'compiling' in bar
  assert bar.index('compiling') < bar.index(f'{n}/{t}')
  assert 'os.fork' not in printed.err and 'Traceback' not in printed.err
  # The summary says what the config fixed.
  assert (f'clip.mp4: {t} frames of 64x96 at 25 fps, run at 64x96 (data.min_size_test=64, '
          f'max_size_test=96), window 1 frame per device x {n} devices, top 4') in printed.out
  assert _overlay_fps_and_frames(str(out / 'overlay.mp4')) == (25.0, t)
  results = json.loads((out / 'results.json').read_text())
  ovis_ids, ovis_names = categories.table('ovis')
  assert len(results) == 4 and {r['category_id'] for r in results} <= set(ovis_ids)
  assert all(len(r['segmentations']) == t for r in results)
  names = dict(zip(ovis_ids, ovis_names))
  for r in results:   # the printed class names are the OVIS names of the results' ids
    assert f'{names[r["category_id"]]:>16}  score {r["score"]:.3f}' in printed.out
  # --fps overrides the source's rate.
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', video, '--out', str(tmp_path / 'o2'),
                   '--fps', '5'] + small) == 0
  assert _overlay_fps_and_frames(str(tmp_path / 'o2' / 'overlay.mp4')) == (5.0, t)


# --- Acceptance: a wheel installed outside the checkout. -----------------------------------------

def _run(cmd, cwd, env, timeout=600):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f'{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
  return proc


@pytest.mark.slow
@needs_mp4
@pytest.mark.torch
def test_wheel_install_converts_and_infers_from_an_empty_directory(hf_folder, tmp_path):
  folder, _, _ = hf_folder
  # Build from a copy: a wheel build writes build/ and *.egg-info next to the sources.
  src = tmp_path / 'src'
  for name in ('minvis_jax', 'configs'):
    shutil.copytree(os.path.join(REPO, name), src / name,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), src / name)
  # Offline when the build backend is already here (it is in CI's venv after `pip install -e`).
  offline = all(importlib.util.find_spec(m) for m in ('setuptools', 'wheel'))
  _run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', '-q', '-w',
        str(tmp_path / 'dist')] + (['--no-build-isolation'] if offline else []), tmp_path,
       dict(os.environ))
  wheel, = glob.glob(str(tmp_path / 'dist' / 'minvis_jax-*.whl'))
  # Installed on its own (its dependencies are this environment's), outside the checkout.
  site = tmp_path / 'site'
  _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), wheel],
       tmp_path, dict(os.environ))
  env = dict(os.environ, PYTHONPATH=str(site))
  empty = tmp_path / 'empty'
  empty.mkdir()
  script = str(site / 'bin' / 'minvis-jax')
  where = _run([sys.executable, '-c', 'import minvis_jax, minvis_jax.config_lib as c; '
                'print(minvis_jax.__file__); print(c.configs_dir()); '
                'x = c.load_config("minvis:dataset=ovis"); '
                'print(x.data.dataset, x.model.num_classes, x.data.category_names[-1])'],
               empty, env).stdout.split('\n')
  assert where[0].startswith(str(site)) and where[1].startswith(str(site)), where
  assert where[2] == 'ovis 25 Vehical'
  video = _write_video(str(empty / 'clip.mp4'), _frames(5), fps=25)
  conv = _run([sys.executable, script, 'convert', '--source', 'hf', '--input', folder,
               '--out', 'ckpt'], empty, env)
  assert 'ovis experiment, 25 classes' in conv.stdout
  inf = _run([sys.executable, script, 'infer', '--checkpoint', 'ckpt', '--video',
              os.path.basename(video), '--out', 'out'] + SMALL, empty, env)
  assert 'RuntimeWarning' not in inf.stderr and 'Traceback' not in inf.stderr, inf.stderr
  assert 'clip.mp4: 5 frames of 64x96 at 25 fps' in inf.stdout
  results = json.loads((empty / 'out' / 'results.json').read_text())
  assert len(results) == 10 and all(len(r['segmentations']) == 5 for r in results)
  assert (empty / 'out' / 'overlay.mp4').stat().st_size > 1000
  assert sorted(os.listdir(empty)) == ['ckpt', 'clip.mp4', 'out']
