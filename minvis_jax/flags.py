"""Flag types and flag groups shared by the commands of `minvis_jax/cli.py` (argparse lives in these
two modules only): numeric flags with a range checked at parse time, the config, distributed and
shorthand flags, and the table of renamed flags."""

import argparse
import os

import jax

from minvis_jax import user_input


# --- flag value types: a range checked at parse time (0 never means "the default": None does) ---

def _flag_type(parse):
  """An argparse type from a user_input parser; its message follows 'argument --flag:'."""
  def typed(text: str):
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  typed.__name__ = parse.__name__
  return typed


positive_int, nonneg_int, positive_float, nonneg_float, finite_float, probability = map(
    _flag_type, (user_input.positive_int, user_input.nonneg_int, user_input.positive_float,
                 user_input.nonneg_float, user_input.finite_float, user_input.probability))

# command -> ((flag, the flag it needs), ...): a flag that means something only beside another.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {}
DISTRIBUTED_NEEDS = tuple((f, '--distributed') for f in ('--coordinator', '--num_processes',
                                                           '--process_id'))


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
  parser.add_argument('--num_processes', type=positive_int, default=None,
                      help='for --distributed')
  parser.add_argument('--process_id', type=nonneg_int, default=None, help='for --distributed')


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


def check_renamed(name: str, argv: list[str]) -> None:
  for old, new in RENAMED_FLAGS.get(name, {}).items():
    if any(a == old or a.startswith(old + '=') for a in argv):
      raise ValueError(f'{old} was renamed: use {new}')


def parse_window(value: str) -> int | str:
  """A `--window` flag: 'auto' or a positive frame count per device."""
  if value != 'auto' and (not value.isdigit() or int(value) < 1):
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
  return value if value == 'auto' else int(value)
