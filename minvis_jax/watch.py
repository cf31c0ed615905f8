"""The checkpoint watcher (`minvis-jax evaluate --watch WORKDIR`): scores each finished checkpoint
of a training run once, while it trains, with `evaluate.score`.

The watcher's outputs, beside the trainer's:
  WORKDIR/eval.jsonl          one line per evaluated step: {'step', 'eval/AP', 'eval/AP50', ...}
  WORKDIR/tensorboard/eval/   the same scalars, tagged eval/*, at their step
  OUT/<step>/results.json, metrics.json    (OUT defaults to WORKDIR/eval)
  OUT/best.json               the line of eval.jsonl with the best AP so far
"""

import json
import logging
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from minvis_jax import checkpoints
from minvis_jax import evaluate
from minvis_jax import metrics_writer
from minvis_jax import paths

log = logging.getLogger(__name__)   # the command layer shows it (absl keeps the root at WARNING)

EVAL_JSONL = 'eval.jsonl'
BEST_FILE = 'best.json'


def read_eval_rows(path: str) -> list[dict]:
  """The lines of an eval.jsonl. An unterminated last line (a watcher killed while writing it) is
  dropped from the file, so the next append starts on a line of its own."""
  if not paths.exists(path):
    return []
  try:
    with paths.open(path, 'rb') as f:
      text = f.read().decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason}); move the file away to '
                     f'evaluate every step again') from None
  if text and not text.endswith('\n'):
    log.warning('%s: dropping an unfinished last line %r', path, text.rsplit('\n', 1)[-1][:80])
    text = text[:text.rfind('\n') + 1]
    paths.write_atomic(path, text)
  rows = []
  for i, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: line {i + 1} is not JSON ({e})') from None
    if not isinstance(row, dict) or not isinstance(row.get('step'), int):
      raise ValueError(f'{path}: line {i + 1} has no integer "step"')
    rows.append(row)
  return rows


def best_row(rows: list[dict]) -> dict | None:
  """The row with the highest eval/AP (the earliest step among equals)."""
  scored = [r for r in rows if 'eval/AP' in r]
  return max(scored, key=lambda r: (r['eval/AP'], -r['step'])) if scored else None


_WAIT, _STOP_FINAL, _STOP_TIMEOUT = -1, -2, -3   # the watcher's actions besides a step


def _agree(value: int) -> int:
  """Process 0's `value` on every process (the watcher's choices must match for collectives)."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _all_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _load_step(step_dir: str, grace_s: float):
  """The variables of a step directory, or None when the trainer deleted it (keep-last-N) before
  or while we read it. A read that fails while the directory is still there waits `grace_s` for
  the deletion to finish (rmtree removes the directory itself last) before it counts as an error."""
  try:
    return checkpoints.load_for_inference(step_dir)[1]
  except Exception:  # noqa: BLE001  (any orbax/tensorstore error of a half-deleted checkpoint)
    deadline = time.monotonic() + grace_s
    while paths.isdir(step_dir) and time.monotonic() < deadline:
      time.sleep(0.05)
    if paths.isdir(step_dir):
      raise
    return None


def waiting_for(workdir: str) -> str:
  """What `evaluate --watch` waits for in `workdir`, in words ('' when the run's config.json is
  there). A work directory whose parent does not exist is a mistyped path: ValueError."""
  parent = paths.dirname(paths.abspath(workdir))
  # A bucket has no folders: only a local parent can be missing.
  if not paths.is_remote(workdir) and not paths.isdir(parent):
    raise ValueError(f'{workdir}: --watch WORKDIR: its parent {parent} does not exist (a mistyped '
                     f'path?)')
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise ValueError(f'{workdir}: --watch WORKDIR is a file, not a work directory')
  path = paths.join(workdir, checkpoints.CONFIG_FILE)
  if paths.isfile(path):
    return ''
  where = 'does not exist yet' if not paths.isdir(workdir) else 'has no config.json yet'
  return (f'waiting for {path}: {workdir} {where}; it appears when `minvis-jax train --workdir '
          f'{workdir}` starts (--timeout S to give up)')


def wait_for_config(workdir: str, timeout: float | None = None, poll_s: float = 2.0):
  """The run's config.json (the trainer writes it first thing), waiting up to `timeout` s."""
  start = time.monotonic()
  while (config := checkpoints.read_config(workdir)) is None:
    if timeout is not None and time.monotonic() - start > timeout:
      raise TimeoutError(f'{paths.join(workdir, checkpoints.CONFIG_FILE)}: not written within '
                         f'{timeout:.0f} s; is a training run using this work directory?')
    time.sleep(poll_s)
  return config


def _next_action(workdir: str, done: set, timeout: float | None,
                 idle_since: float) -> tuple[int, int | None]:
  """(this process's choice: the oldest finished step not in `done`, _STOP_FINAL, _STOP_TIMEOUT or
  _WAIT; the run's final step as its config.json says now, None before it is written)."""
  todo = [s for s in checkpoints.finished_steps(workdir) if s not in done]
  run_config = checkpoints.read_config(workdir)
  final = run_config.total_steps if run_config is not None else None
  if todo:
    return todo[0], final
  if final is not None and done and max(done) >= final:
    return _STOP_FINAL, final
  if timeout is not None and time.monotonic() - idle_since > timeout:
    return _STOP_TIMEOUT, final
  return _WAIT, final


def watch(workdir: str, config, dataset, out_dir: str = '', max_videos: int | None = None,
          timeout: float | None = None, poll_s: float = 2.0, grace_s: float = 5.0) -> list[dict]:
  """Evaluates every finished checkpoint of the run in `workdir` once, oldest first; returns the
  rows it added to `workdir/eval.jsonl`.

  Steps already in eval.jsonl are skipped (a restarted watcher resumes). A checkpoint deleted
  before or while it is read is skipped with a log line. Stops once the run's final step
  (`total_steps` of `workdir/config.json`, re-read as the trainer rewrites it) is done, or after
  `timeout` seconds without a new checkpoint. `config` gives the model and inference settings
  (usually the run's config.json). Every process calls it; process 0 decides and writes.
  """
  workdir = paths.abspath(workdir)
  out_dir = out_dir or paths.join(workdir, 'eval')
  if not dataset.has_annotations:
    raise ValueError(f'{dataset.json_path} has no annotations: evaluating checkpoints needs a '
                     'split with ground truth')
  active = jax.process_index() == 0
  jsonl_path, best_path = paths.join(workdir, EVAL_JSONL), paths.join(out_dir, BEST_FILE)
  rows = read_eval_rows(jsonl_path) if active else []
  done = {r['step'] for r in rows}
  if done:
    log.info('%s: %d steps already evaluated (last %d)', jsonl_path, len(done), max(done))
  # Rows fsynced: another process (a training run's plots, a restarted watcher) reads them.
  writer = metrics_writer.MetricWriter(jsonl_path, paths.join(workdir, 'tensorboard', 'eval'),
                                       active, fsync=True)
  added = []
  idle_since = time.monotonic()
  try:
    while True:
      # Process 0 decides (a step to evaluate, wait or stop), so that all processes run the same
      # collectives: their listings of a changing directory may differ.
      action, final = _next_action(workdir, done, timeout, idle_since)
      action = _agree(action)
      if action == _STOP_FINAL:
        log.info('the run\'s final step %d is done; stopping', final)
        break
      if action == _STOP_TIMEOUT:
        log.info('no new checkpoint in %s for %.0f s; stopping', workdir, timeout)
        break
      if action == _WAIT:
        time.sleep(poll_s)
        continue
      step = action
      done.add(step)
      step_dir = paths.join(workdir, checkpoints.CHECKPOINT_SUBDIR, str(step))
      variables = _load_step(step_dir, grace_s)
      if not _all_ok(variables is not None):
        log.warning('step %d: checkpoint %s was deleted before it could be read; skipped', step,
                    step_dir)
      else:
        start = time.monotonic()
        results, metrics = evaluate.score(config, variables, dataset, max_videos)
        del variables
        if active:
          metrics_writer.write_json(paths.join(out_dir, str(step), 'results.json'), results)
          metrics_writer.write_json(paths.join(out_dir, str(step), 'metrics.json'), metrics)
          scalars = evaluate.eval_scalars(metrics)
          writer.write(step, scalars)
          row = {'step': step, **scalars}
          rows.append(row)
          metrics_writer.write_json(best_path, best_row(rows))
          added.append(row)
          log.info('step %d: AP %.4f AP50 %.4f (%.1f s); best so far: step %d', step,
                   metrics['AP'], metrics['AP50'], time.monotonic() - start,
                   best_row(rows)['step'])
      idle_since = time.monotonic()
  finally:
    writer.close()
  return added


def run(config, workdir: str, out: str = '', split: str = '', max_videos: int = 0,
        timeout: float | None = None) -> int:
  """The `evaluate --watch WORKDIR` command: `watch` on the split `split` (default
  `data.eval_split`, which needs ground truth), then the best step so far."""
  dataset = evaluate.load_dataset(config, split)
  print(f'watching {paths.abspath(workdir)}: {config.data.dataset} {dataset.json_path}',
        flush=True)
  added = watch(workdir, config, dataset, out, max_videos or None, timeout=timeout)
  best = best_row(read_eval_rows(paths.join(workdir, EVAL_JSONL)))
  print(f'evaluated {len(added)} checkpoints' + (f'; best AP {100 * best["eval/AP"]:.2f} at step '
                                                 f'{best["step"]}' if best else ''), flush=True)
  return 0
