"""The `minvis-jax` command: every flag of every subcommand is defined here, once.

  minvis-jax demo      [flags]   offline end-to-end run on generated videos (the main job)
  minvis-jax convert   --source hf --input HF_MODEL_DIR --out ckpt
  minvis-jax infer     --checkpoint ckpt --video clip.mp4 --out out
  minvis-jax export    --checkpoint ckpt --out model.jax   (then infer --exported model.jax)
  minvis-jax train     --config minvis:dataset=ovis --workdir DIR
  minvis-jax evaluate  --checkpoint DIR [--config minvis] [--set data.manual_dir=DATA]
  minvis-jax plan      --config minvis --topology v5e:4x4 [--json]   (needs the tpu extra)
  minvis-jax data      synthetic --out DIR --videos N --frames T | build --dataset NAME ...

`--config` takes a shipped config by name (`minvis`, `coco`, `tiny`), with an argument after a
colon (`minvis:dataset=ytvis_2021,backbone=swin_l`), or the path of your own config file; `--set
KEY=VALUE` overrides one field (repeatable). `minvis-jax CMD --help` lists a command's flags. User
errors (a missing file, a wrong checkpoint) print one line and exit with status 2; add `--debug` to
any command to see the traceback. `python -m minvis_jax CMD` is the same as `minvis-jax CMD`.

On a CPU-only Linux host `train` and `demo` start themselves again once with glibc malloc tunables
that keep freed memory mapped (minvis_jax/host_memory.py; one line on stderr says so); set
MINVIS_NO_REEXEC=1, or a GLIBC_TUNABLES naming a glibc.malloc tunable, to turn that off.
"""

import argparse
import faulthandler
import json
import logging
import os
import sys

import jax

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import console
from minvis_jax import convert
from minvis_jax import demo
from minvis_jax import evaluate
from minvis_jax import export
from minvis_jax import exported
from minvis_jax import host_memory
from minvis_jax import infer
from minvis_jax import model_forward
from minvis_jax import paths
from minvis_jax import plan
from minvis_jax import train
from minvis_jax import user_input
from minvis_jax import watch
from minvis_jax import workdir_lock
from minvis_jax.data import categories
from minvis_jax.data import synthetic
from minvis_jax.data import tfds_builders

from minvis_jax.flags import DISTRIBUTED_NEEDS
from minvis_jax.flags import NEEDS
from minvis_jax.flags import RENAMED_FLAGS
from minvis_jax.flags import add_config_flags
from minvis_jax.flags import add_distributed_flags
from minvis_jax.flags import add_shorthand
from minvis_jax.flags import check_renamed
from minvis_jax.flags import initialize_distributed
from minvis_jax.flags import nonneg_int
from minvis_jax.flags import overrides
from minvis_jax.flags import parse_window
from minvis_jax.flags import positive_float
from minvis_jax.flags import positive_int
from minvis_jax.flags import probability

run = console.run   # a user error: one line, exit status 2


# --- commands ---------------------------------------------------------------------------------
# Each command: (one-line help, flags(parser), run(args) -> exit status).
COMMANDS: dict = {}
_TRACKER_SET = '--set inference.tracker=memory|minvis|ctvis'


# --- infer ---

def _infer_flags(parser: argparse.ArgumentParser) -> None:
  parser.description = infer.__doc__.strip()
  parser.add_argument('--checkpoint', default='',
                      help='minvis-jax checkpoint directory (written by convert or train)')
  parser.add_argument('--exported', default='', help='instead: a file from `minvis-jax export`')
  parser.add_argument('--video', required=True, help='video file or URL, jpg/png folder, - stdin')
  parser.add_argument('--out', required=True, help='output directory')
  add_config_flags(parser, default_help="the checkpoint's config.json")
  add_shorthand(parser, '--top_k', 'inference.top_k', 'tracks kept', type=positive_int)
  add_shorthand(parser, '--window', 'inference.window', 'frames per device per forward, or auto',
                type=parse_window)
  parser.add_argument('--score_threshold', type=probability, default=0.3,
                      help='tracks drawn on the overlay need at least this score (all are in '
                      'results.json)')
  parser.add_argument('--fps', type=positive_float, default=None,
                      help="frame rate of the overlay (default: the source video's; 10 for a "
                      'frame folder)')
  parser.add_argument('--online', nargs='*', choices=('summary', 'overlay'), help='frame by frame: '
                      'OUT/frames.jsonl; summary: + results.json, overlay: + overlay.mp4')


def _infer(args: argparse.Namespace) -> int:
  if bool(args.checkpoint) == bool(args.exported):
    raise ValueError('pass either --checkpoint DIR or --exported MODEL.jax')
  if args.exported and (args.config or args.set):
    raise ValueError('--exported: the artifact fixes the settings; --config/--set do not apply')
  if args.exported and args.online is not None:
    model = exported.load(args.exported)
    return infer.run_online(model.online_tracker(args.top_k, 'summary' in args.online),
                            (model.category_ids, model.category_names), args.video, args.out,
                            args.online, args.fps, model.path, model.check_frame_size)
  if args.exported:
    return infer.run_exported(exported.load(args.exported), args.video, args.out,
                              args.score_threshold, args.fps, args.top_k, args.window)
  config, variables = checkpoints.load_model(args.checkpoint, args.config)
  config_lib.apply_overrides(config, overrides(args))
  source = (args.config or "the checkpoint's config.json") + (' and flags' * bool(overrides(args)))
  if args.online is not None:
    tracker = model_forward.online_tracker(config, variables, 'summary' in args.online)
    return infer.run_online(tracker, categories.of_config(config), args.video, args.out,
                            args.online, args.fps, source)
  return infer.run(model_forward.from_config(config, variables), config.data,
                   categories.of_config(config), args.video, args.out, args.score_threshold,
                   args.fps, source)


COMMANDS['infer'] = ('MinVIS on one video file or frame folder: results JSON and overlay video',
                     _infer_flags, _infer)
RENAMED_FLAGS['infer'] = {'--tracker': _TRACKER_SET}


# --- export ---

def _export_flags(parser: argparse.ArgumentParser) -> None:
  parser.description = export.__doc__.strip()
  parser.add_argument('--checkpoint', required=True, help='minvis-jax checkpoint directory')
  parser.add_argument('--out', required=True, help='the artifact file, e.g. model.jax')
  add_config_flags(parser, default_help="the checkpoint's config.json")
  parser.add_argument('--frame_sizes', default='', metavar='HxW[,HxW...]',
                      help='source frame sizes to serve: one module per padded input size they '
                      'run at (default: 720x1280,480x640,480x480,640x480,1280x720)')
  parser.add_argument('--platforms', default='cpu,cuda,tpu', help='platforms the modules run on')


def _export(args: argparse.Namespace) -> int:
  sizes = export.parse_frame_sizes(args.frame_sizes)   # before the checkpoint is read
  config, variables = checkpoints.load_model(args.checkpoint, args.config)
  config_lib.apply_overrides(config, overrides(args))
  info = export.write(args.out, config, variables, sizes, args.platforms.split(','))
  shown = ', '.join(f'{h}x{w}' for h, w in info['buckets'])
  print(f'wrote {args.out}: {paths.getsize(args.out) / 2**20:.1f} MiB, input sizes {shown} on '
        f'{args.platforms}; jax {jax.__version__}, serialization {info["serialization_version"]}')
  return 0


COMMANDS['export'] = ('the model as one file that runs with JAX alone', _export_flags, _export)


# --- demo ---

def _demo_flags(parser: argparse.ArgumentParser) -> None:
  parser.description = demo.__doc__.strip()
  parser.epilog = ('On a CPU-only Linux host the demo starts itself again once with glibc malloc '
                   'tunables\n(one stderr line says so); MINVIS_NO_REEXEC=1 turns that off.')
  parser.add_argument('--workdir', default='minvis_demo', help='data, checkpoints and outputs')
  add_config_flags(parser, default_help='tiny')
  add_shorthand(parser, '--total_steps', 'total_steps', 'training steps', type=nonneg_int)
  add_shorthand(parser, '--batch_size', 'batch_size', 'global batch (frames)', type=positive_int)
  add_shorthand(parser, '--seed', 'seed', 'seed of the data, the init and the input order',
                type=nonneg_int)
  parser.add_argument('--train_videos', type=positive_int, default=40,
                      help='generated training videos')
  parser.add_argument('--valid_videos', type=positive_int, default=8,
                      help='generated held-out videos')
  parser.add_argument('--frames', type=positive_int, default=12, help='frames per generated video')
  parser.add_argument('--reid', action='store_true', help='then a reid head too (docs/reid.md)')


def _demo(args: argparse.Namespace) -> int:
  config = config_lib.load_config(args.config or 'tiny')
  config_lib.apply_overrides(config, overrides(args))
  with workdir_lock.held(args.workdir):
    return demo.run(config, args.workdir, args.train_videos, args.valid_videos, args.frames,
                    args.reid)


COMMANDS['demo'] = ('offline end-to-end run on generated videos: train, track, evaluate',
                    _demo_flags, _demo)
RENAMED_FLAGS['demo'] = {'--steps': '--total_steps'}


# --- convert ---

_CONVERT_DESCRIPTION = """\
Converts a Mask2Former / MinVIS checkpoint (HF transformers, detectron2) or an ImageNet backbone
to a minvis-jax checkpoint directory, read by `minvis-jax infer`, `evaluate` and training
(init.checkpoint).

--config is the experiment: a shipped config name[:arg] (minvis, minvis:dataset=ovis,
coco:backbone=swin_l, tiny) or a config file. It gives the data, category names, test resolution,
window and top-k. With an HF config.json the model comes from it and --config must agree; without
--config an HF checkpoint gets the MinVIS recipe and its own classes. --config is required for
detectron2/torchvision/swin (no model config inside)."""

_CONVERT_EXAMPLES = """\
examples:
  minvis-jax convert --source hf --input mask2former-swin-small-coco-instance --out ckpt
  minvis-jax convert --source detectron2 --input model_final_3c8ec9.pkl \\
      --config coco:backbone=r50 --out pretrained/coco_r50
  minvis-jax convert --source detectron2 --input minvis_ytvis19_R50.pth \\
      --config minvis:dataset=ytvis_2019 --out ckpt_ytvis19"""


def _convert_flags(parser: argparse.ArgumentParser) -> None:
  parser.description, parser.epilog = _CONVERT_DESCRIPTION, _CONVERT_EXAMPLES
  parser.add_argument('--source', required=True,
                      choices=['hf', 'detectron2', 'torchvision', 'swin'])
  parser.add_argument('--input', required=True,
                      help='checkpoint file (.safetensors, .bin, .pth, .pkl), or for --source hf '
                      'an HF model folder (save_pretrained: config.json + weights)')
  parser.add_argument('--hf_config', default='',
                      help='HF config.json of --input when it is not beside the weights')
  add_config_flags(parser)
  parser.add_argument('--out', required=True, help='new checkpoint directory')
  parser.add_argument('--seed', type=nonneg_int, default=0,
                      help='init of the head for backbone sources')


def _convert(args: argparse.Namespace) -> int:
  config, weights, origin = convert.experiment_config(
      args.source, args.input, args.hf_config, args.config, overrides(args))
  state = convert.read_weights(weights)
  if args.source == 'hf':
    convert.check_state_shapes(state, config.model, args.config or origin, weights)
    variables = convert.params_from_hf(state, config.model)
  elif args.source == 'detectron2':
    convert.check_state_shapes(state, config.model, args.config or origin, weights)
    variables = convert.params_from_detectron2(state, config.model)
  else:
    variables = convert.params_from_backbone(args.source, state, config.model, args.seed)
  checkpoints.save_variables(args.out, variables)
  checkpoints.save_config(args.out, config)
  n = sum(x.size for x in jax.tree.leaves(variables))
  dataset = (config.get('data', None) or {}).get('dataset', '?')
  print(f'wrote {args.out}: {n:,} values from {weights} ({args.source}); {dataset} experiment, '
        f'{config.model.num_classes} classes')
  return 0


COMMANDS['convert'] = ('import HF / detectron2 weights or an ImageNet backbone as a checkpoint',
                       _convert_flags, _convert)
RENAMED_FLAGS['convert'] = {'--output': '--out'}


# --- data ---

def _data_flags(parser: argparse.ArgumentParser) -> None:
  tools = parser.add_subparsers(dest='tool', required=True, metavar='{synthetic,build}')
  gen = tools.add_parser('synthetic', formatter_class=_Formatter,
                         help='write a synthetic VIS dataset in the YouTube-VIS layout',
                         description=synthetic.__doc__.split('\n\n')[0])
  gen.add_argument('--out', required=True, help='dataset root (data.manual_dir)')
  gen.add_argument('--split', default='train', help='split of the --videos videos')
  gen.add_argument('--videos', type=nonneg_int, required=True, help='videos of --split (0: none)')
  gen.add_argument('--frames', type=positive_int, required=True, help='frames per video')
  gen.add_argument('--valid_videos', type=nonneg_int, default=0, help='videos of the valid split')
  gen.add_argument('--height', type=positive_int, default=128)
  gen.add_argument('--width', type=positive_int, default=224)
  gen.add_argument('--seed', type=nonneg_int, default=0)
  gen.add_argument('--occlusion', action='store_true',
                   help='occlusion-heavy scenes: objects hidden behind an occluder or out of '
                   'frame for several frames, and look-alikes crossing paths (>= 12 frames)')
  build = tools.add_parser('build', formatter_class=_Formatter,
                           help='prepare a TFDS dataset from its folder layout',
                           description='Prepares a TFDS dataset (array_record) from its folder '
                           'layout, for data.source=tfds.')
  build.add_argument('--dataset', required=True, choices=sorted(tfds_builders.BUILDERS))
  build.add_argument('--manual_dir', required=True, help='the dataset root in its standard layout')
  build.add_argument('--data_dir', required=True, help='where TFDS writes the prepared dataset')


def _data(args: argparse.Namespace) -> int:
  if args.tool == 'build':
    builder = tfds_builders.build(args.dataset, args.manual_dir, args.data_dir)
    print(f'{builder.name}: {builder.data_dir} {dict(builder.info.splits)}')
    return 0
  if args.split == 'valid' and args.valid_videos:
    raise ValueError('--split valid with --valid_videos: give the valid videos once')
  for split, n in ((args.split, args.videos), ('valid', args.valid_videos)):
    if n:
      path = synthetic.generate(args.out, split, n, args.frames, args.height, args.width,
                                args.seed, args.occlusion)
      print(f'wrote {n} videos x {args.frames} frames: {path}')
  return 0


COMMANDS['data'] = ('dataset tools: a synthetic dataset, TFDS preparation', _data_flags, _data)


# --- train ---

def _train_flags(parser: argparse.ArgumentParser) -> None:
  add_config_flags(parser, required=True)
  parser.add_argument('--workdir', required=True,
                      help='checkpoints, config.json, metrics and logs; resumes if present')
  add_shorthand(parser, '--total_steps', 'total_steps', 'training steps', type=nonneg_int)
  add_distributed_flags(parser)


def _train(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  initialize_distributed(args)
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, overrides(args))
  with workdir_lock.held(args.workdir, jax.process_index() == 0):
    train.train(config, args.workdir)
  return 0


COMMANDS['train'] = ('train Mask2Former on single frames (resumes from WORKDIR)', _train_flags,
                     _train)
NEEDS['train'] = DISTRIBUTED_NEEDS


# --- plan ---

def _plan_flags(parser: argparse.ArgumentParser) -> None:
  add_config_flags(parser, required=True)
  parser.add_argument('--topology', required=True,
                      help='TPU slice as libtpu names it: v5e:2x2 (v5e-4), v5e:4x4 (v5e-16), '
                      'v4:2x2x1 (v4-8), v5p:2x2x1 (v5p-8), v6e:2x4')
  parser.add_argument('--json', action='store_true', help='print the plan as JSON')
  parser.add_argument('--no_eval', action='store_true',
                      help='only the train step (no evaluation window search)')
  parser.add_argument('--top_ops', type=nonneg_int, default=0, metavar='N',
                      help='also the train step\'s HBM bytes by model part and its N largest ops')
  parser.add_argument('--search', action='store_true',
                      help='instead: find the cheapest setting of FSDP, rematerialisation, '
                      'bfloat16 compute and gradient accumulation (the global batch kept) whose '
                      'train step fits, and print it as --set flags (a compile per candidate)')
  parser.add_argument('--keep_dtype', action='store_true',
                      help='--search: keep the config\'s model.dtype (no bfloat16 family)')


def _plan(args: argparse.Namespace) -> int:
  if not os.environ.get('JAX_PLATFORMS'):   # with libtpu installed jax would try a local TPU
    jax.config.update('jax_platforms', 'cpu')
  config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides(args))
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  if args.search and args.top_ops:
    raise ValueError('--top_ops: not with --search (plan the setting it finds with --top_ops)')
  if args.search:
    report = plan.search_config(config, args.topology, args.keep_dtype, log)
    print(json.dumps(report, indent=1) if args.json else plan.format_search(report))
    return 0
  report = plan.plan_config(config, args.topology, not args.no_eval, log=log, top_ops=args.top_ops)
  print(json.dumps(plan.to_json(report), indent=1) if args.json else plan.format_report(report))
  return 0


COMMANDS['plan'] = ('compile the train step and evaluation for a TPU slice on this host: memory, '
                    'flops, collectives, roofline bound', _plan_flags, _plan)
NEEDS['plan'] = (('--keep_dtype', '--search'),)


# --- evaluate ---

def _evaluate_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--checkpoint', default='', help='model checkpoint directory')
  parser.add_argument('--watch', default='', metavar='WORKDIR',
                      help='instead: evaluate each checkpoint of this training run once, as it '
                      'appears (config: the run\'s config.json unless --config)')
  parser.add_argument('--timeout', type=positive_float, default=None,
                      help='--watch: stop after this many seconds without a new checkpoint')
  parser.add_argument('--out', default='',
                      help='output directory (default: the checkpoint; --watch: WORKDIR/eval)')
  add_config_flags(parser, default_help="the checkpoint's config.json")
  add_shorthand(parser, '--split', 'data.eval_split', 'dataset split')
  add_shorthand(parser, '--manual_dir', 'data.manual_dir', 'dataset folder')
  add_shorthand(parser, '--max_videos', 'eval.max_videos', 'only the first N videos (default: '
                'all, or the config\'s eval.max_videos)', type=positive_int)
  add_shorthand(parser, '--top_k', 'inference.top_k', 'tracks per video', type=positive_int)
  add_shorthand(parser, '--window', 'inference.window',
                'frames per device per forward, or auto', type=parse_window)
  add_distributed_flags(parser)


def _split_and_max_videos(config) -> tuple[str, int]:
  """data.eval_split, eval.max_videos ('' and 0 where a checkpoint's config has no such key)."""
  return config.data.get('eval_split', ''), (config.get('eval', None) or {}).get('max_videos', 0)


def _evaluate(args: argparse.Namespace) -> int:
  if args.watch and args.checkpoint:
    raise ValueError('pass either --checkpoint DIR or --watch WORKDIR, not both')
  if not (args.checkpoint or args.watch):
    raise ValueError('pass --checkpoint DIR (or --watch WORKDIR)')
  initialize_distributed(args)
  if args.watch:
    if waiting := watch.waiting_for(args.watch):   # said at once, not after minutes of silence
      print(waiting, flush=True)
    config = (config_lib.load_config(args.config) if args.config
              else watch.wait_for_config(args.watch, args.timeout))
    config_lib.apply_overrides(config, overrides(args))
    with console.progress_on_stdout(logging.getLogger('minvis_jax')):
      return watch.run(config, args.watch, args.out, *_split_and_max_videos(config),
                       timeout=args.timeout)
  config, variables = checkpoints.load_model(args.checkpoint, args.config)
  config_lib.apply_overrides(config, overrides(args))
  return evaluate.run(config, variables, args.checkpoint, args.out, *_split_and_max_videos(config))


COMMANDS['evaluate'] = ('MinVIS on a dataset split -> OUT/results.json, scored (OUT/metrics.json) '
                        'when it has ground truth; or --watch a training run\'s checkpoints.',
                        _evaluate_flags, _evaluate)
RENAMED_FLAGS['evaluate'] = {'--tracker': _TRACKER_SET}
NEEDS['evaluate'] = (('--timeout', '--watch'),) + DISTRIBUTED_NEEDS


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Help at a fixed width, whatever the terminal: --help and docs/cli.md read the same."""

  def __init__(self, prog: str):
    super().__init__(prog, width=100, max_help_position=30)


def make_parser(name: str) -> argparse.ArgumentParser:
  """The parser of command `name` (used by main and by docs/cli.md's generator)."""
  help_text, flags, _ = COMMANDS[name]
  parser = argparse.ArgumentParser(prog=f'minvis-jax {name}', description=help_text,
                                   formatter_class=_Formatter)
  flags(parser)
  return parser


def markdown() -> str:
  """docs/cli.md: the module help, every command's --help, and the renamed flags."""
  out = ['# The `minvis-jax` command line', '',
         'Generated from the parsers in minvis_jax/cli.py by '
         '`python -m minvis_jax.cli --markdown > docs/cli.md`; do not edit by hand.', '',
         '```text', __doc__.strip(), '```', '']
  for name in sorted(COMMANDS):
    parser = make_parser(name)
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for prog, p in [(name, parser)] + [(f'{name} {k}', v) for a in subs
                                       for k, v in a.choices.items()]:
      out += [f'## minvis-jax {prog}', '', '```text', p.format_help().strip(), '```', '']
  out += ['## Changes', '', 'Flags that were renamed or removed; passing one is a one-line error '
          'naming the replacement.', '', '| command | old flag | use now |', '|---|---|---|']
  for cmd in sorted(RENAMED_FLAGS):
    for old, new in RENAMED_FLAGS[cmd].items():
      new = new.replace('|', '\\|')   # a | inside a table cell
      out.append(f'| {cmd} | `{old}` | `{new}` |')
  return '\n'.join(out) + '\n'


# The flags (argparse dests) naming where a command writes: --workdir, --out, data build's
# --data_dir, and the watcher's work directory (its eval.jsonl and eval/).
_OUTPUT_FLAGS = ('workdir', 'out', 'data_dir', 'watch')


def _outputs(name: str, args) -> list:
  """The values of `_OUTPUT_FLAGS`, and evaluate's checkpoint when --out is left to its default
  (the checkpoint's own directory)."""
  outputs = [getattr(args, dest, None) for dest in _OUTPUT_FLAGS]
  if name == 'evaluate' and not args.out and not args.watch:
    outputs.append(args.checkpoint)
  return outputs


def _command_main(name: str):
  def main(argv):
    check_renamed(name, argv[1:])
    parser = make_parser(name)
    args = parser.parse_args(argv[1:])
    if problem := user_input.unmet_needs(NEEDS.get(name, ()), vars(args)):
      parser.error(problem)
    # Before anything is read or written: every URL's bucket, and a write probe of the outputs.
    paths.check_urls([*vars(args).values(), *overrides(args)], _outputs(name, args))
    return COMMANDS[name][2](args)
  return main


# Commands that keep freed host memory mapped (host_memory): the training step's large blocks.
_REEXEC = ('train', 'demo')


def main(argv: list[str] | None = None) -> int:
  """`minvis-jax CMD ...`: argv without the program name (None: sys.argv, a process of its own)."""
  own_process = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['--markdown']:
    sys.stdout.write(markdown())
    return 0
  names = list(COMMANDS)
  if not argv or argv[0] in ('-h', '--help') or argv[0] not in names:
    print(__doc__)
    if argv and argv[0] not in ('-h', '--help'):
      print(f'unknown subcommand {argv[0]!r}; choose one of {", ".join(names)}')
      return 2
    return 0
  name = argv[0]
  if own_process:   # a native crash (SIGSEGV, SIGABRT) still leaves every thread's stack
    faulthandler.enable()
  if own_process and name in _REEXEC and not {'-h', '--help'} & set(argv):
    host_memory.reexec_keeping_freed_memory()
  # Each subcommand gets 'minvis-jax <cmd>' as its program name, absl-style.
  status = run(f'minvis-jax {name}', _command_main(name), argv[1:])
  if own_process and status and name in _REEXEC:
    console.exit_now(status)   # not at the join of threads a failed save left waiting
  return status


if __name__ == '__main__':
  sys.exit(main())
