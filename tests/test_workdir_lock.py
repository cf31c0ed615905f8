"""workdir_lock: one training run per work directory, the holder named, a dead holder's lock taken
over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from minvis_jax import paths
from minvis_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_held_workdir_is_refused_naming_host_and_pid(tmp_path):
  with workdir_lock.held(str(tmp_path)) as stale:
    assert stale == ''
    info = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
    assert (info['host'], info['pid']) == (socket.gethostname(), os.getpid())
    # flock is per open file: a second holder in this process is refused like another process.
    with pytest.raises(workdir_lock.WorkdirBusy,
                       match=rf'{tmp_path}: in use by another training run \(host '
                       rf'{socket.gethostname()}, pid {os.getpid()}, since '):
      with workdir_lock.held(str(tmp_path)):
        pass
  # Released at the end of the block, with no holder left to report as stale.
  with workdir_lock.held(str(tmp_path)) as stale:
    assert stale == ''
  with workdir_lock.held(str(tmp_path / 'other'), active=False) as stale:
    assert stale == '' and not (tmp_path / 'other').exists()


_HOLD_AND_WAIT = """
import sys, time
from minvis_jax import workdir_lock
with workdir_lock.held(sys.argv[1]):
  print('held', flush=True)
  time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_AND_WAIT, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {holder.pid}, since'):
      with workdir_lock.held(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  with caplog.at_level(logging.WARNING), workdir_lock.held(str(tmp_path)) as stale:
    assert stale.startswith(f'host {socket.gethostname()}, pid {holder.pid}, since ')
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert f'took over the lock of a run that died (host {socket.gethostname()}, pid ' \
         f'{holder.pid}' in caplog.text


def test_a_bucket_workdir_is_locked_by_an_object_created_only_if_absent(gcs_bucket, caplog):
  """On gs:// (no flock): the second holder is refused naming the first; a lock naming a dead pid
  of this host is taken over; one naming another host is not (it cannot be told from a live run)."""
  run = f'{gcs_bucket}/run'
  lock = f'{run}/{workdir_lock.LOCK_FILE}'
  with workdir_lock.held(run) as stale:
    assert stale == ''
    with paths.open(lock) as f:
      assert json.load(f)['pid'] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirBusy, match=rf'{run}: in use by another training run '
                       rf'\(host {socket.gethostname()}, pid {os.getpid()}, since .*delete {lock}'):
      with workdir_lock.held(run):
        pass
  assert not paths.exists(lock)   # removed at the end
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  paths.write_atomic(lock, json.dumps({'host': socket.gethostname(), 'pid': int(dead),
                                       'since': 'then'}))
  with caplog.at_level(logging.WARNING), workdir_lock.held(run) as stale:
    assert stale == f'host {socket.gethostname()}, pid {dead}, since then'
  assert 'took over the lock of a run that died' in caplog.text
  paths.write_atomic(lock, json.dumps({'host': 'another-host', 'pid': 1, 'since': 'then'}))
  with pytest.raises(workdir_lock.WorkdirBusy, match='host another-host, pid 1'):
    with workdir_lock.held(run):
      pass
