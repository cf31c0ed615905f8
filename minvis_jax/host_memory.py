"""Host memory on the CPU backend: keep freed blocks mapped instead of faulting them in every step.

XLA:CPU allocates an executable's temporaries as one block per run (4.7 GB for the R50 train step at
384x384, batch 2) and frees it after. glibc serves a block this large with a fresh mmap and unmaps
it on free, so every step faults each of its 4 KiB pages back in: 1.18 M page faults and 3.6-6.5 s
of kernel time per step on a 2-core VM (step 7.4-10.6 s). With three glibc tunables (one malloc
arena, no mmap, no trimming) the block comes from the heap and stays there: 0 page faults after the
first steps, 0.03-0.09 s of kernel time, step 5.5-5.7 s (same hour, same machine). The process
keeps its peak memory, as any caching allocator does.

glibc reads its tunables when a process starts, so the `minvis-jax` command (and the benchmarks)
re-execute themselves once with them set. Only where JAX will compute on the CPU: with an
accelerator (device files of NVIDIA or AMD GPUs, TPUs) the step's buffers are device memory, and a
single arena could slow multi-threaded input pipelines. A GLIBC_TUNABLES that already names any
glibc.malloc tunable is left as it is (`GLIBC_TUNABLES=glibc.malloc.arena_max=8` opts out).
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
  if name != 'glibc' or accelerator:
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

  A no-op off Linux or glibc, with an accelerator, or when GLIBC_TUNABLES already names a
  glibc.malloc tunable. Call it first thing in a program's entry point: anything done before it is
  done twice.
  """
  if sys.platform != 'linux':
    return
  env = malloc_environment(os.environ, platform.libc_ver(), has_accelerator(os.environ))
  # A program read from stdin ('-') or typed interactively ('') cannot be started again.
  if env is None or not sys.executable or sys.argv[0] in ('', '-'):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  except OSError:
    pass  # not fatal: the run is only slower
