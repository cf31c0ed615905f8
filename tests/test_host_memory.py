"""minvis_jax.host_memory: the environment it re-executes with, and what that changes."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from minvis_jax import host_memory

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
OURS = ':'.join(host_memory.TUNABLES)


@pytest.mark.parametrize('environ, libc, accelerator, expected', [
    ({}, ('glibc', '2.36'), False, OURS),
    ({'GLIBC_TUNABLES': 'glibc.rtld.optional_static_tls=4096'}, ('glibc', '2.28'), False,
     'glibc.rtld.optional_static_tls=4096:' + OURS),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=8'}, ('glibc', '2.36'), False, None),  # opted out
    ({'MINVIS_NO_REEXEC': '1'}, ('glibc', '2.36'), False, None),                     # opted out
    ({'MINVIS_NO_REEXEC': '0'}, ('glibc', '2.36'), False, OURS),
    ({}, ('glibc', '2.36'), True, None),              # device memory: nothing to gain
    ({}, ('glibc', '2.17'), False, None),             # no tunables before glibc 2.26
    ({}, ('glibc', ''), False, None),
    ({}, ('', ''), False, None),                      # musl, or unknown
])
def test_malloc_environment(environ, libc, accelerator, expected):
  env = host_memory.malloc_environment(dict(environ, HOME='/h'), libc, accelerator)
  if expected is None:
    assert env is None
  else:
    assert env == dict(environ, HOME='/h', GLIBC_TUNABLES=expected)


def test_has_accelerator_follows_jax_platforms():
  assert not host_memory.has_accelerator({'JAX_PLATFORMS': 'cpu'})
  assert host_memory.has_accelerator({'JAX_PLATFORMS': 'cuda,cpu'})
  assert host_memory.has_accelerator({'JAX_PLATFORMS': 'tpu'})


# A program that re-executes itself, counts its starts, then mallocs, touches and frees a 256 MiB
# block twice and reports the page faults of the second time.
_PROGRAM = textwrap.dedent('''
    import ctypes, os, resource, sys
    sys.path.insert(0, sys.argv[2])
    from minvis_jax import host_memory
    with open(sys.argv[1], 'a') as f:
      f.write('start\\n')
    host_memory.reexec_keeping_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    for _ in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(os.environ.get('GLIBC_TUNABLES', ''), faults)
''')


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables are Linux only')
@pytest.mark.parametrize('opt_out', [False, True, 'MINVIS_NO_REEXEC'])
def test_reexecutes_once_and_keeps_freed_memory(tmp_path, opt_out):
  program = tmp_path / 'program.py'
  program.write_text(_PROGRAM)
  starts = tmp_path / 'starts'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('GLIBC_TUNABLES', None)
  if opt_out == 'MINVIS_NO_REEXEC':
    env['MINVIS_NO_REEXEC'] = '1'
  elif opt_out:
    env['GLIBC_TUNABLES'] = 'glibc.malloc.arena_max=8'
  proc = subprocess.run([sys.executable, str(program), str(starts), ROOT], capture_output=True,
                        text=True, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr
  tunables, faults = proc.stdout.split('\n')[0].rsplit(' ', 1)
  pages = (256 << 20) // os.sysconf('SC_PAGE_SIZE')
  expected = None if opt_out else host_memory.malloc_environment(env, platform.libc_ver(), False)
  if expected is None:
    assert starts.read_text() == 'start\n'            # ran once, environment unchanged
    assert tunables == env.get('GLIBC_TUNABLES', '')
    assert 'restarting' not in proc.stderr
    if opt_out is True and platform.libc_ver()[0] == 'glibc':
      assert int(faults) > pages // 8                  # glibc unmapped the block: faulted again
  else:
    assert starts.read_text() == 'start\nstart\n'     # re-executed exactly once
    assert proc.stderr.count('restarting this process once with GLIBC_TUNABLES=') == 1
    assert tunables == expected['GLIBC_TUNABLES']
    assert int(faults) < pages // 100                  # the freed block was reused as it was


def test_cli_help_prints_once():
  """The command re-executes before doing anything: its output appears once."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('GLIBC_TUNABLES', None)
  proc = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', '--help'], capture_output=True,
                        text=True, timeout=120, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count('minvis-jax demo') == 1, proc.stdout


def test_only_train_and_demo_reexecute_and_say_so_on_stderr():
  """convert (and infer, evaluate, --help) run in the process that was started; demo restarts
  itself once, with one stderr line, before parsing its flags."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('GLIBC_TUNABLES', None)
  env.pop('MINVIS_NO_REEXEC', None)
  if host_memory.malloc_environment(env, platform.libc_ver(), False) is None:
    pytest.skip('no glibc tunables here')
  run = [sys.executable, '-m', 'minvis_jax']
  convert = subprocess.run(run + ['convert', '--source', 'hf', '--input', 'none', '--out', 'x'],
                           capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert convert.returncode == 2 and 'restarting' not in convert.stderr, convert.stderr
  demo = subprocess.run(run + ['demo', '--total_steps', 'many'], capture_output=True, text=True,
                        timeout=300, env=env, cwd=ROOT)
  assert demo.returncode == 2, demo.stderr
  assert demo.stderr.count('restarting this process once with GLIBC_TUNABLES=') == 1
  assert 'MINVIS_NO_REEXEC=1' in demo.stderr
  assert "argument --total_steps: expected an integer >= 0, got 'many'" in demo.stderr
  quiet = subprocess.run(run + ['demo', '--total_steps', 'many'], capture_output=True, text=True,
                         timeout=300, env=dict(env, MINVIS_NO_REEXEC='1'), cwd=ROOT)
  assert quiet.returncode == 2 and 'restarting' not in quiet.stderr, quiet.stderr
