"""`minvis-jax evaluate`: MinVIS on a dataset split -> results JSON (+ metrics when it has GT)."""

import argparse
import logging
import os
import sys
import time

import jax

from minvis_jax import checkpoints
from minvis_jax import cli
from minvis_jax import config_lib
from minvis_jax import dataset_eval
from minvis_jax import evaluation
from minvis_jax import predictor
from minvis_jax import watch


def main(argv=None) -> int:
  """`minvis-jax evaluate`: a dataset split -> OUT/results.json (+ OUT/metrics.json with GT)."""
  parser = argparse.ArgumentParser(prog=(argv or ['minvis-jax evaluate'])[0],
                                   description='MinVIS on a dataset split, scored when it has GT.')
  parser.add_argument('--config', default='', help='config file[:arg]; default: the checkpoint\'s')
  parser.add_argument('--checkpoint', default='', help='model checkpoint directory')
  parser.add_argument('--split', default='', help='dataset split (default: config.data.eval_split)')
  parser.add_argument('--manual_dir', default='', help='dataset folder (default: data.manual_dir)')
  parser.add_argument('--out', default='', help='output directory (default: the checkpoint)')
  parser.add_argument('--max_videos', type=int, default=None, help='only the first N videos')
  parser.add_argument('--top_k', type=int, default=None, help='tracks per video (default: config)')
  parser.add_argument('--window', type=predictor.parse_window, default=None,
                      help='frames per device per forward, or auto (default: config)')
  parser.add_argument('--distributed', action='store_true',
                      help='jax.distributed.initialize(): every process of a pod, SLURM job or '
                           'launch/local_evaluate.sh evaluates its share of the videos')
  parser.add_argument('--coordinator', default=None, help='host:port for --distributed')
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--watch', default='', metavar='WORKDIR',
                      help='evaluate each checkpoint of this training run once, as it appears')
  parser.add_argument('--timeout', type=float, default=None,
                      help='--watch: stop after this many seconds without a new checkpoint')
  parser.add_argument('--tracker', choices=('minvis', 'memory'), default=None,
                      help='association mode (default: config.inference.tracker)')
  args = parser.parse_args((argv or [None])[1:])
  if not (args.checkpoint or args.watch):
    parser.error('pass --checkpoint DIR (or --watch WORKDIR)')
  t0 = time.time()
  cli.initialize_distributed(args)
  if args.watch:
    return _watch(args)
  config, variables = checkpoints.load_model(args.checkpoint, args.config)
  if args.tracker:
    config.inference.tracker = args.tracker
  split = args.split or config.data.get('eval_split', 'valid')
  dataset = watch.load_dataset(config, split, args.manual_dir, require_annotations=False)
  results = dataset_eval.predict_dataset(config, variables, dataset, args.max_videos, args.top_k,
                                         args.window)
  if jax.process_index() != 0:
    return 0  # process 0 writes and prints for all
  n_frames = sum(len(v.frame_paths) for v in dataset.videos[:args.max_videos])
  out = args.out or os.path.abspath(args.checkpoint)
  results_path = os.path.join(out, 'results.json')
  dataset_eval.write_json(results_path, results)
  n = len(dataset.videos if args.max_videos is None else dataset.videos[:args.max_videos])
  print(f'{config.data.dataset} {split}: {n} videos ({n_frames} frames), {len(results)} tracks '
        f'in {time.time() - t0:.1f} s on {jax.device_count()} devices of {jax.process_count()} '
        f'processes; wrote {results_path}')
  if not dataset.has_annotations:
    print(f'{dataset.json_path} has no annotations: submit {results_path} to the evaluation server')
    return 0
  if n < len(dataset.videos):
    gt = dataset_eval.subset_ground_truth(dataset.json_path, {v.id for v in dataset.videos[:n]})
    metrics = evaluation.evaluate_dicts(gt, results, gt_name=dataset.json_path,
                                        results_name=results_path)
  else:
    metrics = evaluation.evaluate(dataset.json_path, results_path)
  dataset_eval.write_json(os.path.join(out, 'metrics.json'), metrics)
  print(evaluation.format_table(metrics))
  sys.stdout.flush()
  return 0


def _watch(args) -> int:
  """--watch WORKDIR: a run's checkpoints -> WORKDIR/eval.jsonl, OUT/<step>/, OUT/best.json."""
  config = (config_lib.load_config(args.config) if args.config
            else watch.wait_for_config(args.watch, args.timeout))
  if args.tracker:
    config.inference.tracker = args.tracker
  dataset = watch.load_dataset(config, args.split, args.manual_dir)
  print(f'watching {os.path.abspath(args.watch)}: {config.data.dataset} {dataset.json_path}',
        flush=True)
  # The watcher's progress lines on stdout, for this command only (absl keeps the root logger at
  # WARNING; propagating would print them twice).
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
  level, propagate = watch.log.level, watch.log.propagate
  watch.log.addHandler(handler)
  watch.log.setLevel(logging.INFO)
  watch.log.propagate = False
  try:
    added = watch.watch(args.watch, config, dataset, args.out, args.max_videos, args.top_k,
                        args.window, args.timeout)
  finally:
    watch.log.removeHandler(handler)
    watch.log.setLevel(level)
    watch.log.propagate = propagate
  best = watch.best_row(watch.read_eval_rows(os.path.join(args.watch, watch.EVAL_JSONL)))
  print(f'evaluated {len(added)} checkpoints' + (f'; best AP {100 * best["eval/AP"]:.2f} at step '
                                                 f'{best["step"]}' if best else ''), flush=True)
  return 0


