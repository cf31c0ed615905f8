"""`minvis-jax evaluate`: MinVIS on a dataset split -> results JSON (+ metrics when it has GT)."""

import argparse
import os
import sys
import time

import jax

from minvis_jax import dataset_eval
from minvis_jax import evaluation
from minvis_jax import infer
from minvis_jax.data import ytvis


def main(argv=None) -> int:
  """`minvis-jax evaluate`: a dataset split -> OUT/results.json (+ OUT/metrics.json with GT)."""
  parser = argparse.ArgumentParser(prog=(argv or ['minvis-jax evaluate'])[0],
                                   description='MinVIS on a dataset split, scored when it has GT.')
  parser.add_argument('--config', default='', help='config file[:arg]; default: the checkpoint\'s')
  parser.add_argument('--checkpoint', required=True, help='model checkpoint directory')
  parser.add_argument('--split', default='', help='dataset split (default: config.data.eval_split)')
  parser.add_argument('--manual_dir', default='', help='dataset folder (default: data.manual_dir)')
  parser.add_argument('--out', default='', help='output directory (default: the checkpoint)')
  parser.add_argument('--max_videos', type=int, default=None, help='only the first N videos')
  parser.add_argument('--top_k', type=int, default=None, help='tracks per video (default: config)')
  parser.add_argument('--window', type=_window, default=None,
                      help='frames per device per forward, or auto (default: config)')
  parser.add_argument('--distributed', action='store_true',
                      help='jax.distributed.initialize(): every process of a pod, SLURM job or '
                           'launch/local_evaluate.sh evaluates its share of the videos')
  parser.add_argument('--coordinator', default=None, help='host:port for --distributed')
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  args = parser.parse_args((argv or [None])[1:])

  t0 = time.time()
  if args.distributed:
    from minvis_jax import train  # noqa: PLC0415  (its jax.distributed set-up, shared)
    train.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  config, variables = infer.load_model(args.checkpoint, args.config)
  split = args.split or config.data.get('eval_split', 'valid')
  manual_dir = args.manual_dir or config.data.manual_dir
  if not manual_dir:
    raise ValueError('no dataset folder: set data.manual_dir in the config or pass --manual_dir')
  dataset = ytvis.load_split(config.data.dataset, manual_dir, split)
  if dataset.num_classes != config.model.num_classes:
    raise ValueError(f'{dataset.json_path}: {dataset.num_classes} categories but the model has '
                     f'model.num_classes={config.model.num_classes}')
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


def _window(value: str) -> int | str:
  return value if value == 'auto' else int(value)
