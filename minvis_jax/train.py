"""Frame-level Mask2Former training (SPEC 3, 4): optimizer, sharded train step, loop, checkpoints.

  minvis-jax train --config configs/tiny.py --workdir /tmp/tiny [--distributed]

One code path for one CPU, fake CPU devices, several processes and TPU pods: a ('data', 'model')
`Mesh` from the config, `jax.jit` with shardings, batches assembled from each process's shard with
`jax.make_array_from_process_local_data`. The work directory holds `config.json`, orbax checkpoints
(`checkpoints/<step>/{variables,train}`), `metrics.jsonl` and TensorBoard event files.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from typing import Any

import flax
import jax
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
from minvis_jax import metrics_writer
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array           # int32 scalar: number of updates applied
  params: Any               # trainable model parameters
  frozen: Any               # frozen BatchNorm statistics (never updated)
  opt_state: Any


class NonFiniteLossError(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------
# Optimizer (SPEC 4).


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', str(k)) for k in path)


def decay_mask(params):
  """True where weight decay applies: conv and dense kernels only (no norms, embeddings, biases)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] == 'kernel', params)


def param_groups(params):
  """'backbone' or 'head' for every leaf (the backbone trains at lr * backbone_lr_mult)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 'backbone' if _path_names(p)[0] == 'backbone' else 'head', params)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then x `decay_factor` at each of `decay_steps`."""
  boundaries = jnp.asarray(sorted(optim.decay_steps) or [np.iinfo(np.int32).max])

  def schedule(step):
    decays = jnp.sum(step >= boundaries) if optim.decay_steps else 0
    lr = optim.lr * optim.decay_factor ** decays
    if optim.warmup_steps:
      lr = lr * jnp.minimum(1.0, (step + 1) / optim.warmup_steps)
    return lr
  return schedule


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping of all parameters, then AdamW per group (backbone at a reduced lr)."""
  schedule = learning_rate_schedule(optim)

  def adamw(mult):
    return optax.adamw(lambda step: schedule(step) * mult, b1=optim.b1, b2=optim.b2,
                       weight_decay=optim.weight_decay, mask=decay_mask)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
      optax.multi_transform({'backbone': adamw(optim.backbone_lr_mult), 'head': adamw(1.0)},
                            param_groups))


# ---------------------------------------------------------------------------------------------
# Mesh and shardings.


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over all devices; data = -1 takes what the model axis leaves."""
  model = mesh_config.model
  if devices is None:
    devices = jax.devices()
    if mesh_config.data != -1:   # an explicit size may use a leading subset of the devices
      devices = devices[:mesh_config.data * model]
  devices = list(devices)
  data = mesh_config.data if mesh_config.data != -1 else len(devices) // model
  if data * model != len(devices):
    raise ValueError(f'config.mesh: data={mesh_config.data} x model={model} does not cover '
                     f'{len(devices)} devices')
  return jax.make_mesh((data, model), ('data', 'model'), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


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
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)  # noqa: E731
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = shapes(like), shapes(loaded)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:5]
    raise ValueError(f'{config.init.checkpoint}: variables do not match config.model (first '
                     f'differences: {diff}); convert the checkpoint with the same model config')
  return loaded


def create_train_state(config, key) -> TrainState:
  """Random initial state (traced); `Trainer.init_state` puts the init checkpoint in afterwards."""
  variables = init_variables(config, key)
  tx = make_optimizer(config.optim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    frozen=variables.get('frozen', {}), opt_state=tx.init(variables['params']))


def normalize_images(images: jax.Array, image_size: jax.Array, mean, std) -> jax.Array:
  """uint8 [B, H, W, 3] + valid (h, w) [B, 2] -> float32, normalised, zero outside the image."""
  h, w = images.shape[1:3]
  inside = ((jnp.arange(h)[None, :, None] < image_size[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < image_size[:, 1, None, None]))
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return jnp.where(inside[..., None], x, 0.0)


def make_train_step(config):
  """The pure `train_step(state, batch) -> (state, metrics)` of this config (not yet jitted).

  batch: 'image' uint8 [B, H, W, 3] (zero padded canvas), 'image_size' int32 [B, 2],
  'labels' int32 [B, N], 'masks' uint8 [B, N, H, W], 'valid' bool [B, N].
  """
  model = Mask2Former(ModelConfig.from_config(config.model))
  tx = make_optimizer(config.optim)
  schedule = learning_rate_schedule(config.optim)
  base_key = jax.random.PRNGKey(config.seed)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    # Randomness is a function of (seed, step) only, so a resumed run repeats it exactly.
    key = jax.random.fold_in(base_key, state.step)
    loss_key, dropout_key = jax.random.split(key)
    images = normalize_images(batch['image'], batch['image_size'], config.data.mean,
                              config.data.std)
    targets = {k: batch[k] for k in ('labels', 'masks', 'valid')}

    def loss_fn(params):
      outputs = model.apply({'params': params, 'frozen': state.frozen}, images, train=True,
                            rngs={'dropout': dropout_key})
      return criterion.set_criterion(outputs, targets, loss_key, config.loss)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)

    def update():
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)

    # A non-finite loss or gradient leaves the state as it was: the loop then stops with an error,
    # and no checkpoint can hold the poisoned parameters. (A cond, not a select over every leaf:
    # ~50 ms less a step for R50 on CPU.)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.lax.cond(finite, update, lambda: state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'num_masks': jnp.sum(batch['valid'])}
    metrics.update({k: terms[k] for k in ('loss_ce', 'loss_mask', 'loss_dice')})
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
        from jax.experimental import multihost_utils  # noqa: PLC0415
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
# Checkpoints: orbax CheckpointManager, two items so evaluation can read the variables alone.


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Steps `checkpoints/<step>/{variables,train,checksums}`; orbax writes each step to a
  `<step>.orbax-checkpoint-tmp-*` directory and renames it when complete, so a run killed during a
  save leaves only that temporary directory, which restore never considers."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep,
                                         enable_async_checkpointing=True, create=True)
  handlers = {'variables': ocp.StandardCheckpointHandler(),
              'train': ocp.StandardCheckpointHandler(),
              checkpoints.MANIFEST_ITEM: ocp.JsonCheckpointHandler(checkpoints.MANIFEST_FILE)}
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), checkpoints.CHECKPOINT_SUBDIR), options=options,
      item_handlers=handlers)


def _items(state: TrainState) -> dict:
  return {'variables': {'params': state.params, 'frozen': state.frozen},
          'train': {'step': state.step, 'opt_state': state.opt_state}}


def save_state(manager: ocp.CheckpointManager, state: TrainState) -> None:
  """Saves asynchronously, with the checksums of every array (computed now, before the next step
  donates the state's buffers)."""
  items = _items(state)
  manager.save(int(state.step), args=ocp.args.Composite(
      variables=ocp.args.StandardSave(items['variables']),
      train=ocp.args.StandardSave(items['train']),
      **{checkpoints.MANIFEST_ITEM: ocp.args.JsonSave(checkpoints.manifest(items))}))


def restore_state(manager: ocp.CheckpointManager, abstract_state: TrainState,
                  step: int | None = None) -> TrainState:
  """Restores a checkpoint onto the shardings of `abstract_state` (any mesh), verified against its
  checksums; a corrupt or unreadable step raises CheckpointError naming it and the array."""
  step = manager.latest_step() if step is None else step
  step_dir = os.path.join(str(manager.directory), str(step))
  a = _items(abstract_state)
  manifest_file = os.path.join(step_dir, checkpoints.MANIFEST_ITEM, checkpoints.MANIFEST_FILE)
  expected = checkpoints.read_manifest(manifest_file)
  if expected is not None:   # a resume with another model or optimizer: say so before reading
    for item in ('variables', 'train'):
      checkpoints.check_shapes(os.path.join(step_dir, item), a[item], expected.get(item, {}),
                               ' (config.model / config.optim differ from the run that saved it)')
  try:
    with checkpoints.reading(step_dir):
      restored = manager.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(a['variables']),
          train=ocp.args.StandardRestore(a['train'])))
    for item in ('variables', 'train'):
      checkpoints.verify(os.path.join(step_dir, item), restored[item],
                         None if expected is None else expected.get(item, {}), manifest_file)
  except checkpoints.CheckpointError as e:
    raise checkpoints.CheckpointError(
        f'{e}. Move {step_dir} away to resume from the checkpoint before it.') from None
  v, t = restored['variables'], restored['train']
  return TrainState(step=t['step'], params=v['params'], frozen=v['frozen'],
                    opt_state=t['opt_state'])


# ---------------------------------------------------------------------------------------------
# The loop.


class _InputInterrupted(Exception):
  """SIGTERM arrived while the loop was blocked waiting for a batch."""


class _Preemption:
  """Records SIGTERM so the loop can save and exit cleanly between two steps.

  A loop blocked on its input (a slow or stuck reader) never reaches the check between steps, so
  while it waits (`interruptible_wait`) the handler raises instead of only recording the request.
  Only with one process: with several, one that left on its own would leave the others blocked in
  the next collective, so they all stop together between steps (`agreed`).
  """

  def __init__(self):
    self.requested = False
    self._waiting = False
    self._interruptible = jax.process_count() == 1
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if self._waiting:
      self._waiting = False
      raise _InputInterrupted()

  @contextlib.contextmanager
  def interruptible_wait(self):
    if not self._interruptible:
      yield
      return
    if self.requested:
      raise _InputInterrupted()
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def agreed(self) -> bool:
    """True on every process once any process got SIGTERM."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def evaluate_state(config, state: TrainState, mesh, dataset) -> dict | None:
  """MinVIS with the state's variables on `config.eval`'s videos of `dataset`: the metrics on
  process 0 (None elsewhere). Every process calls it (collectives). The variables are gathered
  replicated over the training mesh (they may be FSDP-sharded over processes) and handed to the
  predictor as host arrays, as a checkpoint would be."""
  from minvis_jax import watch  # noqa: PLC0415
  variables = jax.jit(lambda s: {'params': s.params, 'frozen': s.frozen},
                      out_shardings=NamedSharding(mesh, P()))(state)
  variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
  return watch.score(config, variables, dataset, config.eval.max_videos)[1]


def _compile_everywhere(trainer: Trainer, state: TrainState, batch: dict):
  """Compiles the step, then waits for every process: a peer that reaches the first collective
  more than gloo's 30 s after the others (a slower compile) would otherwise fail the run."""
  start = time.perf_counter()
  compiled = trainer.step.lower(state, batch).compile()
  slots = batch['valid'].shape[1]
  if jax.process_count() > 1:
    from jax._src import distributed  # noqa: PLC0415  (the coordination-service barrier)
    distributed.global_state.client.wait_at_barrier(f'minvis_train_step_compiled_{slots}',
                                                    3_600_000)
  if jax.process_index() == 0:
    print(f'compiled the train step for {slots} target slots in '
          f'{time.perf_counter() - start:.0f} s', flush=True)
  return compiled


def train(config, workdir: str, input_fn=None, total_steps: int | None = None) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

  input_fn(start_step) -> iterator of this process's batches (numpy dicts) for steps start_step,
  ...; defaults to the frame-level pipeline of `config.data`. An error of the input ends the run
  with that error; SIGTERM saves (if anything is new) and returns, also while waiting for input.
  """
  config_lib.validate(config)
  total_steps = config.total_steps if total_steps is None else total_steps
  if not isinstance(total_steps, int) or total_steps < 0:
    raise ValueError(f'total_steps={total_steps!r}: expected an integer >= 0')
  local_batch = config.batch_size // jax.process_count()
  if config.batch_size % jax.device_count() and config.mesh.data == -1:
    raise ValueError(f'config.batch_size={config.batch_size} is not a multiple of the '
                     f'{jax.device_count()} devices')
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    saved = config.copy_and_resolve_references()
    saved.total_steps = total_steps   # the run's real last step (read by `evaluate --watch`)
    checkpoints.save_config(workdir, saved)
  manager = checkpoint_manager(workdir, config)
  saved_step = manager.latest_step()
  start = saved_step or 0
  eval_every = (config.get('eval') or {}).get('every_steps', 0)
  eval_data = None
  if eval_every and total_steps // eval_every > start // eval_every:   # an eval step lies ahead
    from minvis_jax import watch  # noqa: PLC0415
    try:   # at the start, not at the first evaluation hours later
      eval_data = watch.load_dataset(config, config.eval.split)
    except (FileNotFoundError, ValueError) as e:
      manager.close()
      raise type(e)(f'config.eval.every_steps={eval_every}: {e} (set eval.every_steps=0 to train '
                    'without evaluation)') from None
  if input_fn is None:
    from minvis_jax.data import input_pipeline  # noqa: PLC0415
    def input_fn(start_step):
      return input_pipeline.train_iterator(config, start_step, jax.process_index(),
                                           jax.process_count())
  writer = metrics_writer.MetricWriter(os.path.join(workdir, 'metrics.jsonl'),
                                       os.path.join(workdir, 'tensorboard'),
                                       jax.process_index() == 0)
  preemption = _Preemption()
  try:
    # The first batch comes before the model: bad input data fails in seconds, not after the
    # restore and the compile, and the input threads work meanwhile.
    batches = input_fn(start)
    pending = [_next_input(batches, preemption, start)] if start < total_steps else []
    trainer = Trainer(config)
    if saved_step is not None:
      state = restore_state(manager, trainer.abstract_state)
      logging.info('resumed from %s at step %d', workdir, int(state.step))
    else:
      state = trainer.init_state()
    if jax.process_index() == 0:
      print(f'training {workdir}: steps {start} -> {total_steps}, global batch '
            f'{config.batch_size} ({local_batch} per process), mesh {dict(trainer.mesh.shape)}, '
            f'{jax.device_count()} devices', flush=True)
    step_fns = {}   # target slot count -> compiled step
    while int(state.step) < total_steps:
      local = pending.pop() if pending else _next_input(batches, preemption, int(state.step))
      if local is _INTERRUPTED:
        saved_step = _save_on_input_interrupt(manager, state, saved_step)
        break
      batch = trainer.global_batch(local)
      slots = batch['valid'].shape[1]
      if slots not in step_fns:   # the first step, or a new target slot count
        step_fns[slots] = _compile_everywhere(trainer, state, batch)
        tick, tick_step = time.perf_counter(), int(state.step)
      state, metrics = step_fns[slots](state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      step = int(state.step)
      if not (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])):
        # Stop before this state can reach a checkpoint.
        raise NonFiniteLossError(
            f'non-finite loss {metrics["loss"]} (grad norm {metrics["grad_norm"]}) at step '
            f'{step + 1}; the update was not applied and nothing after step {step} was saved '
            f'(latest checkpoint in {workdir}: {manager.latest_step()}). Lower config.optim.lr or '
            'check the input data.')
      now = time.perf_counter()
      rate = (step - tick_step) / max(now - tick, 1e-9)
      tick, tick_step = now, step
      metrics.update(steps_per_s=rate, images_per_s=rate * config.batch_size)
      writer.write(step, metrics, echo=step % config.log_every == 0 or step == total_steps,
                   tb_prefix='train/')
      stop = preemption.agreed()
      if step % config.checkpoint.every_steps == 0 or step == total_steps or stop:
        save_state(manager, state)
        saved_step = step
      if eval_data is not None and step % eval_every == 0 and not stop:   # preempted: exit now
        eval_metrics = evaluate_state(config, state, trainer.mesh, eval_data)
        if eval_metrics is not None:
          writer.write(step, watch.eval_scalars(eval_metrics), echo=True, tb_prefix='')
        tick = time.perf_counter()   # evaluation time is not training throughput
      if stop:
        logging.warning('SIGTERM: saved step %d, exiting', step)
        break
    print(f'process {jax.process_index()}: finished at step {int(state.step)}, parameter '
          f'fingerprint {fingerprint(state.params)}', flush=True)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    preemption.restore()
  return state


_INTERRUPTED = object()


def _next_input(batches, preemption: _Preemption, step: int):
  """The next local batch; _INTERRUPTED on SIGTERM while waiting; an input error gets a note."""
  try:
    with preemption.interruptible_wait():
      return next(batches)
  except _InputInterrupted:
    return _INTERRUPTED
  except Exception as e:
    e.add_note(f'(while reading the input batch of step {step + 1})')
    raise


def _save_on_input_interrupt(manager, state: TrainState, saved_step: int | None) -> int | None:
  """SIGTERM while waiting for input (one process): saves the state if it is newer than the last
  checkpoint; returns the latest saved step."""
  step = int(state.step)
  if step > 0 and step != saved_step:
    save_state(manager, state)
    logging.warning('SIGTERM while waiting for input: saved step %d, exiting', step)
    return step
  logging.warning('SIGTERM while waiting for input: nothing new since step %s, exiting', saved_step)
  return saved_step


def fingerprint(tree) -> str:
  """sha256 of this process's copy of replicated arrays: equal across processes iff bitwise
  equal."""
  digest = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    digest.update(np.ascontiguousarray(x.addressable_data(0)).tobytes())
  return digest.hexdigest()[:16]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=(argv or ['minvis-jax train'])[0],
                                   description='Train Mask2Former on frames for MinVIS.')
  parser.add_argument('--config', required=True, help='config name[:arg] or file, e.g. tiny')
  parser.add_argument('--workdir', required=True, help='checkpoints, logs; resumes if present')
  parser.add_argument('--total_steps', type=int, default=None, help='override config.total_steps')
  parser.add_argument('--distributed', action='store_true',
                      help='jax.distributed.initialize() (TPU pods, SLURM, local processes)')
  parser.add_argument('--coordinator', default=None, help='host:port for --distributed')
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override a config value, e.g. --set batch_size=16 (repeatable)')
  args = parser.parse_args((argv or [None])[1:])
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  if args.distributed:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, args.set)
  train(config, args.workdir, total_steps=args.total_steps)
  return 0


def initialize_distributed(coordinator=None, num_processes=None, process_id=None) -> None:
  """jax.distributed with auto-detection (TPU, SLURM) or explicit values (local processes)."""
  if 'cpu' in os.environ.get('JAX_PLATFORMS', ''):
    # Many back-to-back CPU collectives under async dispatch can deadlock in gloo (SPEC 7).
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  jax.distributed.initialize(coordinator, num_processes, process_id)
