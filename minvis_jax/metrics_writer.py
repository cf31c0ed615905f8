"""Files a run writes as it goes: metric rows (JSON lines + TensorBoard) and atomic JSON files."""

import json
import tempfile

from minvis_jax import paths


def write_json(path: str, obj, indent: int | None = None) -> None:
  """Writes `obj` as JSON to `path` atomically: readers see the old file or the whole new one
  (a local path or a URL: paths.write_atomic)."""
  paths.write_atomic(path, json.dumps(obj, indent=indent))


class MetricWriter:
  """Appends {'step', **metrics} rows to a JSON-lines file and TensorBoard scalars to an event
  directory; only an `active` writer (process 0) writes anything.

  Each writer needs an event directory of its own: TensorBoard stops reading older event files of
  a directory once a newer one appears, so two writers (trainer, watcher) must not share one.
  """

  def __init__(self, jsonl_path: str, tensorboard_dir: str, active: bool, fsync: bool = False):
    self.active = active
    self._fsync = fsync
    self._tb = None
    self._jsonl = None
    if active:
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy import, process 0 only)
      self._jsonl = paths.Appender(jsonl_path)
      # A bucket's events are written locally and uploaded whole (tensorboardX's own gs:// writer
      # uploads again when garbage-collected, long after the run).
      self._tb_remote = tensorboard_dir if paths.is_remote(tensorboard_dir) else None
      self._tb_local = tempfile.TemporaryDirectory() if self._tb_remote else None
      self._tb = SummaryWriter(self._tb_local.name if self._tb_local else tensorboard_dir)

  def write(self, step: int, metrics: dict, echo: bool = False, tb_prefix: str = '') -> None:
    """One row at `step`; TensorBoard tags are `tb_prefix + key`; `echo` also prints it."""
    if not self.active:
      return
    self._jsonl.append(json.dumps({'step': step, **metrics}) + '\n', fsync=self._fsync)
    for k, v in metrics.items():
      self._tb.add_scalar(f'{tb_prefix}{k}', v, step)
    if self._fsync or self._tb_remote:   # rows another process waits for (the watcher's), or
      # a bucket's (a preempted worker loses nothing logged): stored before returning
      self._tb.flush()
      self._upload_events()
    if echo:
      print(f'step {step:6d} | ' + ' '.join(
          f'{k} {v:.4g}' for k, v in metrics.items()), flush=True)

  def _upload_events(self) -> None:
    if self._tb_local is not None:
      for name in paths.listdir(self._tb_local.name):
        with paths.open(paths.join(self._tb_local.name, name), 'rb') as f:
          paths.write_atomic(paths.join(self._tb_remote, name), f.read())

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._upload_events()
      self._jsonl.close()
      if self._tb_local is not None:
        self._tb_local.cleanup()
