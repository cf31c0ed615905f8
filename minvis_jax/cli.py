"""The `minvis-jax` command: every flag of every subcommand is defined here, once.

  minvis-jax demo      [flags]   offline end-to-end run on generated videos (the main job)
  minvis-jax convert   --source hf --input HF_MODEL_DIR --out ckpt
  minvis-jax infer     --checkpoint ckpt --video clip.mp4 --out out
  minvis-jax train     --config minvis:dataset=ovis --workdir DIR
  minvis-jax evaluate  --checkpoint DIR [--config minvis] [--set data.manual_dir=DATA]

`--config` takes a shipped config by name (`minvis`, `coco`, `tiny`), with an argument after a
colon (`minvis:dataset=ytvis_2021,backbone=swin_l`), or the path of your own config file; `--set
KEY=VALUE` overrides one field (repeatable). `minvis-jax CMD --help` lists a command's flags. User
errors (a missing file, a wrong checkpoint) print one line and exit with status 2; add `--debug` to
any command to see the traceback.
"""

import argparse
import contextlib
import importlib
import logging
import os
import sys

import jax

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import evaluate
from minvis_jax import host_memory
from minvis_jax import train
from minvis_jax import watch

# What a command raises for bad input (a path, a file's content, a flag value): the message names
# the file and field, so the traceback is noise. Anything else (a bug) keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


# --- flag groups shared by several commands ---------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser, required: bool = False,
                     default_help: str = '') -> None:
  """--config NAME[:ARG]|FILE and --set KEY=VALUE (repeatable)."""
  parser.add_argument('--config', required=required, default='',
                      help='config name[:arg] or file, e.g. tiny or minvis:dataset=ovis'
                      + (f'; default: {default_help}' if default_help else ''))
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override a config field, e.g. --set batch_size=16 (repeatable)')


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """--distributed and its explicit values (TPU pods and SLURM detect them)."""
  parser.add_argument('--distributed', action='store_true',
                      help='jax.distributed.initialize(): one process per host of a TPU pod, '
                      'SLURM job or local launcher (launch/)')
  parser.add_argument('--coordinator', default=None, help='host:port for --distributed')
  parser.add_argument('--num_processes', type=int, default=None, help='for --distributed')
  parser.add_argument('--process_id', type=int, default=None, help='for --distributed')


def initialize_distributed(args: argparse.Namespace) -> None:
  """jax.distributed with auto-detection (TPU, SLURM) or the explicit flag values."""
  if not args.distributed:
    return
  if 'cpu' in os.environ.get('JAX_PLATFORMS', ''):
    # Many back-to-back CPU collectives under async dispatch can deadlock in gloo.
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def add_shorthand(parser: argparse.ArgumentParser, flag: str, key: str, help: str,
                  **kwargs) -> None:
  """`flag VALUE` as shorthand for `--set key=VALUE` (see `overrides`)."""
  dest = flag.lstrip('-')
  parser.add_argument(flag, dest=dest, default=None, help=f'{help} (shorthand for --set {key}=...)',
                      **kwargs)
  parser.set_defaults(shorthands=tuple(parser.get_default('shorthands') or ()) + ((dest, key),))


def overrides(args: argparse.Namespace) -> list[str]:
  """The command's config overrides as KEY=VALUE strings: --set items, then the shorthand flags
  that were given (a later item wins)."""
  items = list(getattr(args, 'set', []))
  for dest, key in getattr(args, 'shorthands', ()):
    value = getattr(args, dest)
    if value is not None:
      items.append(f'{key}={value}')
  return items


# Flags that were renamed or removed: command -> {old flag: what to use now}. Passing one is a
# one-line error naming the replacement (docs/cli.md "Changes" lists them).
RENAMED_FLAGS: dict[str, dict[str, str]] = {}


def _check_renamed(name: str, argv: list[str]) -> None:
  for old, new in RENAMED_FLAGS.get(name, {}).items():
    if any(a == old or a.startswith(old + '=') for a in argv):
      raise ValueError(f'{old} was renamed: use {new}')


# --- commands ---------------------------------------------------------------------------------
# Each command: (one-line help, flags(parser), run(args) -> exit status). A command whose parser
# still lives in its own module is listed in _LEGACY (module with main(argv)) until it moves here.

_LEGACY = {
    'demo': 'minvis_jax.demo',
    'infer': 'minvis_jax.infer',
    'convert': 'minvis_jax.convert',
}

COMMANDS: dict = {}


# --- train ---

def _train_flags(parser: argparse.ArgumentParser) -> None:
  add_config_flags(parser, required=True)
  parser.add_argument('--workdir', required=True,
                      help='checkpoints, config.json, metrics and logs; resumes if present')
  add_shorthand(parser, '--total_steps', 'total_steps', 'training steps', type=int)
  add_distributed_flags(parser)


def _train(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  initialize_distributed(args)
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, overrides(args))
  train.train(config, args.workdir)
  return 0


COMMANDS['train'] = ('Train Mask2Former on frames for MinVIS.', _train_flags, _train)


# --- evaluate ---------------------------------------------------------------------------------

RENAMED_FLAGS['evaluate'] = {'--tracker': '--set inference.tracker=memory|minvis'}


def _evaluate_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--checkpoint', default='', help='model checkpoint directory')
  parser.add_argument('--watch', default='', metavar='WORKDIR',
                      help='instead: evaluate each checkpoint of this training run once, as it '
                      'appears (config: the run\'s config.json unless --config)')
  parser.add_argument('--timeout', type=float, default=None,
                      help='--watch: stop after this many seconds without a new checkpoint')
  parser.add_argument('--out', default='',
                      help='output directory (default: the checkpoint; --watch: WORKDIR/eval)')
  add_config_flags(parser, default_help="the checkpoint's config.json")
  add_shorthand(parser, '--split', 'data.eval_split', 'dataset split')
  add_shorthand(parser, '--manual_dir', 'data.manual_dir', 'dataset folder')
  add_shorthand(parser, '--max_videos', 'eval.max_videos', 'only the first N videos (0: all)',
                type=int)
  add_shorthand(parser, '--top_k', 'inference.top_k', 'tracks per video', type=int)
  add_shorthand(parser, '--window', 'inference.window',
                'frames per device per forward, or auto')
  add_distributed_flags(parser)


@contextlib.contextmanager
def _progress_on_stdout(logger: logging.Logger):
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


def _split_and_max_videos(config) -> tuple[str, int]:
  """data.eval_split and eval.max_videos ('' and 0 where a checkpoint's config has no such key)."""
  return config.data.get('eval_split', ''), (config.get('eval', None) or {}).get('max_videos', 0)


def _evaluate(args: argparse.Namespace) -> int:
  if args.watch and args.checkpoint:
    raise ValueError('pass either --checkpoint DIR or --watch WORKDIR, not both')
  if not (args.checkpoint or args.watch):
    raise ValueError('pass --checkpoint DIR (or --watch WORKDIR)')
  initialize_distributed(args)
  if args.watch:
    config = (config_lib.load_config(args.config) if args.config
              else watch.wait_for_config(args.watch, args.timeout))
    config_lib.apply_overrides(config, overrides(args))
    with _progress_on_stdout(logging.getLogger('minvis_jax')):
      return watch.run(config, args.watch, args.out, *_split_and_max_videos(config),
                       timeout=args.timeout)
  config, variables = checkpoints.load_model(args.checkpoint, args.config)
  config_lib.apply_overrides(config, overrides(args))
  return evaluate.run(config, variables, args.checkpoint, args.out,
                      *_split_and_max_videos(config))


COMMANDS['evaluate'] = ('MinVIS on a dataset split -> OUT/results.json, scored (OUT/metrics.json) '
                        'when it has ground truth; or --watch a training run\'s checkpoints.',
                        _evaluate_flags, _evaluate)


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


def make_parser(name: str) -> argparse.ArgumentParser:
  """The parser of command `name` (used by main and by docs/cli.md's generator)."""
  help_text, flags, _ = COMMANDS[name]
  parser = argparse.ArgumentParser(prog=f'minvis-jax {name}', description=help_text,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  flags(parser)
  return parser


def _command_main(name: str):
  def main(argv):
    _check_renamed(name, argv[1:])
    args = make_parser(name).parse_args(argv[1:])
    return COMMANDS[name][2](args)
  return main


def main(argv=None) -> int:
  if argv is None:  # a process of its own (not a call from Python): see host_memory
    host_memory.reexec_keeping_freed_memory()
  argv = list(sys.argv[1:] if argv is None else argv)
  names = list(COMMANDS) + [n for n in _LEGACY if n not in COMMANDS]
  if not argv or argv[0] in ('-h', '--help') or argv[0] not in names:
    print(__doc__)
    if argv and argv[0] not in ('-h', '--help'):
      print(f'unknown subcommand {argv[0]!r}; choose one of {", ".join(names)}')
      return 2
    return 0
  name = argv[0]
  # Each subcommand gets 'minvis-jax <cmd>' as its program name, absl-style.
  if name in COMMANDS:
    return run(f'minvis-jax {name}', _command_main(name), argv[1:])
  return run(f'minvis-jax {name}', importlib.import_module(_LEGACY[name]).main, argv[1:])


if __name__ == '__main__':
  sys.exit(main())
