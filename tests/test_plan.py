"""`minvis-jax plan`: the HLO and memory readers on fixed inputs (fast), and the real thing in CI
(slow): the `tpu` extra's libtpu installed from the package registry into a temporary folder,
the tiny config planned for v5e 2x2 in a subprocess, its figures checked against the compiler's
own."""

import importlib.metadata
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from minvis_jax import chips
from minvis_jax import config_lib
from minvis_jax import ops
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
  # libtpu takes a host-wide lock file at start-up unless told otherwise: the compile-only use here
  # opens no TPU, and another plan (or test run) on the host must not fail it.
  return dict(os.environ, PYTHONPATH=site, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')


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
                        '--topology', 'v5e:2x2', '--json', '--no_eval', '--top_ops', '5'], cwd=REPO,
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
  # The byte account of the TPU program: its ops named by the model code they come from.
  account = t['bytes_account']
  assert sum(account['by_part'].values()) == account['counted_bytes'] > 0
  assert account['coverage'] == pytest.approx(account['counted_bytes'] / t['hbm_bytes'])
  assert {'backbone', 'deformable sampling', 'pixel decoder'} <= set(account['by_part'])
  top = [op['bytes'] for op in account['top_ops']]
  assert len(top) == 5 and top == sorted(top, reverse=True) and top[-1] > 0


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


# ---------------------------------------------------------------------------------------------
# HBM bytes op by op.

ACCOUNT_HLO = '''HloModule jit_step, is_scheduled=true

FileNames
1 "/src/minvis_jax/train.py"
2 "/src/minvis_jax/models/deform_attn.py"
3 "/src/minvis_jax/criterion.py"

FunctionNames
1 "train_step"
2 "_sample_summed"
3 "match"

FileLocations
1 {file_name_id=1 function_name_id=1 line=150 end_line=150 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=80 end_line=80 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=190 end_line=190 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=2}


%fused_computation (param_0: f32[1024]) -> f32[1024] {
  %param_0 = f32[1024]{0} parameter(0)
  ROOT %neg.1 = f32[1024]{0} negate(%param_0), metadata={op_name="x" stack_frame_id=2}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %gte = f32[256]{0} get-tuple-element(%p), index=1
  %i = s32[] get-tuple-element(%p), index=0
  %cost = f32[256]{0} fusion(%gte), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/jvp(Mask2Former)/mul" stack_frame_id=3}
  ROOT %t = (s32[], f32[256]{0}) tuple(%i, %cost)
}

%cond (p.1: (s32[], f32[256])) -> pred[] {
  %p.1 = (s32[], f32[256]{0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (x: f32[1024], y: bf16[64,32]) -> f32[] {
  %x = f32[1024]{0:T(1024)} parameter(0), metadata={op_name="x"}
  %y = bf16[64,32]{1,0} parameter(1)
  %sample = f32[1024]{0} fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/jvp(Mask2Former)/pixel_decoder/encoder_layer_0/self_attn/mul" stack_frame_id=2}
  %conv = bf16[64,32]{1,0} convolution(%y, %y), dim_labels=b0f_0io->b0f, metadata={op_name="jit(step)/transpose(jvp(Mask2Former))/backbone/res2_0/conv1/conv_general_dilated"}
  %init = (s32[], f32[256]{0}) tuple(%c, %v)
  %loop = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[] reduce(%sample, %zero), dimensions={0}, to_apply=%add
}
'''  # noqa: E501


def test_op_bytes_counts_operands_and_results_of_each_unfused_op():
  ops = {op['name']: op for op in plan.op_bytes(ACCOUNT_HLO)}
  # Fused and applied computations (their instructions run inside the fusion / reduce) and the
  # data-free instructions (parameters, tuples, the loop's shell) are not ops of their own.
  assert set(ops) == {'sample', 'conv', 'cost', 'r'}
  assert ops['sample']['bytes'] == 2 * 1024 * 4 and ops['sample']['count'] == 1
  assert ops['conv']['bytes'] == 3 * 64 * 32 * 2
  # The loop body runs its known trip count.
  assert ops['cost']['count'] == 3 and ops['cost']['bytes'] == 3 * 2 * 256 * 4
  assert ops['r']['bytes'] == 4 + 1024 * 4      # %zero is not defined: counts nothing
  # Named by the innermost project call site of the op's stack frame, else its module path.
  assert (ops['sample']['part'], ops['sample']['source']) == (
      'deformable sampling', 'models/deform_attn.py:80 _sample_summed')
  assert ops['cost']['part'] == 'matcher' and ops['cost']['source'] == 'criterion.py:190 match'
  assert ops['conv']['part'] == 'backbone' and ops['conv']['source'] == ''
  assert [op['name'] for op in plan.op_bytes(ACCOUNT_HLO)] == ['conv', 'sample', 'cost', 'r']
  account = plan.bytes_account(ACCOUNT_HLO, 2, total_hbm_bytes=2 * 30_724)
  assert account['counted_bytes'] == sum(op['bytes'] for op in ops.values()) == 30_724
  assert account['coverage'] == 0.5 and len(account['top_ops']) == 2
  assert account['by_part'] == {'deformable sampling': 8192, 'backbone': 12288, 'matcher': 6144,
                                'other': 4100}


def test_model_part_by_call_site_then_module_path():
  site = lambda f, fn: [('/x/jax/_src/numpy.py', 'where', 1), (f'/r/minvis_jax/{f}', fn, 9)]  # noqa: E731
  assert plan.model_part('', site('criterion.py', 'sample_rows')) == 'point sampling'
  assert plan.model_part('', site('criterion.py', 'matcher_costs')) == 'matcher'
  assert plan.model_part('', site('matching.py', '_wide_col4row')) == 'matcher'
  assert plan.model_part('', site('criterion.py', 'loss_masks')) == 'loss'
  assert plan.model_part('', site('models/transformer_decoder.py',
                                  'TransformerDecoder.__call__.<locals>.predict')) == 'mask head'
  assert plan.model_part('jit(f)/jvp(Mask2Former)/decoder/layer_0/fc1/dot_general',
                         site('models/conv.py', 'Dense.__call__')) == 'transformer decoder'
  assert plan.model_part('jit(f)/transpose(jvp(Mask2Former))/pixel_decoder/output/conv', []) == (
      'pixel decoder')
  assert plan.model_part('jit(f)/add', []) == 'other'


class _Head(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name='fc')(x)


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Head(name='decoder')(x)


def test_op_bytes_of_a_compiled_program_add_up_to_the_compilers_total():
  """A real compile (XLA:CPU here; the same HLO printer as XLA:TPU's): the ops' bytes are the
  compiler's own total, and the project's code is found through the stack frames."""
  model = _Model()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 1024, 3)))

  def loss(variables, image, size):
    x = ops.normalize(image, size, (1.0, 2.0, 3.0), (1.0, 1.0, 1.0))
    return model.apply(variables, x.reshape(2, -1, 3)).sum()
  compiled = jax.jit(jax.grad(loss)).lower(variables, jnp.zeros((2, 32, 32, 3), jnp.uint8),
                                           jnp.full((2, 2), 32, jnp.int32)).compile()
  text = compiled.as_text()
  account = plan.bytes_account(text, 3, plan.cost(compiled)['hbm_bytes'])
  assert account['coverage'] == pytest.approx(1.0, abs=0.02)
  assert 'input' in account['by_part'] and 'transformer decoder' in account['by_part']
  normalize = [op for op in plan.op_bytes(text) if op['part'] == 'input']
  assert normalize and all(op['source'].startswith('ops.py:') and op['source'].endswith(
      ' normalize') for op in normalize)
  # The kernel gradient reads the inputs [2, 1024, 3] and the output gradient [2, 1024, 64].
  dense = max(account['top_ops'], key=lambda op: op['bytes'])
  assert dense['part'] == 'transformer decoder' and dense['bytes'] >= (2 * 1024 * 64) * 4


# ---------------------------------------------------------------------------------------------
# The search, with a fake compiler (what a setting costs: a simple memory and time model).

GIB = 2 ** 30
V5E = chips.CHIPS['v5e']
AVAILABLE = int(15.75 * GIB)


def _fake_compiler(activations_gib: float, compiled: list):
  """compile_train of a model whose per-chip memory is 1 GiB of state (/8 with FSDP) plus
  `activations_gib` a microbatch image (halved by bfloat16, x0.7 / x0.5 / x0.3 by remat decoder /
  backbone / all), and whose step bound is 100 ms a chip image (x0.6 in bfloat16, x1.1 / x1.2 /
  x1.3 by the remats, +1% a microbatch, +5% with FSDP)."""
  remat = {'none': 1.0, 'decoder': 0.7, 'backbone': 0.5, 'all': 0.3}
  slower = {'none': 1.0, 'decoder': 1.1, 'backbone': 1.2, 'all': 1.3}

  def compile_train(config):
    c = plan.candidate_of(config)
    compiled.append(c)
    per_chip = config.batch_size // 8
    half = 0.5 if c.dtype == 'bfloat16' else 1.0
    need = GIB * ((1 / 8 if c.fsdp else 1) + activations_gib * half * remat[c.remat] * per_chip
                  / c.accumulate_steps)
    if need > AVAILABLE:
      return {'fits': False, 'compile_s': 60.0,
              'oom': {'required': int(need), 'available': AVAILABLE, 'message': 'hbm'}}
    # As XLA's cost analysis: the accumulation loop's body (one microbatch) counted once.
    step = (0.1 * per_chip / c.accumulate_steps * (0.6 if c.dtype == 'bfloat16' else 1)
            * slower[c.remat] * (1 + 0.01 * c.accumulate_steps) * (1.05 if c.fsdp else 1))
    return {'fits': True, 'compile_s': 60.0, 'memory': {'total': int(need)},
            'roofline': {'step_s': step}}
  return compile_train


def _config(batch: int = 32, **sets):
  config = config_lib.load_config('tiny')
  config.batch_size = batch
  return config_lib.apply_overrides(config, [f'{k}={v}' for k, v in sets.items()])


def test_search_order_keeps_the_batch_and_puts_cheap_settings_first():
  families = plan.search_order(_config(32), data_shards=8)
  assert [f[0].dtype for f in families] == ['float32', 'bfloat16']
  first = families[0]
  C = plan.Candidate
  # 4 images a chip: 1, 2 or 4 microbatches; no remat and no FSDP first, then FSDP, then remat.
  assert first[:7] == [C('float32', 'none', False, 1), C('float32', 'none', False, 2),
                       C('float32', 'none', False, 4), C('float32', 'none', True, 1),
                       C('float32', 'none', True, 2), C('float32', 'none', True, 4),
                       C('float32', 'decoder', False, 1)]
  assert len(first) == 4 * 2 * 3 and first[-1] == C('float32', 'all', True, 4)
  # The config's own setting leads its family; bfloat16 configs have one family.
  own = plan.search_order(_config(32, **{'model.remat': 'backbone', 'mesh.fsdp': True}), 8)
  assert own[0][0] == C('float32', 'backbone', True, 1) and len(own[0]) == 24
  assert len(plan.search_order(_config(32, **{'model.dtype': 'bfloat16'}), 8)) == 1
  assert len(plan.search_order(_config(32), 8, keep_dtype=True)) == 1
  # A reid head refuses accumulation (config_lib): only one microbatch is offered.
  reid = plan.search_order(_config(32, **{'model.reid': True}), 8)
  assert {c.accumulate_steps for f in reid for c in f} == {1}


def test_search_finds_the_cheapest_fit_and_stops_each_family_at_its_first():
  compiled = []
  # 4 images a chip at 6.65 GiB each: 27.6 GiB, over HBM (the R50 recipe on a v5e-8).
  found = plan.search(_config(32), V5E, 8, _fake_compiler(6.65, compiled))
  C = plan.Candidate
  assert compiled == [C('float32', 'none', False, 1), C('float32', 'none', False, 2),
                      C('bfloat16', 'none', False, 1)]
  # bfloat16 at once (14.3 GiB, 240 ms) beats float32 in two microbatches (408 ms).
  assert found['best']['overrides'] == ['model.dtype=bfloat16']
  assert found['best']['step_s'] == pytest.approx(0.1 * 4 * 0.6 * 1.01)
  rows = found['tried']
  # The float32 winner's bound is its microbatch's (as compiled) times its 2 steps.
  assert rows[1]['step_s'] == pytest.approx(0.1 * 2 * 1.02 * 2)
  assert [r['fits'] for r in rows] == [False, True, True]
  assert rows[0]['required'] == int(GIB * (1 + 6.65 * 4))
  compiled.clear()
  kept = plan.search(_config(32), V5E, 8, _fake_compiler(6.65, compiled), keep_dtype=True)
  assert kept['best']['overrides'] == ['optim.accumulate_steps=2'] and len(compiled) == 2
  report = {'topology': 'v5e:2x4', 'chip': vars(V5E), 'chips': 8,
            'setup': {'batch_size': 32, 'canvas': [128, 224]}, 'search': kept}
  text = plan.format_search(report)
  assert text.splitlines()[-1].endswith(': --set optim.accumulate_steps=2')
  assert 'does not fit, needs 27.60 GiB' in text


def test_search_skips_what_an_out_of_memory_rules_out_and_says_when_nothing_fits():
  compiled = []
  # 8 images a chip at 2.3 GiB: 19.4 GiB at once; the bound 19.4 / 2 = 9.7 does not rule out 2
  # microbatches, which fit.
  found = plan.search(_config(64), V5E, 8, _fake_compiler(2.3, compiled), keep_dtype=True)
  assert [c.accumulate_steps for c in compiled] == [1, 2]
  # 8 images a chip at 9 GiB: 73 GiB at once rules out 2 and 4 microbatches (36.5 and 18.3 GiB
  # are lower bounds); 8 microbatches (10 GiB) are compiled and fit.
  compiled.clear()
  found = plan.search(_config(64), V5E, 8, _fake_compiler(9.0, compiled), keep_dtype=True)
  assert [c.accumulate_steps for c in compiled] == [1, 8]
  assert [r.get('skipped', '')[:18] for r in found['tried']] == [
      '', 'an out-of-memory a', 'an out-of-memory a', '']
  assert found['best']['overrides'] == ['optim.accumulate_steps=8']
  # Nothing fits: every family runs out; the report says what would.
  compiled.clear()
  found = plan.search(_config(8), V5E, 8, _fake_compiler(200.0, compiled))
  assert found['best'] is None
  assert {c.remat for c in compiled} == {'none', 'decoder', 'backbone', 'all'}
  assert all(c.accumulate_steps == 1 for c in compiled)     # one image a chip: nothing to split
  report = {'topology': 'v5e:2x4', 'chip': vars(V5E), 'chips': 8,
            'setup': {'batch_size': 8, 'canvas': [128, 224]}, 'search': found}
  assert plan.format_search(report).splitlines()[-1].startswith('no setting fits')


@pytest.mark.parametrize('flags,message', [
    (['--keep_dtype'], '--keep_dtype applies only with --search'),
    (['--search', '--top_ops', '3'], '--top_ops: not with --search (plan the setting it finds '
     'with --top_ops)')])
def test_search_flags_that_do_not_go_together_are_one_line(flags, message):
  run = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', 'plan', '--config', 'tiny',
                        '--topology', 'v5e:2x2', *flags], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1] == f'minvis-jax plan: error: {message}'
