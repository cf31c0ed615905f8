"""Files a run writes as it goes: metric rows (JSON lines + TensorBoard) and atomic JSON files;
progress lines on stdout."""

import contextlib
import json
import logging
import os
import sys


def write_json(path: str, obj, indent: int | None = None) -> None:
  """Writes `obj` as JSON to `path` atomically: readers see the old file or the whole new one."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=indent)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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
      os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
      self._tb = SummaryWriter(tensorboard_dir)
      self._jsonl = open(jsonl_path, 'a')

  def write(self, step: int, metrics: dict, echo: bool = False, tb_prefix: str = '') -> None:
    """One row at `step`; TensorBoard tags are `tb_prefix + key`; `echo` also prints it."""
    if not self.active:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f'{tb_prefix}{k}', v, step)
    if self._fsync:   # rows another process waits for (the watcher's): on disk before returning
      os.fsync(self._jsonl.fileno())
      self._tb.flush()
    if echo:
      print(f'step {step:6d} | ' + ' '.join(
          f'{k} {v:.4g}' for k, v in metrics.items()), flush=True)

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


@contextlib.contextmanager
def progress_on_stdout(logger: logging.Logger):
  """`logger`'s INFO lines on stdout, with their time, while the block runs (absl keeps the root
  logger at WARNING; propagating would print them twice)."""
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
  level, propagate = logger.level, logger.propagate
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
