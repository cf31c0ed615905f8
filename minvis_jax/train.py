"""Frame-level Mask2Former training (docs/method.md §3, §4): optimizer, sharded train step, loop.

One code path for one CPU, fake CPU devices, several processes and TPU pods: a ('data',) `Mesh`
from the config (parameters replicated, or FSDP-sharded over 'data' with `config.mesh.fsdp`),
`jax.jit` with shardings, batches assembled from each process's shard with
`jax.make_array_from_process_local_data`. The work directory holds `config.json`, orbax checkpoints
(checkpoints.py: `checkpoints/<step>/{variables,train,checksums}`), `metrics.jsonl` (a row per
log step) and TensorBoard event files. `minvis-jax train` (cli.py) runs `train`.
"""

import hashlib
import logging
import time
from typing import Any, Callable, Iterator

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import criterion
from minvis_jax import evaluate
from minvis_jax import metrics_writer
from minvis_jax import ops
from minvis_jax import optim
from minvis_jax import paths
from minvis_jax import preemption as preemption_lib
from minvis_jax import reid
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig
# The optimizer's pieces, also reachable as train.X.
from minvis_jax.optim import (decay_mask, learning_rate_schedule, make_optimizer,  # noqa: F401
                              param_groups)


@flax.struct.dataclass
class TrainState:
  step: jax.Array           # int32 scalar: number of updates applied
  params: Any               # trainable model parameters
  frozen: Any               # frozen BatchNorm statistics (never updated)
  opt_state: Any


class NonFiniteLossError(RuntimeError):
  """A step's loss or gradient norm was not finite (the run stops before saving anything after)."""


# ---------------------------------------------------------------------------------------------
# Mesh and shardings.


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A ('data',) mesh over `devices` (default: all, or the first `mesh_config.data` of them;
  data = -1 takes all). Parameters are replicated over it or, with `mesh_config.fsdp`, sharded."""
  if devices is None:
    devices = jax.devices()
    if mesh_config.data != -1:   # an explicit size may use a leading subset of the devices
      devices = devices[:mesh_config.data]
  devices = list(devices)
  data = mesh_config.data if mesh_config.data != -1 else len(devices)
  if data != len(devices):
    raise ValueError(f'config.mesh: data={mesh_config.data} does not cover {len(devices)} devices')
  return jax.make_mesh((data,), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def _fsdp_spec(shape, data_size: int) -> P:
  """Shards the largest dimension divisible by the data axis (ZeRO-3 style); else replicated."""
  dims = [i for i, d in enumerate(shape) if d % data_size == 0 and d >= data_size]
  if not dims or data_size == 1:
    return P()
  best = max(dims, key=lambda i: shape[i])
  return P(*[('data' if i == best else None) for i in range(len(shape))])


def state_shardings(abstract_state: TrainState, mesh, fsdp: bool):
  """NamedShardings of the train state: replicated (data parallel) or FSDP over 'data'."""
  def spec(x):
    if fsdp and x.ndim >= 1 and x.size >= 2 ** 14:
      return NamedSharding(mesh, _fsdp_spec(x.shape, mesh.shape['data']))
    return NamedSharding(mesh, P())
  return jax.tree.map(spec, abstract_state)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


# ---------------------------------------------------------------------------------------------
# State and step.


def dummy_images(config) -> jax.Array:
  return jnp.zeros((1, *config.data.canvas, 3), jnp.float32)


def init_variables(config, key) -> dict:
  """Random model variables (traced: call it under `jax.jit` or `jax.eval_shape`)."""
  return Mask2Former(ModelConfig.from_config(config.model)).init(key, dummy_images(config))


def load_init_variables(config, like: dict) -> dict:
  """`config.init.checkpoint`'s variables as host arrays, checked against the shapes of `like`
  (arrays or ShapeDtypeStructs). With `config.init.reinit_class_head` the class head's leaves are
  `like`'s own (so a head for another class count is fine)."""
  loaded = jax.tree.map(np.asarray, checkpoints.load_variables(config.init.checkpoint))
  if config.init.reinit_class_head:
    loaded['params']['decoder']['class_embed'] = like['params']['decoder']['class_embed']
  reid.add_missing_head(loaded, like)   # a detector checkpoint for a model with a reid head
  # Strict both ways: every stored array is used, every parameter is found, shapes agree.
  checkpoints.check_variables(loaded, checkpoints.variable_shapes(like), f'{config.init.checkpoint}'
                              ': variables do not match config.model', 'this config')
  return loaded


def create_train_state(config, key) -> TrainState:
  """Random initial state (traced); `Trainer.init_state` puts the init checkpoint in afterwards."""
  variables = init_variables(config, key)
  tx = make_optimizer(config.optim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    frozen=variables.get('frozen', {}), opt_state=tx.init(variables['params']))


def make_train_step(config):
  """The pure `train_step(state, batch) -> (state, metrics)` of this config (not yet jitted).

  batch: 'image' uint8 [B, H, W, 3] (zero padded canvas), 'image_size' int32 [B, 2],
  'labels' int32 [B, N], 'masks' uint8 [B, N, H, W], 'valid' bool [B, N].
  """
  model = Mask2Former(ModelConfig.from_config(config.model))
  loss_config = criterion.LossConfig.from_config(config.loss)
  tx = make_optimizer(config.optim)
  schedule = learning_rate_schedule(config.optim)
  base_key = jax.random.PRNGKey(config.seed)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    # Randomness is a function of (seed, step) only, so a resumed run repeats it exactly.
    key = jax.random.fold_in(base_key, state.step)
    loss_key, dropout_key = jax.random.split(key)

    def loss_fn(params, part, whole):   # whole: see optim.value_and_grad (None: all the batch)
      images = ops.normalize(part['image'], part['image_size'], config.data.mean, config.data.std)
      targets = {k: part[k] for k in ('labels', 'masks', 'valid')}
      rng, extra = ((dropout_key, {}) if whole is None else
                    (jax.random.fold_in(dropout_key, whole.index), {'whole': whole}))
      outputs = model.apply({'params': params, 'frozen': state.frozen}, images, train=True,
                            rngs={'dropout': rng})
      return reid.training_loss(outputs, targets, loss_key, loss_config, config, **extra)

    (loss, terms), grads = optim.value_and_grad(
        loss_fn, state.params, batch, config.optim.get('accumulate_steps', 1),
        config.model.num_queries, loss_config)
    grad_norm = optax.global_norm(grads)

    def update():
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return state.replace(step=state.step + 1, opt_state=opt_state,
                           params=reid.apply_updates(config, state.params, updates))

    # A non-finite loss or gradient leaves the state as it was: the loop then stops with an error,
    # and no checkpoint can hold the poisoned parameters. (A cond, not a select over every leaf,
    # which would copy every parameter each step.)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.lax.cond(finite, update, lambda: state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'num_masks': jnp.sum(batch['valid'])}
    metrics.update({k: terms[k] for k in reid.LOGGED if k in terms})
    return new, metrics
  return train_step


class Trainer:
  """The jitted, sharded train step and state of one config on one mesh."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = make_mesh(config.mesh) if mesh is None else mesh
    key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(lambda: create_train_state(config, key))
    self.state_sharding = state_shardings(abstract, self.mesh, config.mesh.fsdp)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
        self.state_sharding)
    self.batch_sharding = batch_sharding(self.mesh)
    self.step = jax.jit(make_train_step(config), in_shardings=(self.state_sharding, None),
                        out_shardings=(self.state_sharding, None), donate_argnums=0)

  def init_state(self) -> TrainState:
    """Random state built on device with the state shardings; then, with `config.init.checkpoint`,
    the pretrained weights replace params/frozen. They are read on the host and placed shard by
    shard: loaded inside `jit` they would become compile-time constants (slow compiles, the whole
    model held twice). The optimizer state does not depend on the values (AdamW starts at zero)."""
    key = jax.random.PRNGKey(self.config.seed)
    state = jax.jit(lambda: create_train_state(self.config, key),
                    out_shardings=self.state_sharding)()
    if not self.config.init.checkpoint:
      return state
    # Shapes only: the random arrays may be sharded over other processes (FSDP on a pod).
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        {'params': state.params, 'frozen': state.frozen})
    loaded = load_init_variables(self.config, like)

    def place(x, current):  # a kept random leaf stays where it is
      if isinstance(x, jax.ShapeDtypeStruct):
        return current
      return jax.make_array_from_callback(x.shape, current.sharding, lambda index: x[index])

    return state.replace(params=jax.tree.map(place, loaded['params'], state.params),
                         frozen=jax.tree.map(place, loaded['frozen'], state.frozen))

  def global_batch(self, local: dict) -> dict:
    """This process's rows of the batch -> global arrays sharded over 'data', the target slots cut
    to `slot_count` (the same count on every process)."""
    local = {k: np.asarray(v) for k, v in local.items()}
    multiple = self.config.data.get('slot_multiple', 0)
    if multiple and 'valid' in local:
      used = used_slots(local['valid'])
      if jax.process_count() > 1:   # every process must build the same global shape
        used = int(np.max(multihost_utils.process_allgather(np.array([used], np.int32))))
      slots = slot_count(used, local['valid'].shape[1], multiple)
      local.update({k: local[k][:, :slots] for k in ('labels', 'masks', 'valid')})
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}


def used_slots(valid: np.ndarray) -> int:
  """1 + the last target slot that any image of the batch uses (0 if none); valid: [b, N] bool."""
  columns = np.flatnonzero(np.asarray(valid).any(axis=0))
  return int(columns[-1]) + 1 if columns.size else 0


def slot_count(used: int, max_slots: int, multiple: int) -> int:
  """The target slots a step keeps: `used` rounded up to `multiple`, at least one, at most N.

  Slots past the last real instance only add work: the loss of a padded slot is 0, and the
  random points of a slot do not depend on the number of slots (criterion._uniform_per_slot), so
  the loss and gradients equal those of all N slots (up to float summation order). The step then
  compiles once per distinct count: at most ceil(N / multiple) times.
  """
  return min(max_slots, max(1, -(-used // multiple)) * multiple)


# ---------------------------------------------------------------------------------------------
# The loop.


def evaluate_state(config, state: TrainState, mesh, dataset) -> dict | None:
  """MinVIS with the state's variables on `config.eval`'s videos of `dataset`: the metrics on
  process 0 (None elsewhere). Every process calls it (collectives). The variables are gathered
  replicated over the training mesh (they may be FSDP-sharded over processes) and handed to the
  predictor as host arrays, as a checkpoint would be."""
  variables = jax.jit(lambda s: {'params': s.params, 'frozen': s.frozen},
                      out_shardings=NamedSharding(mesh, P()))(state)
  variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
  return evaluate.score(config, variables, dataset, config.eval.max_videos)[1]


def _compile_everywhere(trainer: Trainer, state: TrainState, batch: dict):
  """Compiles the step, then waits for every process: a peer that reaches the first collective
  more than gloo's 30 s after the others (a slower compile) would otherwise fail the run. They
  wait at the coordination service's barrier: a device collective would hit that timeout itself."""
  start = time.perf_counter()
  compiled = trainer.step.lower(state, batch).compile()
  slots = batch['valid'].shape[1]
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f'minvis_train_step_compiled_{slots}',
                                        timeout_ms=3_600_000)
  if jax.process_index() == 0:
    print(f'compiled the train step for {slots} target slots in '
          f'{time.perf_counter() - start:.0f} s', flush=True)
  return compiled


@jax.jit
def _note_non_finite(record: dict, metrics: dict, step: jax.Array) -> dict:
  """`record` {'step', 'loss', 'grad_norm'} (step -1: none yet) keeps the first step whose loss or
  gradient norm is not finite; on the device, so the loop needs no host sync per step."""
  bad = ~(jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']))
  first = bad & (record['step'] < 0)
  new = {'step': jnp.asarray(step, jnp.int32), 'loss': metrics['loss'],
         'grad_norm': metrics['grad_norm']}
  return jax.tree.map(lambda n, o: jnp.where(first, n, o), new, record)


def _raise_if_non_finite(record: dict, workdir: str, saved_step: int | None) -> None:
  """NonFiniteLossError if a step since the start had a non-finite loss: called before every save,
  so no checkpoint holds a state after it (the step itself left the state unchanged)."""
  record = jax.device_get(record)
  if record['step'] < 0:
    return
  step = int(record['step'])
  raise NonFiniteLossError(
      f'non-finite loss {float(record["loss"])} (grad norm {float(record["grad_norm"])}) at step '
      f'{step + 1}; the update was not applied and nothing after step {step} was saved (latest '
      f'checkpoint in {workdir}: {saved_step}). Lower config.optim.lr or check the input data.')


def _check_arguments(config: ml_collections.ConfigDict, total_steps: int | None) -> int:
  """The run's last step; ValueError for a bad config or step count (before any work)."""
  config_lib.validate(config)
  total_steps = config.total_steps if total_steps is None else total_steps
  if not isinstance(total_steps, int) or total_steps < 0:
    raise ValueError(f'total_steps={total_steps!r}: expected an integer >= 0')
  if config.batch_size % jax.device_count() and config.mesh.data == -1:
    raise ValueError(f'config.batch_size={config.batch_size} is not a multiple of the '
                     f'{jax.device_count()} devices')
  return total_steps


def _eval_dataset(config: ml_collections.ConfigDict, start: int, total_steps: int):
  """The split evaluated during training, loaded now (not at the first evaluation hours later);
  None when no evaluation step lies in (start, total_steps]."""
  eval_every = (config.get('eval') or {}).get('every_steps', 0)
  if not eval_every or total_steps // eval_every <= start // eval_every:
    return None
  try:
    return evaluate.load_dataset(config, config.eval.split)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f'config.eval.every_steps={eval_every}: {e} (set eval.every_steps=0 to train '
                  'without evaluation)') from None


def train(config: ml_collections.ConfigDict, workdir: str,
          input_fn: Callable[[int], Iterator[dict]] | None = None,
          total_steps: int | None = None) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

  input_fn(start_step) -> iterator of this process's batches (numpy dicts) for steps start_step,
  ...; defaults to the frame-level pipeline of `config.data`. An error of the input ends the run
  with that error; SIGTERM saves (if anything is new) and returns, also while waiting for input.
  """
  total_steps = _check_arguments(config, total_steps)
  paths.makedirs(workdir)
  if jax.process_index() == 0:
    saved = config.copy_and_resolve_references()
    saved.total_steps = total_steps   # the run's real last step (read by `evaluate --watch`)
    checkpoints.save_config(workdir, saved)
  saved_step = (checkpoints.finished_steps(workdir) or [None])[-1]
  start = saved_step or 0
  eval_data = _eval_dataset(config, start, total_steps)
  if input_fn is None:
    def input_fn(start_step):
      return reid.train_iterator(config, start_step, jax.process_index(), jax.process_count())
  manager = checkpoints.checkpoint_manager(workdir, config.checkpoint.keep)
  writer = metrics_writer.MetricWriter(paths.join(workdir, 'metrics.jsonl'),
                                       paths.join(workdir, 'tensorboard'),
                                       jax.process_index() == 0)
  preemption = preemption_lib.Preemption()
  try:
    # The first batch comes before the model: bad input data fails in seconds, not after the
    # restore and the compile, and the input threads work meanwhile.
    batches = input_fn(start)
    pending = [] if start >= total_steps else [
        preemption_lib.next_input(batches, preemption, start)]
    trainer = Trainer(config)
    if saved_step is not None:
      state = checkpoints.restore_state(manager, trainer.abstract_state, saved_step)
      logging.info('resumed from %s at step %d', workdir, start)
    else:
      state = trainer.init_state()
    if jax.process_index() == 0:
      print(f'training {workdir}: steps {start} -> {total_steps}, global batch '
            f'{config.batch_size} ({config.batch_size // jax.process_count()} per process), mesh '
            f'{dict(trainer.mesh.shape)}, {jax.device_count()} devices', flush=True)
    state, step = _loop(config, workdir, trainer, state, start, total_steps, batches, pending,
                        manager, writer, preemption, eval_data)
    print(f'process {jax.process_index()}: finished at step {step}, parameter fingerprint '
          f'{fingerprint(state.params)}', flush=True)
  finally:
    try:
      manager.wait_until_finished()   # raises the error of a failed asynchronous save
    finally:   # closed also then: its threads would otherwise keep the process alive
      manager.close()
      writer.close()
      preemption.restore()
  return state


def _loop(config, workdir, trainer, state, step, total_steps, batches, pending, manager, writer,
          preemption: preemption_lib.Preemption, eval_data) -> tuple[TrainState, int]:
  """Steps from `step` to `total_steps` (or SIGTERM): (final state, its step). The step is a host
  integer; metrics stay on the device and are fetched on log steps only (`config.log_every`, the
  last step, a stop), with the rates over the interval since the previous row. A non-finite step
  is noted on the device and raised before the next save or log row."""
  saved_step = step if step else None
  eval_every = (config.get('eval') or {}).get('every_steps', 0)
  step_fns = {}   # target slot count -> compiled step
  non_finite = {'step': np.int32(-1), 'loss': np.float32(0), 'grad_norm': np.float32(0)}
  in_flight = None   # the previous step's metrics
  while step < total_steps:
    local = pending.pop() if pending else preemption_lib.next_input(batches, preemption, step)
    if local is preemption_lib.INTERRUPTED:
      if step != saved_step:
        _raise_if_non_finite(non_finite, workdir, saved_step)
      _save_on_input_interrupt(manager, state, step, saved_step)
      break
    batch = trainer.global_batch(local)
    slots = batch['valid'].shape[1]
    if slots not in step_fns:   # the first step, or a new target slot count
      step_fns[slots] = _compile_everywhere(trainer, state, batch)
      tick, tick_step = time.perf_counter(), step
    # On CPU the previous step must be done before the next is dispatched: a step dispatched early
    # takes its buffers at once, and two steps' temporaries would coexist in host memory. An
    # accelerator queues steps (nothing is fetched or awaited between log steps).
    if waits_for_each_step(trainer.mesh):
      jax.block_until_ready(in_flight)
    state, metrics = step_fns[slots](state, batch)
    non_finite = _note_non_finite(non_finite, metrics, step)
    in_flight = metrics
    step += 1
    stop = preemption.agreed()
    save = step % config.checkpoint.every_steps == 0 or step == total_steps or stop
    log = step % config.log_every == 0 or step == total_steps or stop
    if save or log:   # before this state can be saved or its metrics logged
      _raise_if_non_finite(non_finite, workdir, saved_step)
    if log:
      row = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      rate = (step - tick_step) / max(now - tick, 1e-9)
      tick, tick_step = now, step
      row.update(steps_per_s=rate, images_per_s=rate * config.batch_size)
      writer.write(step, row, echo=True, tb_prefix='train/')
    if save:
      checkpoints.save_state(manager, state, step)
      saved_step = step
    if eval_data is not None and step % eval_every == 0 and not stop:   # preempted: exit now
      eval_metrics = evaluate_state(config, state, trainer.mesh, eval_data)
      if eval_metrics is not None:
        writer.write(step, evaluate.eval_scalars(eval_metrics), echo=True, tb_prefix='')
      tick, tick_step = time.perf_counter(), step   # evaluation time is not training throughput
    if stop:
      logging.warning('SIGTERM: saved step %d, exiting', step)
      break
  return state, step


def waits_for_each_step(mesh) -> bool:
  return mesh.devices.flat[0].platform == 'cpu'


def _save_on_input_interrupt(manager, state: TrainState, step: int, saved_step: int | None) -> None:
  """SIGTERM while waiting for input (one process): saves the state of `step` if it is newer than
  the last checkpoint."""
  if step > 0 and step != saved_step:
    checkpoints.save_state(manager, state, step)
    logging.warning('SIGTERM while waiting for input: saved step %d, exiting', step)
  else:
    logging.warning('SIGTERM while waiting for input: nothing new since step %s, exiting',
                    saved_step)


def fingerprint(tree) -> str:
  """sha256 of this process's copy of replicated arrays: equal across processes iff equal."""
  digest = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    digest.update(np.ascontiguousarray(x.addressable_data(0)).tobytes())
  return digest.hexdigest()[:16]
