"""The `minvis-jax` command: one subcommand per job, each implemented in its own module.

  minvis-jax demo      [flags]   offline end-to-end run on generated videos (the main job)
  minvis-jax train     --config configs/r50.py --workdir DIR
  minvis-jax evaluate  --config configs/r50.py --checkpoint DIR
  minvis-jax infer     --checkpoint DIR --video PATH --out DIR
  minvis-jax convert   --source hf --input PATH --config CONFIG --output DIR
"""

import importlib
import sys

# subcommand -> (module, function taking argv)
_COMMANDS = {
    'demo': ('minvis_jax.demo', 'main'),
    'train': ('minvis_jax.train', 'main'),
    'evaluate': ('minvis_jax.evaluator', 'main'),
    'infer': ('minvis_jax.infer', 'main'),
    'convert': ('minvis_jax.convert', 'main'),
}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help') or argv[0] not in _COMMANDS:
    print(__doc__)
    if argv and argv[0] not in ('-h', '--help'):
      print(f'unknown subcommand {argv[0]!r}; choose one of {", ".join(_COMMANDS)}')
      return 2
    return 0
  module, fn = _COMMANDS[argv[0]]
  # Each subcommand gets argv[0] as its program name, absl-style.
  return getattr(importlib.import_module(module), fn)([f'minvis-jax {argv[0]}'] + argv[1:]) or 0


if __name__ == '__main__':
  sys.exit(main())
