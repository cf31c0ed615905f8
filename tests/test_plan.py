"""`minvis-jax plan`: the HLO and memory readers on fixed inputs (fast), and the real thing in CI
(slow): the `tpu` extra's libtpu installed from the package registry into a temporary folder,
the tiny config planned for v5e 2x2 in a subprocess, its figures checked against the compiler's
own."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from minvis_jax import chips
from minvis_jax import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny model, cut further so that the v5e compile takes about a minute.
TINY = ['data.canvas=(64,96)', 'data.min_size_train=(64,)', 'data.max_size_train=96',
        'data.max_instances=4', 'loss.num_points=256', 'model.enc_layers=1', 'model.dec_layers=1',
        'model.num_queries=8', 'batch_size=8']

HLO = '''
  %all-reduce.5 = f32[]{:T(128)} all-reduce(%x), channel_id=10, to_apply=%add
  %all-reduce.245 = (f32[8,16]{1,0:T(8,128)S(1)}, /*index=1*/bf16[3,3,8,8]{3,2,1,0}) all-reduce(%a)
  %all-gather-start.1 = (f32[4,16]{1,0}, f32[16,16]{1,0}) all-gather-start(%p), dimensions={0}
  %all-gather-done.1 = f32[16,16]{1,0} all-gather-done(%all-gather-start.1)
  ROOT %reduce-scatter.2 = f32[4,16]{1,0} reduce-scatter(%g), dimensions={0}
  %fusion.3 = f32[8]{0} fusion(%all-reduce.5), kind=kLoop
'''


def test_shape_bytes_counts_every_array_of_a_tuple():
  assert plan.shape_bytes('(f32[8,16]{1,0}, bf16[4]{0})') == 8 * 16 * 4 + 4 * 2
  assert plan.shape_bytes('pred[]') == 1
  assert plan.shape_bytes('u8[2,3]{1,0:T(8,128)}') == 6


def test_collectives_by_kind_count_and_bytes():
  found = plan.collectives(HLO)
  assert found == {
      'all-reduce': {'count': 2, 'bytes': 4 + 8 * 16 * 4 + 3 * 3 * 8 * 8 * 2},
      'all-gather': {'count': 1, 'bytes': 16 * 16 * 4},       # the -start's output, not its operand
      'reduce-scatter': {'count': 1, 'bytes': 4 * 16 * 4}}


def test_out_of_memory_reads_the_compilers_figures():
  error = RuntimeError('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in '
                       'memory space hbm. Used 27.71G of 15.75G hbm. Exceeded hbm capacity by '
                       '11.96G.')
  oom = plan.out_of_memory(error)
  assert oom['required'] == int(27.71 * 2 ** 30) and oom['available'] == int(15.75 * 2 ** 30)
  other = RuntimeError('RESOURCE_EXHAUSTED: HLO temporaries (27.71G) exceeds available HBM '
                       '(15.75G)')
  assert plan.out_of_memory(other)['required'] == int(27.71 * 2 ** 30)
  assert plan.out_of_memory(ValueError('shapes do not match')) is None


def test_roofline_is_the_slowest_of_compute_hbm_and_ici():
  v5e = chips.CHIPS['v5e']
  bound = chips.roofline(v5e, flops=197e12, hbm_bytes=2 * 819e9, collective_bytes=0.0)
  assert bound['compute_s'] == pytest.approx(1.0) and bound['hbm_s'] == pytest.approx(2.0)
  assert bound['step_s'] == pytest.approx(2.0) and bound['limited_by'] == 'hbm'
  with pytest.raises(ValueError, match="unknown chip 'v9'"):
    chips.chip_of('v9:2x2')


def test_without_libtpu_the_command_says_what_to_install():
  if plan.libtpu_installed():
    pytest.skip('libtpu is installed in this environment')
  run = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', 'plan', '--config', 'tiny',
                        '--topology', 'v5e:2x2'], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [
      f'minvis-jax plan: error: {plan.INSTALL_HINT}']


# ---------------------------------------------------------------------------------------------
# Slow: the real TPU compiler.

_UNREACHABLE = ('Failed to establish a new connection', 'Temporary failure in name resolution',
                'Network is unreachable', 'Max retries exceeded', 'Connection refused',
                'timed out')


def _libtpu_requirement() -> str:
  """The libtpu requirement of jax's `tpu` extra, e.g. 'libtpu==0.0.42.*'."""
  for req in importlib.metadata.requires('jax') or ():
    if req.startswith('libtpu') and 'extra == "tpu"' in req:
      return req.split(';')[0].replace(' ', '')
  raise AssertionError('the installed jax declares no libtpu in its tpu extra')


@pytest.fixture(scope='module')
def tpu_site(tmp_path_factory):
  """A folder holding the tpu extra's libtpu, installed with pip from the package registry (a
  skip, naming the registry, only when it cannot be reached)."""
  site = str(tmp_path_factory.mktemp('tpu_site'))
  run = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--target', site,
                        _libtpu_requirement()], capture_output=True, text=True, timeout=1200)
  if run.returncode:
    if any(s in run.stdout + run.stderr for s in _UNREACHABLE):
      pytest.skip('the package registry is unreachable, so the tpu extra cannot be installed: '
                  + run.stderr.strip().splitlines()[-1])
    raise AssertionError(f'pip install of the tpu extra failed:\n{run.stdout}\n{run.stderr}')
  return site


def _tpu_env(site: str) -> dict:
  return dict(os.environ, PYTHONPATH=site, JAX_PLATFORMS='cpu')


@pytest.fixture(scope='module')
def compiled_directly(tpu_site, tmp_path_factory):
  out = tmp_path_factory.mktemp('tpu_programs') / 'programs.json'
  subprocess.run([sys.executable, '-m', 'tests.support.tpu_programs', str(out), *TINY], cwd=REPO,
                 env=_tpu_env(tpu_site), check=True, timeout=1800)
  return json.loads(out.read_text())


@pytest.mark.slow
def test_plan_of_tiny_on_v5e_matches_the_compiled_step(tpu_site, compiled_directly):
  sets = [a for s in TINY for a in ('--set', s)]
  run = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', 'plan', '--config', 'tiny', *sets,
                        '--topology', 'v5e:2x2', '--json', '--no_eval'], cwd=REPO,
                       env=_tpu_env(tpu_site), capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stderr
  # libtpu's start-up noise is hidden: stderr holds only the progress lines.
  assert all(line.startswith(('compiling', '  train step')) for line in
             run.stderr.strip().splitlines()), run.stderr
  report = json.loads(run.stdout)
  assert report['topology'] == 'v5e:2x2' and report['chips'] == 4 and report['mesh'] == {'data': 4}
  assert report['chip'] == {**vars(chips.CHIPS['v5e'])}
  t = report['train']
  assert t['fits'] and t['images_per_chip'] == 2
  direct = compiled_directly['dp']['memory']
  assert t['memory'] == {
      'arguments': direct['argument_size_in_bytes'], 'outputs': direct['output_size_in_bytes'],
      'temporaries': direct['temp_size_in_bytes'], 'aliased': direct['alias_size_in_bytes'],
      'code': direct['generated_code_size_in_bytes'],
      'total': (direct['argument_size_in_bytes'] + direct['output_size_in_bytes']
                - direct['alias_size_in_bytes'] + direct['temp_size_in_bytes']
                + direct['generated_code_size_in_bytes'])}
  assert t['headroom_bytes'] == chips.CHIPS['v5e'].hbm_bytes - t['memory']['total']
  assert t['flops'] > 0 and t['flops_per_image'] == pytest.approx(t['flops'] / 2)
  assert t['hbm_bytes_per_image'] == pytest.approx(t['hbm_bytes'] / 2)
  assert {k: [v['count'], v['bytes']] for k, v in t['collectives'].items()} == (
      compiled_directly['dp']['collectives'])
  r = t['roofline']
  assert r['step_s'] == max(r['compute_s'], r['hbm_s'], r['ici_s'])
  assert r['images_per_s'] == pytest.approx(8 / r['step_s'])
  assert r['compute_s'] == pytest.approx(t['flops'] / 197e12)


@pytest.mark.slow
def test_data_parallel_all_reduces_the_gradient_and_fsdp_gathers_parameters(compiled_directly):
  dp, fsdp = compiled_directly['dp'], compiled_directly['fsdp']
  assert dp['platform'] == 'tpu'
  # Data parallel: all-reduces only, about the parameters' bytes (the gradient, plus the loss
  # terms and counts; 5% more on this config, docs/tpu.md): no activation gathers or permutes.
  assert set(dp['collectives']) == {'all-reduce'}
  count, nbytes = dp['collectives']['all-reduce']
  assert dp['param_bytes'] <= nbytes <= dp['param_bytes'] * 1.1
  # FSDP: parameters all-gathered for the forward (at least their bytes, once per use), and the
  # sharded state takes less argument memory than the replicated one. (XLA:TPU reduces this tiny
  # config's gradients with all-reduces, not reduce-scatters: docs/tpu.md.)
  gathers, gathered = fsdp['collectives']['all-gather']
  assert gathers > 0 and gathered >= 0.5 * fsdp['param_bytes']
  assert fsdp['memory']['argument_size_in_bytes'] < dp['memory']['argument_size_in_bytes']
