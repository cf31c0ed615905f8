"""The command layer's console: a user error becomes one line and exit status 2, progress logs go
to stdout. Used by cli.py only."""

import contextlib
import logging
import os
import sys

# What a command raises for bad input (a path, a file's content, a flag value): the message names
# the file and field, so the traceback is noise. Anything else (a bug) keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def run(prog: str, main_fn, argv) -> int:
  """Calls `main_fn(argv)`; a user error becomes one line `prog: error: ...` on stderr and exit 2.

  `--debug` anywhere in argv is removed and lets the exception (and its traceback) through.
  """
  argv = list(argv)
  debug = '--debug' in argv
  argv = [a for a in argv if a != '--debug']
  try:
    return main_fn([prog] + argv) or 0
  except USER_ERRORS as e:
    if debug:
      raise
    message = ' '.join(str(e).split()) or type(e).__name__
    print(f'{prog}: error: {message}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if debug:
      raise
    print(f'{prog}: interrupted', file=sys.stderr)
    return 130


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


def exit_now(status: int) -> None:
  """Ends the process with `status` once its error is printed, without joining other threads: a
  failed asynchronous orbax save can leave non-daemon threads waiting forever."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)
