"""Every experiment config parses, carries the original recipe, and builds its model; bad config
arguments and values fail naming the config and the key."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from minvis_jax import config_lib
from minvis_jax.configs import common
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig

ROOT = os.path.join(os.path.dirname(__file__), '..', 'configs')
ZOO_ROWS = [(d, b, f) for (d, b) in [('ytvis_2019', 'r50'), ('ytvis_2021', 'r50'), ('ovis', 'r50')]
            for f in ('1.0',)] + [(d, 'swin_l', f) for d in ('ytvis_2019', 'ytvis_2021', 'ovis')
                                  for f in ('1.0', '0.1', '0.05', '0.01')]


def _load(name, arg=None):
  return config_lib.load_config(os.path.join(ROOT, name) + (f':{arg}' if arg else ''))


@pytest.mark.parametrize('dataset,backbone,fraction', ZOO_ROWS)
def test_zoo_row(dataset, backbone, fraction):
  c = _load('minvis.py', f'dataset={dataset},backbone={backbone},fraction={fraction}')
  classes, steps, decay = {'ytvis_2019': (40, 6000, 4000), 'ytvis_2021': (40, 8000, 5500),
                           'ovis': (25, 10000, 7000)}[dataset]
  assert (c.model.num_classes, c.total_steps, tuple(c.optim.decay_steps)) == (classes, steps,
                                                                                 (decay,))
  assert c.model.num_queries == (100 if backbone == 'r50' else 200)
  assert c.data.annotation_fraction == float(fraction)
  assert c.data.min_size_test == (480 if backbone == 'swin_l' and dataset != 'ytvis_2021' else 360)
  assert (c.optim.lr, c.optim.weight_decay, c.optim.backbone_lr_mult, c.optim.clip_norm) == (
      1e-4, 0.05, 0.1, 0.01)
  assert c.batch_size == 32 and c.init.checkpoint and c.init.reinit_class_head
  # The model builds (abstractly: no memory for Swin-L's weights).
  model = Mask2Former(ModelConfig.from_config(c.model))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  logits = shapes['params']['decoder']['class_embed']['kernel']
  assert logits.shape == (256, classes + 1)


def test_zoo_rejects_unknown_rows_and_arguments():
  with pytest.raises(ValueError, match='no model-zoo row'):
    _load('minvis.py', 'dataset=kitti')
  with pytest.raises(ValueError, match='key=value'):
    _load('minvis.py', 'queries=5')


def test_coco_and_tiny():
  coco = _load('coco.py', 'backbone=swin_l')
  assert coco.model.num_classes == 80 and coco.model.num_queries == 200
  assert coco.model.backbone.embed_dim == 192 and coco.model.backbone.window_size == 12
  tiny = _load('tiny.py')
  assert tiny.data.dataset == 'synthetic' and tiny.model.num_classes == 4
  h, w = tiny.data.canvas
  assert h % 32 == 0 and w % 32 == 0


def test_load_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no_such.py'):
    config_lib.load_config(str(tmp_path / 'no_such.py'))
  bad = tmp_path / 'bad.py'
  bad.write_text('x = 1\n')
  with pytest.raises(ValueError, match='get_config'):
    config_lib.load_config(str(bad))


@pytest.mark.parametrize('text, message', [
    ('def get_config(arg=None)\n  return 1\n', r'cfg.py:1: syntax error in the config'),
    ('def get_config(arg=None):\n  return None\n',
     r'cfg.py: get_config returned NoneType, expected an ml_collections.ConfigDict'),
    ('def get_config(arg=None):\n  return [1]\n', r'cfg.py: get_config returned list'),
    ('import math\n\ndef get_config(arg=None):\n  return math.nope\n',
     r"cfg.py:4: get_config failed: AttributeError: .*'nope'"),
    ('x = 1 / 0\n', r'cfg.py:1: loading failed: ZeroDivisionError'),
    ('get_config = 3\n', r'cfg.py: a config file must define get_config'),
])
def test_a_config_that_does_not_load_is_one_error_naming_the_file(tmp_path, text, message):
  path = tmp_path / 'cfg.py'
  path.write_text(text)
  with pytest.raises(ValueError, match=message) as info:
    config_lib.load_config(str(path))
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('override, message', [
    ('batch_size.x=1', r"config field 'batch_size' is a int, not a group of fields"),
    ('batch_size.x.y=1', r"config has no field 'batch_size.x'"),
    ('model.backbone=(1,1)', r"'model.backbone' is a group of fields; set one of them \(depths,"),
    ('model.=3', r"config has no field 'model.'"),
])
def test_an_override_that_does_not_fit_the_config_structure_names_the_key(override, message):
  with pytest.raises(ValueError, match=r"override '" + re.escape(override) + "': " + message):
    config_lib.apply_overrides(_load('tiny.py'), [override])


def test_config_arguments_are_checked():
  # A config that takes no argument refuses one (it used to be ignored), naming the config.
  with pytest.raises(ValueError, match=r'configs/tiny.py takes no argument, got .batch_size=4'):
    _load('tiny.py', 'batch_size=4')
  with pytest.raises(ValueError, match=r"configs/coco.py: argument 'queries=5'"):
    _load('coco.py', 'queries=5')
  with pytest.raises(ValueError, match=r"configs/coco.py: backbone must be r50 or swin_l"):
    _load('coco.py', 'backbone=r101')
  with pytest.raises(ValueError, match=r"configs/minvis.py: fraction='0.5'"):
    _load('minvis.py', 'fraction=0.5')
  with pytest.raises(ValueError, match=r"configs/minvis.py: fraction='abc'"):
    _load('minvis.py', 'backbone=swin_l,fraction=abc')
  with pytest.raises(ValueError, match=r"configs/minvis.py: no model-zoo row .*'swin_b'"):
    _load('minvis.py', 'backbone=swin_b')
  with pytest.raises(ValueError, match=r"configs/minvis.py: argument 'backbone' given twice"):
    _load('minvis.py', 'backbone=r50,backbone=swin_l')
  with pytest.raises(ValueError, match=r"configs/minvis.py: argument 'dataset'"):
    _load('minvis.py', 'dataset')
  assert _load('minvis.py', 'fraction=1').data.annotation_fraction == 1.0



@pytest.mark.parametrize('backbone,pod', sorted(common.POD_PLANS))
def test_pod_plan_sets_the_mesh_and_memory_settings_and_keeps_the_batch(backbone, pod):
  c = _load('minvis.py', f'backbone={backbone},pod={pod}')
  plain = _load('minvis.py', f'backbone={backbone}')
  settings = common.POD_PLANS[(backbone, pod)]
  topology, chips = common.PODS[pod]
  assert topology.startswith(pod.split('-')[0] + ':')
  assert (c.mesh.data, c.mesh.fsdp, c.model.remat, c.optim.accumulate_steps) == (
      chips, settings['fsdp'], settings['remat'], settings['accumulate_steps'])
  assert c.batch_size == plain.batch_size == 32           # the recipe's global batch
  assert c.batch_size % (chips * c.optim.accumulate_steps) == 0
  # Nothing else changes.
  for key in ('mesh', 'optim', 'model'):
    del c[key], plain[key]
  assert c.to_dict() == plain.to_dict()
  config_lib.validate(_load('minvis.py', f'backbone={backbone},pod={pod}'))


def test_unknown_pod_is_one_line_naming_the_known_ones():
  known = ', '.join(sorted(p for b, p in common.POD_PLANS if b == 'r50'))
  with pytest.raises(ValueError, match=re.escape(
      f"configs/minvis.py: pod='v9-4': no pod plan for backbone='r50'; known: {known}")):
    _load('minvis.py', 'pod=v9-4')
  assert _load('minvis.py', 'pod=').mesh.data == -1       # empty: no pod plan


BAD_OVERRIDES = [
    'data.canvas=(64,)', 'data.canvas=(64,100)', 'data.canvas=(0,64)', 'data.size_divisibility=16',
    'data.min_size_train=()', 'data.max_size_train=0', 'model.num_classes=0',
    'model.num_queries=-1', 'model.enc_heads=5', 'model.num_feature_levels=4',
    'model.dtype="float16"', 'data.workers=0', 'data.annotation_fraction=0.0',
    'data.std=(1.0,0.0,1.0)', 'optim.lr=0.0', 'checkpoint.every_steps=0', 'batch_size=0',
    'data.max_instances=0', 'data.flip=1', 'model.backbone.depths=(1,1)',
    'model.backbone.widths=(32,0,128,256)', 'model.backbone.stem_width=0']
BAD_OVERRIDES += ['inference.online_report_score=1.5', 'inference.online_retire_frames=0']


@pytest.mark.parametrize('override', BAD_OVERRIDES)
def test_overrides_are_validated_naming_the_key(override):
  key = override.partition('=')[0]
  with pytest.raises(ValueError, match=re.escape(key.rpartition('.')[2]) + r"'?=\S"):
    config_lib.apply_overrides(_load('tiny.py'), [override])
  # A batch that the mesh's data axis cannot split names both.
  with pytest.raises(ValueError, match=r'batch_size=8: expected a multiple of mesh.data=3'):
    config_lib.apply_overrides(_load('tiny.py'), ['mesh.data=3'])


def test_validate_checks_loaded_configs_and_accepts_every_experiment(tmp_path):
  for name, arg in ALL_CONFIGS:
    config_lib.validate(_load(name, arg))   # does not raise
  bad = tmp_path / 'bad_canvas.py'
  bad.write_text('from minvis_jax.configs import tiny\n\n\n'
                 'def get_config(arg=None):\n  c = tiny.get_config()\n  c.data.canvas = (100, 64)\n'
                 '  return c\n')
  with pytest.raises(ValueError, match=r'bad_canvas.py: data.canvas=\(100, 64\): expected a pair'):
    config_lib.load_config(str(bad))
  # A type the field cannot take names the override.
  with pytest.raises(ValueError, match=r"override 'batch_size=abc'.*'batch_size'"):
    config_lib.apply_overrides(_load('tiny.py'), ['batch_size=abc'])


def test_a_user_config_elsewhere_imports_common_as_a_package_module(tmp_path):
  """A config file in another folder composes the shipped recipe with `from minvis_jax.configs
  import common`: no sys.path edit, and a `common.py` of its own beside it does not collide."""
  (tmp_path / 'common.py').write_text(
      'raise AssertionError("the user\'s common.py was imported")\n')
  (tmp_path / 'mine.py').write_text(
      'from minvis_jax.configs import common\n\n\n'
      'def get_config(arg=None):\n'
      '  common.parse_arg(arg, "mine.py")\n'
      '  c = common.with_dataset(common.base_config(common.tiny_model()), "synthetic")\n'
      '  c.batch_size = 4\n'
      '  return c\n')
  path_before = list(sys.path)
  c = config_lib.load_config(str(tmp_path / 'mine.py'))
  assert sys.path == path_before
  assert c.batch_size == 4 and c.model.num_queries == 20 and c.data.dataset == 'synthetic'
  assert 'common' not in sys.modules or not sys.modules['common'].__file__.startswith(
      str(tmp_path))


def test_configs_package_is_this_checkouts_folder():
  """In a fresh interpreter, `minvis_jax.configs` is the configs/ folder beside the imported package
  (also when an editable install of another checkout maps the name elsewhere)."""
  repo = os.path.dirname(ROOT)
  out = subprocess.run(
      [sys.executable, '-c', 'from minvis_jax import config_lib; '
       'from minvis_jax.configs import common; print(common.__file__)'],
      cwd=repo, capture_output=True, text=True, timeout=300, check=True).stdout.strip()
  assert os.path.realpath(out) == os.path.realpath(os.path.join(ROOT, 'common.py'))


# --- Every experiment config builds its input pipeline and trains a step, at tiny shapes. ---------

import numpy as np  # noqa: E402

from support import layouts  # noqa: E402
from minvis_jax import train  # noqa: E402
from minvis_jax.data import input_pipeline  # noqa: E402
from minvis_jax.data import synthetic  # noqa: E402

ALL_CONFIGS = [('minvis.py', f'dataset={d},backbone={b},fraction={f}') for d, b, f in ZOO_ROWS]
ALL_CONFIGS += [('coco.py', 'backbone=r50'), ('coco.py', 'backbone=swin_l'), ('tiny.py', None)]


@pytest.fixture(scope='module')
def dataset_roots(tmp_path_factory):
  """A small folder in the standard layout of every dataset the configs name."""
  source = str(tmp_path_factory.mktemp('synthetic'))
  synthetic.generate(source, 'train', 3, 4, layouts.H, layouts.W, seed=2)
  roots = {'synthetic': source}
  for dataset in ('ytvis_2019', 'ytvis_2021', 'ovis'):
    roots[dataset] = str(tmp_path_factory.mktemp(dataset))
    layouts.relayout(source, roots[dataset], dataset, splits=('train',), official_categories=True)
  roots['coco'] = str(tmp_path_factory.mktemp('coco'))
  layouts.coco_root(roots['coco'], all_categories=True)
  return roots


def _shrink(c, manual_dir):
  """The config at tiny shapes: small canvas, batch 2, few points; the recipe otherwise kept."""
  c.data.manual_dir = manual_dir
  c.data.canvas = (64, 64)
  c.data.min_size_train = (32, 48)
  c.data.max_size_train = 64
  c.data.max_instances = 3
  c.batch_size = 2
  c.loss.num_points = 64
  c.mesh.data = 1
  c.init.checkpoint = ''
  return c


@pytest.mark.parametrize('name,arg', ALL_CONFIGS)
def test_config_builds_its_input_pipeline(name, arg, dataset_roots):
  c = _load(name, arg)
  _shrink(c, dataset_roots[c.data.dataset])
  batch = next(input_pipeline.train_iterator(c, start_step=0))
  assert batch['image'].shape == (2, 64, 64, 3) and batch['masks'].shape == (2, 3, 64, 64)
  assert batch['valid'].any()
  assert batch['labels'][batch['valid']].max() < c.model.num_classes


@pytest.mark.slow
@pytest.mark.parametrize('name,arg', [('minvis.py', 'dataset=ovis,backbone=r50'),
                                      ('minvis.py', 'dataset=ytvis_2021,backbone=swin_l')])
def test_config_trains_a_step_at_tiny_shapes(name, arg, dataset_roots):
  c = _shrink(_load(name, arg), dataset_roots[_load(name, arg).data.dataset])
  # The config's widths, queries, classes and recipe, one block per stage and layer: the full-depth
  # step compiles for minutes on 2 cores and adds no code path.
  c.model.backbone.depths = (1,) * len(c.model.backbone.depths)
  c.model.enc_layers = c.model.dec_layers = 1
  trainer = train.Trainer(c, mesh=train.make_mesh(c.mesh, jax.devices()[:1]))
  state = trainer.init_state()
  batch = next(input_pipeline.train_iterator(c, start_step=0))
  new, metrics = trainer.step(state, trainer.global_batch(batch))
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  assert float(metrics['lr']) == pytest.approx(c.optim.lr)


@pytest.mark.parametrize('override', ['model.reid=1', 'model.reid_detach="yes"', 'model.reid_dim=0',
                                      'reid.con_weight=-1.0', 'reid.move_prob=1.5',
                                      'reid.cover_prob=-0.1', 'inference.embedding="slot"',
                                      'model.reid_input="pixels"', 'reid.move_count=0'])
def test_reid_keys_are_validated_naming_the_key(override):
  key = override.partition('=')[0]
  with pytest.raises(ValueError, match=re.escape(key) + r"=\S"):
    config_lib.apply_overrides(_load('tiny.py'), [override])


def test_tpu_pod_launcher_refuses_a_slice_other_than_the_config_pod(tmp_path):
  """launch/tpu_pod.sh with a fake gcloud: a pod plan for a v5e-16 on a v5litepod-8 stops before
  anything is copied; on a v5litepod-16 it copies, installs and trains with that config."""
  bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(
      '#!/usr/bin/env bash\necho "$@" >> ' + str(calls) + '\n'
      'if [ "$4" = describe ]; then echo "$FAKE_TYPE"; fi\n')
  (bin_dir / 'gcloud').chmod(0o755)
  script = os.path.join(ROOT, '..', 'launch', 'tpu_pod.sh')
  run = lambda kind: subprocess.run(  # noqa: E731
      ['bash', script, 'my-tpu', 'zone-a', 'minvis:backbone=r50,pod=v5e-16', 'gs://b/run'],
      env=dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_TYPE=kind),
      capture_output=True, text=True, timeout=60, cwd=os.path.join(ROOT, '..'))
  wrong = run('v5litepod-8')
  assert wrong.returncode == 2
  assert wrong.stderr.strip().endswith('config minvis:backbone=r50,pod=v5e-16 plans for a v5e-16 '
                                       '(v5litepod-16) but my-tpu is a v5litepod-8')
  assert [line.split()[3] for line in calls.read_text().splitlines()] == ['describe']
  calls.unlink()
  right = run('v5litepod-16')
  assert right.returncode == 0, right.stderr
  lines = calls.read_text().splitlines()
  assert [line.split()[3] for line in lines] == ['describe', 'scp', 'ssh', 'ssh']
  assert "--config 'minvis:backbone=r50,pod=v5e-16'" in lines[-1]
