"""Host memory on the CPU backend: keep freed blocks mapped instead of faulting them in every step.

XLA:CPU allocates an executable's temporaries as one large block per run and frees it after; glibc
serves such a block with a fresh mmap and unmaps it on free, so every training step faults all its
pages back in (kernel time comparable to the step itself; docs/benchmarks.md has the figures). With
three glibc tunables (one malloc arena, no mmap, no trimming) the block comes from the heap and
stays there. The process keeps its peak memory, as any caching allocator does.

glibc reads its tunables when a process starts, so `minvis-jax train`, `minvis-jax demo` and the
benchmarks re-execute themselves once with them set (one line on stderr says so). Only where JAX
will compute on the CPU: with an accelerator (device files of NVIDIA or AMD GPUs, TPUs) the step's
buffers are device memory, and a single arena could slow multi-threaded input pipelines. Opt out
with MINVIS_NO_REEXEC=1, or with a GLIBC_TUNABLES that already names a glibc.malloc tunable (e.g.
`GLIBC_TUNABLES=glibc.malloc.arena_max=8`), which is left as it is.
"""

import glob
import os
import platform
import sys

TUNABLES = ('glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0',
            f'glibc.malloc.trim_threshold={1 << 40}')
_ACCELERATOR_FILES = ('/dev/nvidia[0-9]*', '/dev/kfd', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')


def has_accelerator(environ) -> bool:
  """Whether JAX is likely to compute on an accelerator here (JAX_PLATFORMS, else device files)."""
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def malloc_environment(environ, libc: tuple[str, str], accelerator: bool):
  """The environment to re-execute with, or None when there is nothing to change.

  Args:
    environ: the current environment (a mapping).
    libc: `platform.libc_ver()`, e.g. ('glibc', '2.36').
    accelerator: `has_accelerator(environ)`.
  """
  name, version = libc
  if name != 'glibc' or accelerator or environ.get('MINVIS_NO_REEXEC', '') not in ('', '0'):
    return None
  try:
    if tuple(int(v) for v in version.split('.')[:2]) < (2, 26):  # glibc's tunables came in 2.26
      return None
  except ValueError:
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.' in tunables:
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(filter(None, [tunables, *TUNABLES])))


def reexec_keeping_freed_memory() -> None:
  """Re-executes this process (same interpreter, same command line) with the tunables set, once.

  A no-op off Linux or glibc, with an accelerator, with MINVIS_NO_REEXEC=1, or when GLIBC_TUNABLES
  already names a glibc.malloc tunable. Call it first thing in a program's entry point: anything
  done before it is done twice. Writes one line to stderr when it re-executes.
  """
  if sys.platform != 'linux':
    return
  env = malloc_environment(os.environ, platform.libc_ver(), has_accelerator(os.environ))
  # A program read from stdin ('-') or typed interactively ('') cannot be started again.
  if env is None or not sys.executable or sys.argv[0] in ('', '-'):
    return
  print(f'restarting this process once with GLIBC_TUNABLES='
        f'{env["GLIBC_TUNABLES"]} (keeps freed host memory mapped; MINVIS_NO_REEXEC=1 turns this '
        f'off)', file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  except OSError:
    pass  # not fatal: the run is only slower
