"""One training run per work directory: `WORKDIR/train.lock`, held (flock) while a run trains.

The lock file names its holder (host, pid, start time), so a second run refuses to start with a
line that says who has the directory. The kernel drops a flock when its process dies, however it
dies, so the lock of a dead run is stale by construction and the next run takes it over.

An object store has no flock: there the lock is an object created only if absent (a generation
precondition on gs://) and deleted at the end. A dead holder on another machine cannot be told
from a live one, so its lock is taken over only when it names this host and a pid that is gone;
otherwise the message says to delete the object once that run is known to be dead.
"""

import contextlib
import fcntl
import json
import logging
import os
import socket
import time

from minvis_jax import paths

LOCK_FILE = 'train.lock'
_log = logging.getLogger(__name__)


class WorkdirBusy(ValueError):
  """Another live process holds the work directory."""


def _holder(text: str) -> str:
  try:
    info = json.loads(text)
    return f'host {info["host"]}, pid {info["pid"]}, since {info["since"]}'
  except (ValueError, KeyError, TypeError):
    return 'a process that left no name'


@contextlib.contextmanager
def held(workdir: str, active: bool = True):
  """Holds `workdir`'s lock while the block runs (a no-op when not `active`, e.g. on processes
  other than the first of a multi-process run, which share the directory with it).

  Raises WorkdirBusy naming the holder's host and pid when another process holds it; a stale
  lock (of a process that died) is taken over with a logged warning naming its holder. Yields the
  stale holder's description, '' when there was none.
  """
  if not active:
    yield ''
    return
  if paths.is_remote(workdir):
    with _held_remote(workdir) as previous:
      yield previous
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(f'{workdir}: in use by another training run ({_holder(_read(fd))}; lock '
                        f'{path}); wait for it to end or pass another --workdir') from None
    previous = _holder(_read(fd)) if _read(fd).strip() else ''
    if previous:
      _log.warning('%s: took over the lock of a run that died (%s)', workdir, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                              'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode(), 0)
    yield previous
    os.ftruncate(fd, 0)   # a clean end leaves no holder to report as stale
  finally:
    os.close(fd)   # releases the flock


def _me() -> bytes:
  return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                     'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode()


def _dead_here(text: str) -> bool:
  """Whether the lock `text` names a process of this host that no longer runs."""
  try:
    info = json.loads(text)
    if info['host'] != socket.gethostname():
      return False
    os.kill(int(info['pid']), 0)
  except ProcessLookupError:
    return True
  except (ValueError, KeyError, TypeError, OSError):
    return False
  return False


@contextlib.contextmanager
def _held_remote(workdir: str):
  path = paths.join(workdir, LOCK_FILE)
  previous = ''
  if not paths.create_exclusive(path, _me()):
    with paths.open(path, 'rb') as f:
      text = f.read().decode('utf-8', 'replace')
    if not _dead_here(text):
      raise WorkdirBusy(f'{workdir}: in use by another training run ({_holder(text)}; lock '
                        f'{path}); wait for it to end, or delete {path} if that run is dead')
    previous = _holder(text)
    _log.warning('%s: took over the lock of a run that died (%s)', workdir, previous)
    paths.remove(path)
    if not paths.create_exclusive(path, _me()):
      raise WorkdirBusy(f'{workdir}: another run took the lock {path} first')
  try:
    yield previous
  finally:
    paths.remove(path)


def _read(fd: int) -> str:
  return os.pread(fd, 4096, 0).decode('utf-8', 'replace')
