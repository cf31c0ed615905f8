"""Running an exported model: without the Flax model code (a process that cannot import it), and
one-line errors for a file that is not an artifact, one this jax cannot run, or a frame size it
has no module for."""

import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from support import videos
from support.exported import assert_close_tracks
from minvis_jax import cli
from minvis_jax import exported
from minvis_jax import model_forward
from minvis_jax import predictor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: every module of the model code, the configs, orbax and flax raise
# ImportError; then `infer --exported`'s library path runs the artifact on a frame folder.
_CHILD = r'''
import importlib.abc, json, sys
BLOCKED = ('flax', 'orbax', 'minvis_jax.models', 'minvis_jax.model_forward', 'minvis_jax.export',
           'minvis_jax.checkpoints', 'minvis_jax.config_lib', 'minvis_jax.configs',
           'minvis_jax.train', 'minvis_jax.cli')

def blocked(name):
  return any(name == b or name.startswith(b + '.') for b in BLOCKED)

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if blocked(name):
      raise ImportError(f'blocked: {name}')

sys.meta_path.insert(0, Block())
for name in ('flax', 'minvis_jax.models'):
  try:
    __import__(name)
    sys.exit(f'{name} was not blocked')
  except ImportError:
    pass
from minvis_jax import exported, infer
artifact, video, out = sys.argv[1:]
infer.run_exported(exported.load(artifact), video, out, 0.3, None, None, None)
print(json.dumps(sorted(m for m in sys.modules if blocked(m))))
'''


def test_runs_without_the_model_code(tiny_exported, tmp_path):
  path, config, variables = tiny_exported
  frames = videos.moving_square_frames(5)
  folder = videos.write_folder(tmp_path / 'frames', frames)
  out = tmp_path / 'out'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _CHILD, path, folder, str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []    # none of them was imported
  ours = json.load(open(out / 'results.json'))
  # The live model on the same frames (this process, model code imported).
  inputs = list(predictor.preprocess(frames, config.data))
  live = model_forward.from_config(config, variables)(
      inputs, predictor.valid_size(64, 96, config.data), (64, 96))
  assert len(ours) == config.inference.top_k
  assert_close_tracks(predictor.results_for_video(live, 1, [1, 2, 3, 4]), ours)
  assert os.path.getsize(out / 'overlay.mp4') > 0


def _rewrite(src: str, dst: str, edit) -> str:
  """A copy of artifact `src` at `dst` with its manifest changed by `edit(manifest)`."""
  with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, 'w') as b:
    for name in a.namelist():
      data = a.read(name)
      if name == 'manifest.json':
        manifest = json.loads(data)
        edit(manifest)
        data = json.dumps(manifest)
      b.writestr(name, data)
  return dst


def test_not_an_artifact(tmp_path, tiny_exported):
  text = tmp_path / 'notes.txt'
  text.write_text('hello')
  with pytest.raises(ValueError, match=f'^{text}: not a minvis-jax exported model .*not a zip'):
    exported.load(str(text))
  other = str(tmp_path / 'other.zip')
  with zipfile.ZipFile(other, 'w') as z:
    z.writestr('data.txt', 'x')
  with pytest.raises(ValueError, match=f'^{other}: not a minvis-jax exported model .*no manifest'):
    exported.load(other)
  wrong = _rewrite(tiny_exported[0], str(tmp_path / 'w.jax'), lambda m: m.update(format='other'))
  with pytest.raises(ValueError, match='no "format": "minvis-jax exported model"'):
    exported.load(wrong)
  missing = str(tmp_path / 'missing.jax')
  with zipfile.ZipFile(tiny_exported[0]) as a, zipfile.ZipFile(missing, 'w') as b:
    b.writestr('manifest.json', a.read('manifest.json'))
  with pytest.raises(ValueError, match=f'^{missing}: not a minvis-jax .*forward_128x192.bin'):
    exported.load(missing)
  truncated = tmp_path / 'truncated.jax'
  truncated.write_bytes(open(tiny_exported[0], 'rb').read()[:100_000])   # an interrupted copy
  with pytest.raises(ValueError, match=f'^{truncated}: not a minvis-jax .*not a zip archive'):
    exported.load(str(truncated))
  for member, message in (('forward_128x192.bin', 'forward_128x192.bin: jax .* cannot read this '
                           'module, exported by jax .* with serialization version'),
                          ('weights.npz', 'weights.npz is unreadable')):
    broken = str(tmp_path / f'broken_{member}.jax')
    with zipfile.ZipFile(tiny_exported[0]) as a, zipfile.ZipFile(broken, 'w') as b:
      for name in a.namelist():
        b.writestr(name, b'garbage' if name == member else a.read(name))
    with pytest.raises(ValueError, match=f'^{broken}: {message}') as e:
      exported.load(broken)
    assert '\n' not in str(e.value)


def test_infer_exported_with_a_bad_file_is_one_line(tmp_path, capsys):
  bad = tmp_path / 'model.jax'
  bad.write_bytes(b'\x00' * 100)
  assert cli.main(['infer', '--exported', str(bad), '--video', str(tmp_path), '--out',
                   str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'{bad}: not a minvis-jax exported model' in err
  for argv, message in (([], 'pass either --checkpoint DIR or --exported MODEL.jax'),
                        (['--exported', str(bad), '--checkpoint', 'c'], 'pass either'),
                        (['--exported', str(bad), '--set', 'inference.top_k=2'],
                         '--config/--set do not apply')):
    assert cli.main(['infer', *argv, '--video', 'v', '--out', 'o']) == 2
    assert message in capsys.readouterr().err


def test_versions_this_jax_cannot_run(tmp_path, tiny_exported):
  lo = jax.export.minimum_supported_calling_convention_version
  hi = jax.export.maximum_supported_calling_convention_version
  future = _rewrite(tiny_exported[0], str(tmp_path / 'future.jax'),
                    lambda m: m.update(jax_version='99.0.0', serialization_version=hi + 1))
  with pytest.raises(ValueError) as e:
    exported.load(future)
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'{future}: exported by jax 99.0.0 with '
                                                    f'serialization version {hi + 1}; ')
  assert f'this jax {jax.__version__} runs serialization versions {lo} to {hi}' in message
  newer = _rewrite(tiny_exported[0], str(tmp_path / 'newer.jax'),
                   lambda m: m.update(format_version=2))
  with pytest.raises(ValueError, match='format version 2 of a newer minvis-jax; this one reads '
                     'versions up to 1'):
    exported.load(newer)
  tpu = _rewrite(tiny_exported[0], str(tmp_path / 'tpu.jax'), lambda m: m.update(platforms=['tpu']))
  with pytest.raises(ValueError, match='exported for tpu, not for this cpu device'):
    exported.load(tpu)


def test_a_frame_size_without_a_module(tiny_exported, tmp_path, capsys):
  model = exported.load(tiny_exported[0])
  model.check_frame_size(64, 96, 'clip.mp4')       # runs at 128x192: the one module
  model.check_frame_size(128, 192, 'clip.mp4')
  with pytest.raises(ValueError, match=r'^clip.mp4: frames of 72x72 run at 128x128, which .* has '
                     r'no module for \(it holds 128x192\); export again with --frame_sizes 72x72'):
    model.check_frame_size(72, 72, 'clip.mp4')
  with pytest.raises(ValueError, match='no module for input size 128x128'):
    model.forward(np.zeros((1, 128, 128, 3), np.float32))
  folder = videos.write_folder(tmp_path / 'square', videos.moving_square_frames(2, 72, 72))
  assert cli.main(['infer', '--exported', tiny_exported[0], '--video', folder, '--out',
                   str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'error: {folder}: frames of 72x72 run at 128x128' in err
