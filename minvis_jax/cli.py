"""The `minvis-jax` command: one subcommand per job, each implemented in its own module.

  minvis-jax demo      [flags]   offline end-to-end run on generated videos (the main job)
  minvis-jax convert   --source hf --input HF_MODEL_DIR --output ckpt
  minvis-jax infer     --checkpoint ckpt --video clip.mp4 --out out
  minvis-jax train     --config minvis:dataset=ovis --workdir DIR
  minvis-jax evaluate  --checkpoint DIR [--config minvis] [--manual_dir DATA]

`--config` takes a shipped config by name (`minvis`, `coco`, `tiny`), with an argument after a
colon (`minvis:dataset=ytvis_2021,backbone=swin_l`), or the path of your own config file.
`minvis-jax CMD --help` lists a command's flags. User errors (a missing file, a wrong checkpoint)
print one line and exit with status 2; add `--debug` to any command to see the traceback.
"""

import importlib
import sys

from minvis_jax import host_memory

# subcommand -> (module, function taking argv)
_COMMANDS = {
    'demo': ('minvis_jax.demo', 'main'),
    'train': ('minvis_jax.train', 'main'),
    'evaluate': ('minvis_jax.evaluator', 'main'),
    'infer': ('minvis_jax.infer', 'main'),
    'convert': ('minvis_jax.convert', 'main'),
}

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


def main(argv=None) -> int:
  if argv is None:  # a process of its own (not a call from Python): see host_memory
    host_memory.reexec_keeping_freed_memory()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help') or argv[0] not in _COMMANDS:
    print(__doc__)
    if argv and argv[0] not in ('-h', '--help'):
      print(f'unknown subcommand {argv[0]!r}; choose one of {", ".join(_COMMANDS)}')
      return 2
    return 0
  module, fn = _COMMANDS[argv[0]]
  # Each subcommand gets 'minvis-jax <cmd>' as its program name, absl-style.
  return run(f'minvis-jax {argv[0]}', getattr(importlib.import_module(module), fn), argv[1:])


if __name__ == '__main__':
  sys.exit(main())
