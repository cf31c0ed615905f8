"""Evaluating a model on a dataset split: MinVIS over its videos on every device of every process,
then the YouTube-VIS metric (ytvis_eval.py) on the videos run.

`score` is the one "predict, subset the ground truth to the videos run, score" path: the `evaluate`
command (`run`), the checkpoint watcher (watch.py), evaluation inside `train` and the demo use it.

Videos are divided among processes (balanced by frame count, deterministic); each process runs its
videos with its windows sharded over its local devices (`VideoPredictor`), and the results are
gathered so that every process has the whole list in dataset order, the same list as one process
on one device. Files are written and metrics computed by process 0 only.
"""

import json
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from minvis_jax import metrics_writer
from minvis_jax import model_forward
from minvis_jax import paths
from minvis_jax import predictor as predictor_lib
from minvis_jax import user_input
from minvis_jax import ytvis_eval
from minvis_jax.data import categories
from minvis_jax.data import rle
from minvis_jax.data import ytvis


def load_dataset(config, split: str = '', require_annotations: bool = True) -> ytvis.VisDataset:
  """The split `split` (default `data.eval_split`) of the dataset under `data.manual_dir`, checked
  against the model's classes and the config's category table, and for ground truth (to score it)
  if required."""
  split = split or config.data.get('eval_split', 'valid')
  manual_dir = config.data.manual_dir
  if not manual_dir:
    raise ValueError('no dataset folder: set data.manual_dir in the config or pass --manual_dir')
  dataset = categories.check(config.data, ytvis.load_split(config.data.dataset, manual_dir, split))
  if dataset.num_classes != config.model.num_classes:
    raise ValueError(f'{dataset.json_path}: {dataset.num_classes} categories but the model has '
                     f'model.num_classes={config.model.num_classes}')
  if require_annotations and not dataset.has_annotations:
    raise ValueError(f'{dataset.json_path} has no annotations: evaluating checkpoints needs a '
                     'split with ground truth')
  return dataset


def first_videos(dataset: ytvis.VisDataset, max_videos: int | None) -> tuple[ytvis.Video, ...]:
  """The first `max_videos` videos of `dataset` (all when None or 0)."""
  return dataset.videos[:max_videos] if max_videos else dataset.videos


def assign_videos(num_frames: list[int], num_processes: int) -> list[list[int]]:
  """Video indices per process: longest first to the process with the fewest frames so far (ties:
  the lowest index), each process's list in dataset order. Deterministic on every process."""
  order = sorted(range(len(num_frames)), key=lambda i: (-num_frames[i], i))
  load = [0] * num_processes
  shares = [[] for _ in range(num_processes)]
  for i in order:
    p = min(range(num_processes), key=lambda p: (load[p], p))
    shares[p].append(i)
    load[p] += num_frames[i]
  return [sorted(s) for s in shares]


def predict_dataset(config, variables, dataset: ytvis.VisDataset, max_videos: int | None = None,
                    progress: bool = True, devices=None) -> list[dict]:
  """Runs MinVIS over the videos of a `VisDataset` (the first `max_videos` if given and not 0).

  Every process must call it (with the same arguments); each runs its share of the videos on its
  local devices. Returns, on every process, the results-file entries {video_id, category_id
  (dataset id), score, segmentations} of all videos in dataset order, one RLE per frame at the
  video's size, with the config's `inference` settings. The progress bar is process 0's.
  devices: this process's devices to use (default: all local devices).
  """
  videos = first_videos(dataset, max_videos)
  for video in videos:
    if not video.frame_paths:
      raise ValueError(f'{dataset.json_path}: video {video.id} ({video.name!r}): no frames')
  mine = assign_videos([len(v.frame_paths) for v in videos],
                       jax.process_count())[jax.process_index()]
  predictor = model_forward.from_config(config, variables, devices)
  results = {}
  bar = tqdm(total=sum(len(videos[i].frame_paths) for i in mine), unit='frame', desc='evaluate',
             disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  with bar:
    for i in mine:
      video = videos[i]
      where = f'{dataset.json_path}: video {video.id} ({video.name!r})'
      bar.set_postfix_str(str(video.name), refresh=False)

      def frames(video=video, where=where):
        for path in video.frame_paths:
          image = ytvis.read_frame(path)
          ytvis.check_frame_size(image, video, path, where)
          bar.update(1)
          yield image
      size = (video.height, video.width)
      try:
        valid = predictor_lib.valid_size(*size, config.data)
      except ValueError as e:
        raise ValueError(f'{where}: {e}') from None
      tracks = predictor(predictor_lib.preprocess(frames(), config.data), valid, size)
      results[i] = predictor_lib.results_for_video(tracks, video.id, dataset.category_ids)
  if jax.process_count() > 1:
    results = _gather(results)
  return [r for i in sorted(results) for r in results[i]]


def _gather(results: dict[int, list]) -> dict[int, list]:
  """Every process's {video index: entries} merged, on every process (JSON bytes through one
  padded all-gather; floats round-trip exactly)."""
  data = np.frombuffer(json.dumps(sorted(results.items())).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))   # [P, 1]
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = multihost_utils.process_allgather(padded)                            # [P, max]
  merged = {}
  for row, n in zip(every, sizes[:, 0]):
    merged.update({int(i): r for i, r in json.loads(bytes(row[:n]).decode())})
  return merged


def _subset_ground_truth(json_path: str, video_ids: set) -> dict:
  """The ground-truth JSON restricted to `video_ids` (the videos that were run)."""
  gt = rle.load_json(json_path, 'annotation')
  gt['videos'] = [v for v in gt['videos'] if v['id'] in video_ids]
  gt['annotations'] = [a for a in gt.get('annotations', []) if a['video_id'] in video_ids]
  return gt


def score(config, variables, dataset: ytvis.VisDataset, max_videos: int | None = None,
          progress: bool = False, results_name: str = 'results') -> tuple[list[dict], dict | None]:
  """(results entries, metrics) of MinVIS with `variables` on the first `max_videos` videos of
  `dataset` (all when None or 0), scored against the ground truth of those videos.

  Every process calls it; every process gets the results, metrics are computed on process 0 only
  (None elsewhere, and when the split has no annotations). results_name names the results in the
  metric's errors (e.g. the results.json they are written to)."""
  results = predict_dataset(config, variables, dataset, max_videos=max_videos or None,
                            progress=progress)
  if jax.process_index() != 0 or not dataset.has_annotations:
    return results, None
  gt = _subset_ground_truth(dataset.json_path, {v.id for v in first_videos(dataset, max_videos)})
  return results, ytvis_eval.evaluate_dicts(gt, results, gt_name=dataset.json_path,
                                            results_name=results_name)


def eval_scalars(metrics: dict) -> dict[str, float]:
  """{'eval/AP': ..., 'eval/AP50': ..., ...}: the names evaluations log under (JSON lines and
  TensorBoard tags), in-training and by the watcher alike."""
  return {f'eval/{k}': float(v) for k, v in metrics.items()}


def run(config, variables, checkpoint: str, out: str = '', split: str = '',
        max_videos: int = 0) -> int:
  """The `evaluate --checkpoint` command after the model is loaded: the split `split` (default
  `data.eval_split`) -> OUT/results.json (+ OUT/metrics.json and a table when it has ground
  truth); OUT defaults to the checkpoint directory. Every process calls it; process 0 writes."""
  t0 = time.time()
  dataset = load_dataset(config, split, require_annotations=False)
  out = out or paths.abspath(checkpoint)
  user_input.check_output_dir(out, '--out')   # before the work, not after it
  results_path = paths.join(out, 'results.json')
  results, metrics = score(config, variables, dataset, max_videos, progress=True,
                           results_name=results_path)
  if jax.process_index() != 0:
    return 0  # process 0 writes and prints for all
  videos = first_videos(dataset, max_videos)
  metrics_writer.write_json(results_path, results)
  print(f'{config.data.dataset} {split or config.data.get("eval_split", "valid")}: {len(videos)} '
        f'videos ({sum(len(v.frame_paths) for v in videos)} frames), {len(results)} tracks in '
        f'{time.time() - t0:.1f} s on {jax.device_count()} devices of {jax.process_count()} '
        f'processes; wrote {results_path}')
  if metrics is None:
    print(f'{dataset.json_path} has no annotations: submit {results_path} to the evaluation server')
    return 0
  metrics_writer.write_json(paths.join(out, 'metrics.json'), metrics)
  print(ytvis_eval.format_table(metrics))
  sys.stdout.flush()
  return 0
