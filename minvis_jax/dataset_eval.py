"""MinVIS over the videos of a dataset split on every device of every process -> results entries.

Videos are divided among processes (balanced by frame count, deterministic); each process runs its
videos with its windows sharded over its local devices (`VideoPredictor`), and the results are
gathered so that every process returns the whole list in dataset order, the same list as one process
on one device. Writing it is the caller's job, from process 0 only.
"""

import json
import os

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from minvis_jax import predictor as predictor_lib
from minvis_jax.data import ytvis


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


def predict_dataset(config, variables, dataset, max_videos: int | None = None,
                    top_k: int | None = None, window: int | str | None = None,
                    progress: bool = True, devices=None) -> list[dict]:
  """Runs MinVIS over the videos of a `VisDataset` (the first `max_videos` if given).

  Every process must call it (with the same arguments); each runs its share of the videos on its
  local devices. Returns, on every process, the results-file entries {video_id, category_id
  (dataset id), score, segmentations} of all videos in dataset order, one RLE per frame at the
  video's size. The progress bar is process 0's. devices: this process's devices to use (default:
  all local devices).
  """
  videos = dataset.videos if max_videos is None else dataset.videos[:max_videos]
  for video in videos:
    if not video.frame_paths:
      raise ValueError(f'{dataset.json_path}: video {video.id} ({video.name!r}): no frames')
  mine = assign_videos([len(v.frame_paths) for v in videos],
                       jax.process_count())[jax.process_index()]
  predictor = predictor_lib.from_config(config, variables, top_k, window, devices)
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
      tracks = predictor(predictor_lib.preprocess(frames(), config.data),
                         predictor_lib.valid_size(*size, config.data), size)
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


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def subset_ground_truth(json_path: str, video_ids: set) -> dict:
  """The ground-truth JSON restricted to `video_ids` (when only some videos were run)."""
  with open(json_path) as f:
    gt = json.load(f)
  gt['videos'] = [v for v in gt['videos'] if v['id'] in video_ids]
  gt['annotations'] = [a for a in gt.get('annotations', []) if a['video_id'] in video_ids]
  return gt
