"""Files a run writes as it goes: metric rows (JSON lines + TensorBoard) and atomic JSON files."""

import json

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
      self._tb = SummaryWriter(tensorboard_dir)

  def write(self, step: int, metrics: dict, echo: bool = False, tb_prefix: str = '') -> None:
    """One row at `step`; TensorBoard tags are `tb_prefix + key`; `echo` also prints it."""
    if not self.active:
      return
    self._jsonl.append(json.dumps({'step': step, **metrics}) + '\n', fsync=self._fsync)
    for k, v in metrics.items():
      self._tb.add_scalar(f'{tb_prefix}{k}', v, step)
    if self._fsync:   # rows another process waits for (the watcher's): on disk before returning
      self._tb.flush()
    if echo:
      print(f'step {step:6d} | ' + ' '.join(
          f'{k} {v:.4g}' for k, v in metrics.items()), flush=True)

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()
