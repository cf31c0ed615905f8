"""What a config costs on a TPU slice, measured by the compiler on this host (no TPU needed).

`plan_config` compiles, ahead of time for the slice's devices (libtpu's topology description, the
`tpu` extra), the config's train step on its mesh and the evaluation forward at the test
resolution, and reads back per chip: memory (`memory_analysis`), flops and HBM bytes
(`cost_analysis`), the collectives of the compiled HLO, a roofline bound of the step time
(chips.py), the largest evaluation window that fits, and on request the HBM bytes of the train
step op by op (`op_bytes`). `search` looks for the cheapest settings (FSDP, rematerialisation,
bfloat16, gradient accumulation) that make the train step fit. `minvis-jax plan` (cli.py) prints
them.
"""

import collections
import contextlib
import copy
import dataclasses
import importlib.util
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minvis_jax import chips
from minvis_jax import model_forward
from minvis_jax import config_lib
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax import train
from minvis_jax.models import ModelConfig

INSTALL_HINT = ("planning for TPUs needs libtpu: pip install 'minvis-jax[tpu]' (or "
                "'jax[tpu]' of the installed jax version)")

# The evaluation frame: YouTube-VIS videos are mostly 720x1280; the test transform resizes it to
# the config's min_size_test and pads to size_divisibility.
EVAL_FRAME = (720, 1280)
# Windows beyond this many frames a chip are not searched (the forward's memory is linear in it;
# the predictor's 'auto' window stops there too).
MAX_WINDOW = 16

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# An HLO instruction whose opcode is a collective (or its async -start): the shape text before it.
_COLLECTIVE_RE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*?) ('
                            + '|'.join(COLLECTIVES) + r')(-start)?\(', re.M)
_ARRAY_RE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')


class PlanError(ValueError):
  """The topology or the plan's inputs are wrong (a user error: one line)."""


@contextlib.contextmanager
def quiet_stderr():
  """Silences file descriptor 2 (libtpu's C++ start-up warnings about a host that is not a TPU
  VM, the compiler's logging) for the body; what was written there is dropped. An error of the
  body still raises, and its message says what failed."""
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(topology: str) -> list:
  """The TPU devices of a slice such as 'v5e:2x2' (compile targets only: nothing runs on them)."""
  chips.chip_of(topology)
  if not libtpu_installed():
    raise ImportError(INSTALL_HINT)
  try:
    with quiet_stderr():
      desc = topologies.get_topology_desc(platform='tpu', topology_name=topology)
  except Exception as e:  # noqa: BLE001  (libtpu raises plain runtime errors for bad names)
    raise PlanError(f'--topology {topology!r}: libtpu does not know it ({_first_line(e)})'
                    ) from None
  return list(desc.devices)


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ---------------------------------------------------------------------------------------------
# What a compiled program says about itself.


def shape_bytes(text: str) -> int:
  """Bytes of every array in an HLO shape text, e.g. '(f32[8,16]{1,0}, bf16[4]{0})' -> 520."""
  total = 0
  for dtype, dims in _ARRAY_RE.findall(text):
    total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
  return total


def collectives(hlo_text: str) -> dict:
  """{kind: {'count', 'bytes'}} of the collective instructions of a compiled HLO module (bytes of
  their results; an async -start counts once, with its output: the last array of its tuple for
  all-gather and collective-permute, whose -start tuples carry the operand too). Static counts:
  an instruction inside a loop body counts once."""
  out = {}
  for shape, kind, start in _COLLECTIVE_RE.findall(hlo_text):
    arrays = _ARRAY_RE.findall(shape)
    if start and kind in ('all-gather', 'collective-permute') and len(arrays) > 1:
      shape = '{}[{}]'.format(*arrays[-1])
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += shape_bytes(shape)
  return out


def memory(compiled) -> dict:
  """Per-chip bytes of a compiled program: its arguments, outputs, temporaries and code; total
  counts a donated argument once (its output reuses it)."""
  m = compiled.memory_analysis()
  out = {'arguments': int(m.argument_size_in_bytes), 'outputs': int(m.output_size_in_bytes),
         'temporaries': int(m.temp_size_in_bytes), 'aliased': int(m.alias_size_in_bytes),
         'code': int(m.generated_code_size_in_bytes)}
  out['total'] = (out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
                  + out['code'])
  return out


def cost(compiled) -> dict:
  """{'flops', 'hbm_bytes'} of one run of a compiled program on one chip (the compiler's count)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return {'flops': float(c.get('flops', 0.0)), 'hbm_bytes': float(c.get('bytes accessed', 0.0))}


_OOM_RE = re.compile(r'([\d.]+)\s*([KMGT]?)i?B?\)? (?:exceeds|of) (?:available )?HBM \(?([\d.]+)'
                     r'\s*([KMGT]?)', re.I)
_USED_RE = re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm', re.I)
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def out_of_memory(error: BaseException) -> dict | None:
  """{'required', 'available', 'message'} from the compiler's RESOURCE_EXHAUSTED error (bytes; None
  where the message has no figure), or None for any other error."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
    return None
  found = _USED_RE.search(text) or _OOM_RE.search(text)
  line = next((s.strip() for s in text.splitlines() if 'HBM' in s or 'hbm' in s), _first_line(
      error))
  if not found:
    return {'required': None, 'available': None, 'message': line[:300]}
  a, ua, b, ub = found.groups()
  return {'required': int(float(a) * _UNITS[ua.upper()]),
          'available': int(float(b) * _UNITS[ub.upper()]), 'message': line[:300]}


@dataclasses.dataclass
class Compiled:
  """One program compiled for the slice, or the compiler's reason it does not fit."""
  seconds: float
  compiled: Any = None
  oom: dict | None = None

  @property
  def fits(self) -> bool:
    return self.compiled is not None


def compile_for(fn: Callable[[], Any]) -> Compiled:
  """Lowers and compiles `fn()` (a `Lowered`), timing it; an out-of-memory is a result."""
  start = time.perf_counter()
  try:
    with quiet_stderr():
      compiled = fn().compile()
  except Exception as e:  # noqa: BLE001
    oom = out_of_memory(e)
    if oom is None:
      raise
    return Compiled(time.perf_counter() - start, oom=oom)
  return Compiled(time.perf_counter() - start, compiled)


# ---------------------------------------------------------------------------------------------
# HBM bytes op by op.

# One instruction of an HLO computation: name, result shape, opcode, operand list, attributes.
_INSTR_RE = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(.*)$', re.M)
_COMPUTATION_RE = re.compile(r'^(ENTRY\s+)?%([\w.\-]+) \(.*\{\s*$', re.M)
_OPERAND_RE = re.compile(r'%([\w.\-]+)')
# Instructions that move no data of their own: views, tuples, the loops' shells (their bodies'
# instructions are counted), scalars.
_NO_TRAFFIC = frozenset((
    'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'while', 'conditional',
    'call', 'after-all', 'partition-id', 'replica-id', 'iota', 'all-gather-done',
    'all-reduce-done', 'collective-permute-done', 'copy-done', 'send-done', 'recv-done',
    'opt-barrier'))
_TRIP_RE = re.compile(r'known_trip_count[^0-9]*(\d+)')
# The stack-frame tables of an HLO module's text (the Python call site of every op).
_TABLE_ROW_RE = re.compile(r'^(\d+) (.*)$')


def _tables(hlo_text: str) -> dict:
  """{'FileNames' | 'FunctionNames' | 'FileLocations' | 'StackFrames': {id: text}} of the module
  header."""
  tables, current = {}, None
  for line in hlo_text.split('\n\n\n', 1)[0].splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = tables.setdefault(line, {})
    elif current is not None and (row := _TABLE_ROW_RE.match(line)):
      current[int(row.group(1))] = row.group(2)
  return tables


def _call_sites(hlo_text: str) -> Callable[[int], list[tuple[str, str, int]]]:
  """stack_frame_id -> its call chain [(file, function, line)], innermost first. (The printed
  parent_frame_id is one more than the parent's id; 0 is none.)"""
  t = _tables(hlo_text)
  files = {k: v.strip('"') for k, v in t.get('FileNames', {}).items()}
  functions = {k: v.strip('"') for k, v in t.get('FunctionNames', {}).items()}
  fields = lambda text: dict(re.findall(r'(\w+)=(\d+)', text))  # noqa: E731
  locations = {k: fields(v) for k, v in t.get('FileLocations', {}).items()}
  frames = {k: fields(v) for k, v in t.get('StackFrames', {}).items()}

  def chain(frame_id: int) -> list[tuple[str, str, int]]:
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc = locations.get(int(frames[frame_id].get('file_location_id', 0)), {})
      out.append((files.get(int(loc.get('file_name_id', 0)), '?'),
                  functions.get(int(loc.get('function_name_id', 0)), '?'),
                  int(loc.get('line', 0))))
      frame_id = int(frames[frame_id].get('parent_frame_id', 0)) - 1
    return out
  return chain


# Which part of the model (or loss) an op comes from: (project file, function name prefix) of its
# innermost project call site -> part; the flax module path of its op_name decides the rest.
_PARTS_BY_SOURCE = (
    ('models/deform_attn.py', ('',), 'deformable sampling'),
    ('criterion.py', ('match',), 'matcher'),
    ('matching.py', ('',), 'matcher'),
    ('criterion.py', ('sample', '_sample', 'draw_points', '_uniform', 'keep_uncertain', 'top_k',
                      '_top_k', 'prefix_count'), 'point sampling'),
    ('criterion.py', ('',), 'loss'),
    ('models/transformer_decoder.py', ('TransformerDecoder.__call__.<locals>.predict',),
     'mask head'),
    ('ops.py', ('normalize',), 'input'),
    ('optim.py', ('',), 'optimizer'),
)
_PARTS_BY_MODULE = (('backbone', 'backbone'), ('pixel_decoder', 'pixel decoder'),
                    ('decoder', 'transformer decoder'))


def model_part(op_name: str, sites: list[tuple[str, str, int]]) -> str:
  """The model code an op comes from, e.g. 'backbone', 'deformable sampling', 'point sampling',
  'matcher', 'mask head', 'optimizer'; 'other' when neither its call site nor its flax module
  path says."""
  project = [(f.split('minvis_jax/', 1)[1], fn) for f, fn, _ in sites if 'minvis_jax/' in f]
  for file, function in project[:1]:
    for suffix, prefixes, part in _PARTS_BY_SOURCE:
      if file == suffix and function.startswith(prefixes):
        return part
  if any('optax' in f for f, _, _ in sites[:1]):
    return 'optimizer'
  modules = set(op_name.replace('(', '/').replace(')', '/').split('/'))
  for module, part in _PARTS_BY_MODULE:
    if module in modules:
      return part
  return 'other'


def op_bytes(hlo_text: str) -> list[dict]:
  """Every data-moving instruction of a compiled HLO module (a fusion, convolution, custom call,
  copy, collective, ...) outside fused computations, with the bytes it reads and writes: its
  operands' and its result's (logical sizes; a loop body's instructions times the loop's known
  trip count). Each: {'name', 'opcode', 'bytes', 'count' (runs a step), 'op_name', 'source'
  (innermost project call site 'file:line function'), 'part' (`model_part`)}; largest first."""
  shapes, computations, current = {}, {}, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION_RE.match(line)
    if head:
      current = computations.setdefault(head.group(2), [])
      continue
    found = _INSTR_RE.match(line)
    if found and current is not None:
      name, shape, opcode, operands, attrs = found.groups()
      shapes[name] = shape
      current.append((name, shape, opcode, operands, attrs))
  # Fused and applied computations run inside their caller: their instructions move no HBM data.
  inner, runs = set(), collections.defaultdict(lambda: 1)
  callers = {}
  for comp, instrs in computations.items():
    for name, _, opcode, _, attrs in instrs:
      for key in ('calls', 'to_apply'):
        inner.update(re.findall(key + r'=%([\w.\-]+)', attrs))
      if opcode == 'while':
        trips = _TRIP_RE.search(attrs)
        for body in re.findall(r'(?:body|condition)=%([\w.\-]+)', attrs):
          callers[body] = (comp, int(trips.group(1)) if trips else 1)
  for comp in computations:   # nested loops multiply
    n, parent, seen = 1, comp, set()
    while parent in callers and parent not in seen:
      seen.add(parent)
      parent, trips = callers[parent]
      n *= trips
    runs[comp] = n
  sites = _call_sites(hlo_text)
  out = []
  for comp, instrs in computations.items():
    if comp in inner:
      continue
    for name, shape, opcode, operands, attrs in instrs:
      if opcode in _NO_TRAFFIC:
        continue
      moved = shape_bytes(shape) + sum(shape_bytes(shapes.get(o, ''))
                                       for o in _OPERAND_RE.findall(operands))
      op_name = (re.search(r'op_name="([^"]*)"', attrs) or [None, ''])[1]
      frame = re.search(r'stack_frame_id=(\d+)', attrs)
      chain = sites(int(frame.group(1))) if frame else []
      project = [(f.split('minvis_jax/', 1)[1], fn, ln) for f, fn, ln in chain
                 if 'minvis_jax/' in f]
      source = '{0}:{2} {1}'.format(*project[0]) if project else ''
      out.append({'name': name, 'opcode': opcode, 'bytes': moved * runs[comp],
                  'count': runs[comp], 'op_name': op_name.split(';')[0], 'source': source,
                  'part': model_part(op_name, chain)})
  out.sort(key=lambda r: -r['bytes'])
  return out


def bytes_account(hlo_text: str, top: int, total_hbm_bytes: float | None = None) -> dict:
  """The train step's HBM bytes by model part (all ops) and its `top` largest ops (`op_bytes`);
  'coverage': their sum against the compiler's own total (`cost_analysis`), when given."""
  ops = op_bytes(hlo_text)
  parts = collections.Counter()
  for op in ops:
    parts[op['part']] += op['bytes']
  total = sum(parts.values())
  return {'counted_bytes': total,
          'coverage': total / total_hbm_bytes if total_hbm_bytes else None,
          'by_part': dict(parts.most_common()),
          'top_ops': ops[:top]}


# ---------------------------------------------------------------------------------------------
# The programs.


def abstract_batch(config: ml_collections.ConfigDict, sharding) -> dict:
  """ShapeDtypeStructs of a global training batch (every target slot: the largest step)."""
  b, (h, w), n = config.batch_size, config.data.canvas, config.data.max_instances
  shapes = {'image': ((b, h, w, 3), jnp.uint8), 'image_size': ((b, 2), jnp.int32),
            'labels': ((b, n), jnp.int32), 'masks': ((b, n, h, w), jnp.uint8),
            'valid': ((b, n), jnp.bool_)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def compile_train_step(config: ml_collections.ConfigDict, devices: list) -> tuple[Compiled, Any]:
  """The config's train step on its mesh over `devices`: (compiled, the trainer)."""
  mesh = train.make_mesh(config.mesh, devices)
  if config.batch_size % mesh.shape['data']:
    raise PlanError(f'batch_size={config.batch_size} is not a multiple of the mesh\'s '
                    f'{mesh.shape["data"]} data shards')
  trainer = train.Trainer(config, mesh)
  batch = abstract_batch(config, trainer.batch_sharding)
  return compile_for(lambda: trainer.step.lower(trainer.abstract_state, batch)), trainer


def eval_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The padded test input [Hp, Wp] of an `EVAL_FRAME` video."""
  h, w = predictor.valid_size(*EVAL_FRAME, config.data)
  d = config.data.size_divisibility
  return -(-h // d) * d, -(-w // d) * d


def compile_eval(config: ml_collections.ConfigDict, devices: list, window: int) -> Compiled:
  """The predictor's window step (forward, association, mask reorder) with `window` frames on
  every chip, at the test resolution."""
  model_config = ModelConfig.from_config(config.model)
  mesh = jax.sharding.Mesh(np.array(devices), ('frames',))
  replicated, frames = NamedSharding(mesh, P()), NamedSharding(mesh, P('frames'))
  variables = jax.eval_shape(lambda: train.init_variables(config, jax.random.PRNGKey(0)))
  tracker = tracking.tracker_from_config(config)
  state = tracking.initial_state(tracker, model_config.num_queries,
                                 tracking.embedding_dim(tracker, model_config))
  spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  n = window * len(devices)
  args = (jax.tree.map(lambda x: spec(x, replicated), variables),
          jax.tree.map(lambda x: spec(x, replicated), state),
          jax.ShapeDtypeStruct((n, *eval_size(config), 3), jnp.float32, sharding=frames),
          jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=replicated))
  step = predictor._step_fn(model_forward.forward(model_config), mesh, tracker)
  return compile_for(lambda: step.lower(*args))


# ---------------------------------------------------------------------------------------------
# The plan.


def _chip_dict(chip: chips.Chip) -> dict:
  return dataclasses.asdict(chip)


def train_report(config: ml_collections.ConfigDict, result: Compiled, chip: chips.Chip,
                 n_chips: int) -> dict:
  """The JSON of a compiled (or refused) train step: memory against HBM, cost, collectives and the
  roofline bound (`chips.roofline`), per chip and per image."""
  per_chip = config.batch_size / n_chips
  out = {'fits': result.fits, 'compile_s': round(result.seconds, 1), 'images_per_chip': per_chip}
  if not result.fits:
    return dict(out, oom=result.oom)
  mem = memory(result.compiled)
  work = cost(result.compiled)
  colls = collectives(result.compiled.as_text())
  # A ring all-reduce sends about twice its bytes out of each chip; the others about once.
  wire = sum(v['bytes'] * (2 if k == 'all-reduce' else 1) for k, v in colls.items())
  bound = chips.roofline(chip, work['flops'], work['hbm_bytes'], wire)
  bound['images_per_s'] = config.batch_size / bound['step_s'] if bound['step_s'] else None
  bound['mfu'] = bound['compute_s'] / bound['step_s'] if bound['step_s'] else None
  return dict(out, memory=mem, hbm_fraction=mem['total'] / chip.hbm_bytes,
              headroom_bytes=chip.hbm_bytes - mem['total'],
              flops=work['flops'], hbm_bytes=work['hbm_bytes'],
              flops_per_image=work['flops'] / per_chip,
              hbm_bytes_per_image=work['hbm_bytes'] / per_chip,
              collectives=colls, collective_bytes=sum(v['bytes'] for v in colls.values()),
              roofline=bound)


def largest_window(config: ml_collections.ConfigDict, devices: list, chip: chips.Chip,
                   log: Callable[[str], None]) -> dict:
  """The largest evaluation window (frames a chip) whose compiled window step fits in HBM: the
  memory of windows 1 and 2 gives the cost of a frame (the forward is linear in it), the window it
  allows is then compiled to confirm (halved until it fits)."""
  first = compile_eval(config, devices, 1)
  log(f'  eval window 1: {first.seconds:.0f} s')
  if not first.fits:
    return {'window': 0, 'fits': False, 'oom': first.oom, 'compile_s': round(first.seconds, 1)}
  second = compile_eval(config, devices, 2)
  log(f'  eval window 2: {second.seconds:.0f} s')
  one = memory(first.compiled)
  if not second.fits:
    best, best_mem = 1, one
  else:
    per_frame = max(memory(second.compiled)['total'] - one['total'], 1)
    guess = int(min(MAX_WINDOW, 1 + (chip.hbm_bytes - one['total']) // per_frame))
    best, best_mem = (2, memory(second.compiled)) if guess >= 2 else (1, one)
    while guess > 2:
      tried = compile_eval(config, devices, guess)
      log(f'  eval window {guess}: {tried.seconds:.0f} s')
      if tried.fits and memory(tried.compiled)['total'] <= chip.hbm_bytes:
        best, best_mem = guess, memory(tried.compiled)
        break
      guess //= 2
  work = cost(first.compiled)   # one frame a chip
  return {'window': best, 'fits': True, 'size': list(eval_size(config)), 'memory': best_mem,
          'memory_window_1': one, 'flops_per_frame': work['flops'],
          'hbm_bytes_per_frame': work['hbm_bytes'],
          'compile_s': round(first.seconds + second.seconds, 1)}


def plan_config(config: ml_collections.ConfigDict, topology: str, evaluation: bool = True,
                log: Callable[[str], None] = lambda s: None, top_ops: int = 0) -> dict:
  """The plan of `config` on `topology` (e.g. 'v5e:2x2'): see the module docstring. `log` gets a
  line per compile (they take minutes for the model-zoo configs). With `top_ops` the train
  report has the step's HBM bytes by model part and its `top_ops` largest ops
  (`bytes_account`)."""
  chip = chips.chip_of(topology)
  devices = topology_devices(topology)
  log(f'compiling the train step for {topology} ({len(devices)} chips) ...')
  result, trainer = compile_train_step(config, devices)
  n = trainer.mesh.shape['data']
  log(f'  train step: {result.seconds:.0f} s')
  report = {'topology': topology, 'chip': _chip_dict(chip), 'chips': len(devices),
            'mesh': dict(trainer.mesh.shape),
            'setup': {'batch_size': config.batch_size, 'canvas': list(config.data.canvas),
                      'fsdp': bool(config.mesh.fsdp), 'dtype': config.model.dtype},
            'train': train_report(config, result, chip, n)}
  if result.fits:
    report['_compiled_train'] = result.compiled
    if top_ops:
      report['train']['bytes_account'] = bytes_account(
          result.compiled.as_text(), top_ops, report['train']['hbm_bytes'])
  if evaluation:
    log('compiling the evaluation window step ...')
    report['eval'] = largest_window(config, devices, chip, log)
  return report


# ---------------------------------------------------------------------------------------------
# The search for settings that fit.

# Rematerialisation in the order of its recomputation (the decoder's layers are cheaper to redo
# than the backbone's blocks at the recipe's resolution).
REMAT_ORDER = ('none', 'decoder', 'backbone', 'all')


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One setting of the memory knobs; the config's global batch is kept."""
  dtype: str
  remat: str
  fsdp: bool
  accumulate_steps: int

  def overrides(self) -> list[str]:
    return [f'model.dtype={self.dtype}', f'model.remat={self.remat}', f'mesh.fsdp={self.fsdp}',
            f'optim.accumulate_steps={self.accumulate_steps}']

  def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A validated copy of `config` with these settings (ValueError where the config refuses
    them, e.g. accumulation with a reid head)."""
    return config_lib.apply_overrides(copy.deepcopy(config), self.overrides())


def candidate_of(config: ml_collections.ConfigDict) -> Candidate:
  return Candidate(str(config.model.dtype), str(config.model.get('remat', 'none')),
                   bool(config.mesh.fsdp), int(config.optim.get('accumulate_steps', 1)))


def search_order(config: ml_collections.ConfigDict, data_shards: int,
                 keep_dtype: bool = False) -> list[list[Candidate]]:
  """The candidates `search` may compile, one list per family (a compute dtype: the config's, and
  bfloat16 unless `keep_dtype` or already), each in the order of its expected step time: first the
  config's own setting, then without rematerialisation and FSDP over growing accumulation (fewer
  images a chip at once: the same flops, only the parameters read once more a microbatch), then
  FSDP (more collectives), then each rematerialisation (more flops) with and without FSDP. The
  accumulation steps divide the per-chip batch; settings the config refuses are left out."""
  own = candidate_of(config)
  dtypes = [own.dtype] + ([] if keep_dtype or own.dtype == 'bfloat16' else ['bfloat16'])
  per_chip = config.batch_size // data_shards
  steps = [k for k in range(1, per_chip + 1) if per_chip % k == 0]
  families = []
  for dtype in dtypes:
    first = dataclasses.replace(own, dtype=dtype)
    order = [first] + [Candidate(dtype, remat, fsdp, k) for remat in REMAT_ORDER
                       for fsdp in (False, True) for k in steps]
    family, seen = [], set()
    for c in order:
      if c in seen:
        continue
      seen.add(c)
      try:
        c.apply(config)
      except ValueError:
        continue
      family.append(c)
    families.append(family)
  return families


def _cannot_fit(c: Candidate, refused: list[tuple[Candidate, dict]]) -> bool:
  """Whether an out-of-memory of the same setting at fewer accumulation steps already rules `c`
  out: the microbatch's activations shrink at most in proportion to the steps (the parameters and
  optimizer state do not), so `required * k_refused / k` is a lower bound of what `c` needs."""
  for r, oom in refused:
    same = (r.dtype, r.remat, r.fsdp) == (c.dtype, c.remat, c.fsdp)
    if (same and r.accumulate_steps < c.accumulate_steps and oom.get('required')
        and oom['required'] * r.accumulate_steps / c.accumulate_steps > oom['available']):
      return True
  return False


def fits(train: dict, chip: chips.Chip) -> bool:
  """A train report (`train_report`) that compiled and whose total is within the chip's HBM."""
  return bool(train['fits']) and train['memory']['total'] <= chip.hbm_bytes


def step_bound(train_report_: dict, accumulate_steps: int) -> float:
  """The roofline bound of a whole step: XLA's cost analysis counts the body of the accumulation
  scan once (one microbatch), so the bound of an accumulated step is that times its steps (the
  optimizer update outside the loop is then counted more than once: an over-estimate)."""
  return train_report_['roofline']['step_s'] * accumulate_steps


def search(config: ml_collections.ConfigDict, chip: chips.Chip, data_shards: int,
           compile_train: Callable[[ml_collections.ConfigDict], dict], keep_dtype: bool = False,
           log: Callable[[str], None] = lambda s: None) -> dict:
  """The cheapest setting of FSDP, rematerialisation, bfloat16 compute and gradient accumulation
  (`search_order`) whose train step fits the chip, the global batch kept.

  compile_train(config) -> its train report (`train_report`; a multi-minute compile each). In each
  family the candidates are compiled in order and the first that fits ends the family (the later
  ones are expected to be slower); a candidate an earlier out-of-memory rules out is skipped
  without compiling (`_cannot_fit`). Of the families' winners the cheapest is the one with the
  lowest roofline step bound, then the least memory; the compiler's cost analysis counts the
  accumulation loop's body once, so a candidate's bound is its microbatch's times its steps
  (`step_bound`). Returns {'best': {'setting', 'overrides'
  (the --set flags that differ from the config), 'train'} or None, 'tried': [{'setting', 'fits',
  'required' or 'memory', 'step_s'} or {'setting', 'skipped'}], 'families'}.
  """
  own = candidate_of(config)
  tried, winners = [], []
  for family in search_order(config, data_shards, keep_dtype):
    refused = []
    for c in family:
      setting = dataclasses.asdict(c)
      if _cannot_fit(c, refused):
        tried.append({'setting': setting,
                      'skipped': 'an out-of-memory at fewer steps rules it out'})
        continue
      log(f'  trying {" ".join(c.overrides())} ...')
      step = compile_train(c.apply(config))
      ok = fits(step, chip)
      row = {'setting': setting, 'fits': ok, 'compile_s': step.get('compile_s')}
      if step['fits']:
        row.update(memory=step['memory']['total'], step_s=step_bound(step, c.accumulate_steps))
      else:
        row.update(required=step['oom'].get('required'))
      tried.append(row)
      log(f'    {"fits" if ok else "does not fit"}: ' + (
          f"{row['memory'] / 2 ** 30:.2f} GiB, step >= {1e3 * row['step_s']:.0f} ms"
          if 'memory' in row else f"needs {_gib(row['required'])}"))
      if ok:
        winners.append((c, step))
        break
      if step['fits']:   # compiled, but its total is over the chip's HBM
        refused.append((c, {'required': step['memory']['total'], 'available': chip.hbm_bytes}))
      else:
        refused.append((c, step['oom']))
  best = None
  if winners:
    c, step = min(winners, key=lambda w: (step_bound(w[1], w[0].accumulate_steps),
                                          w[1]['memory']['total']))
    changed = [o for o, mine in zip(c.overrides(), own.overrides()) if o != mine]
    best = {'setting': dataclasses.asdict(c), 'overrides': changed, 'train': step,
            'step_s': step_bound(step, c.accumulate_steps)}
  return {'best': best, 'tried': tried,
          'families': [f[0].dtype for f in search_order(config, data_shards, keep_dtype)]}


def search_config(config: ml_collections.ConfigDict, topology: str, keep_dtype: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> dict:
  """`search` on `topology` with the real compiler: {'topology', 'chip', 'chips', 'setup',
  'search'}."""
  chip = chips.chip_of(topology)
  devices = topology_devices(topology)
  shards = train.make_mesh(config.mesh, devices).shape['data']

  def compile_train(candidate_config):
    result, _ = compile_train_step(candidate_config, devices)
    return train_report(candidate_config, result, chip, shards)
  log(f'searching settings for {topology} ({len(devices)} chips) ...')
  found = search(config, chip, shards, compile_train, keep_dtype, log)
  return {'topology': topology, 'chip': _chip_dict(chip), 'chips': len(devices),
          'setup': {'batch_size': config.batch_size, 'canvas': list(config.data.canvas)},
          'search': found}


def format_search(report: dict) -> str:
  """The search as the lines `minvis-jax plan --search` prints; the last is the flags to pass."""
  s = report['search']
  lines = [f"{report['topology']}: {report['chips']} chips of {report['chip']['name']}; batch "
           f"{report['setup']['batch_size']} kept; families {', '.join(s['families'])}"]
  for row in s['tried']:
    c = row['setting']
    name = (f"dtype={c['dtype']} remat={c['remat']} fsdp={c['fsdp']} "
            f"accumulate_steps={c['accumulate_steps']}")
    if 'skipped' in row:
      lines.append(f'  {name}: skipped ({row["skipped"]})')
    elif 'memory' in row:
      lines.append(f"  {name}: {'fits' if row['fits'] else 'over HBM'}, "
                   f"{_gib(row['memory'])}, step >= {1e3 * row['step_s']:.1f} ms "
                   f"(compiled in {row['compile_s']:.0f} s)")
    else:
      lines.append(f"  {name}: does not fit, needs {_gib(row['required'])} "
                   f"(compiled in {row['compile_s']:.0f} s)")
  best = s['best']
  if best is None:
    lines.append('no setting fits: a larger slice (more chips) or a smaller batch or canvas')
  else:
    flags = ' '.join(f'--set {o}' for o in best['overrides']) or '(the config as it is)'
    lines.append(f"cheapest that fits: step >= {1e3 * best['step_s']:.1f} ms, "
                 f"{_gib(best['train']['memory']['total'])} a chip: {flags}")
  return '\n'.join(lines)


def to_json(report: dict) -> dict:
  """The report without its private entries (the compiled objects)."""
  return {k: v for k, v in report.items() if not k.startswith('_')}


def _gib(x) -> str:
  return 'n/a' if x is None else f'{x / 2 ** 30:.2f} GiB'


def format_report(report: dict) -> str:
  """The plan as the lines `minvis-jax plan` prints."""
  chip, t, s = report['chip'], report['train'], report['setup']
  lines = [f"{report['topology']}: {report['chips']} chips of {chip['name']} "
           f"({_gib(chip['hbm_bytes'])} HBM, {chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
           f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s HBM; {chip['source']}), mesh {report['mesh']}",
           f"train step: batch {s['batch_size']} ({t['images_per_chip']:g} a chip) on "
           f"{s['canvas'][0]}x{s['canvas'][1]}, fsdp={s['fsdp']}, dtype={s['dtype']}; compiled in "
           f"{t['compile_s']:.0f} s"]
  if not t['fits']:
    oom = t['oom']
    lines.append(f"  DOES NOT FIT: the compiler needs {_gib(oom['required'])} a chip, "
                 f"{_gib(oom['available'])} available ({oom['message']})")
  else:
    m = t['memory']
    lines += [f"  memory a chip: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
              f"({_gib(m['aliased'])} donated), temporaries {_gib(m['temporaries'])}, code "
              f"{_gib(m['code'])}; total {_gib(m['total'])} = {100 * t['hbm_fraction']:.0f}% of "
              f"HBM, headroom {_gib(t['headroom_bytes'])}",
              f"  a chip per step: {t['flops'] / 1e9:.1f} GFLOP, {t['hbm_bytes'] / 1e9:.2f} GB of "
              f"HBM traffic; per image {t['flops_per_image'] / 1e9:.1f} GFLOP, "
              f"{t['hbm_bytes_per_image'] / 1e9:.2f} GB",
              '  collectives: ' + (', '.join(
                  f"{k} x{v['count']} {v['bytes'] / 2 ** 20:.1f} MiB"
                  for k, v in sorted(t['collectives'].items())) or 'none')]
    r = t['roofline']
    lines.append(f"  roofline bound (not a measurement): step >= {1e3 * r['step_s']:.1f} ms "
                 f"(compute {1e3 * r['compute_s']:.1f}, HBM {1e3 * r['hbm_s']:.1f}, ICI "
                 f"{1e3 * r['ici_s']:.1f} ms; {r['limited_by']}-bound) -> at most "
                 f"{r['images_per_s']:.0f} images/s, MFU at most {100 * r['mfu']:.0f}%")
    account = t.get('bytes_account')
    if account:
      lines.append(f"  HBM bytes by model part (operands + results of each op, loops times their "
                   f"trips: {account['counted_bytes'] / 1e9:.2f} GB, "
                   + (f"{100 * account['coverage']:.0f}% of the compiler's total): "
                      if account['coverage'] else '): ')
                   + ', '.join(f'{k} {v / 1e9:.2f}' for k, v in account['by_part'].items()))
      lines.append(f"  the {len(account['top_ops'])} largest ops:")
      for op in account['top_ops']:
        runs = f" x{op['count']}" if op['count'] > 1 else ''
        lines.append(f"    {op['bytes'] / 1e9:7.2f} GB  {op['part']:<20} {op['opcode']}{runs} "
                     f"{op['source'] or '-'}  [{op['op_name'][-90:]}]")
  e = report.get('eval')
  if e is not None:
    if not e['fits']:
      lines.append(f"eval: one frame a chip does not fit ({e['oom']['message']})")
    else:
      lines.append(f"eval at {e['size'][0]}x{e['size'][1]}: largest window {e['window']} frames a "
                   f"chip ({_gib(e['memory']['total'])}; one frame "
                   f"{e['flops_per_frame'] / 1e9:.1f} GFLOP, {e['hbm_bytes_per_frame'] / 1e9:.2f} "
                   f"GB) -> --set inference.window={e['window']}")
  return '\n'.join(lines)
