"""`minvis-jax infer`: one video file or frame folder -> results JSON + overlay video."""

import argparse
import itertools
import os
import time

from tqdm import tqdm

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import dataset_eval
from minvis_jax import predictor as predictor_lib
from minvis_jax import video_io
from minvis_jax import visualize


def load_model(checkpoint: str, config_spec: str):
  """(config, variables): the checkpoint's own config unless `config_spec` is given."""
  config, variables = checkpoints.load_for_inference(checkpoint)
  if config_spec:
    config = config_lib.load_config(config_spec)
  if config is None:
    raise ValueError(f'{os.path.abspath(checkpoint)}: the checkpoint has no config.json; '
                     f'pass --config')
  return config, variables


def _category_table(config) -> tuple[list[int], list[str]]:
  """(dataset category id, name) of class index 0..K-1: the config's if it has them, else 1..K."""
  k = config.model.num_classes
  data = config.get('data', {}) or {}
  ids = list(data.get('category_ids', None) or range(1, k + 1))
  names = list(data.get('category_names', None) or [f'class {i}' for i in ids])
  if len(ids) != k or len(names) != k:
    raise ValueError(f'config: data.category_ids/category_names have {len(ids)}/{len(names)} '
                     f'entries for model.num_classes={k}')
  return ids, names


def main(argv=None) -> int:
  """`minvis-jax infer`: one video -> OUT/results.json and OUT/overlay.mp4 (or .gif)."""
  parser = argparse.ArgumentParser(prog=(argv or ['minvis-jax infer'])[0],
                                   description='MinVIS on one video (mp4/GIF or frame folder).')
  parser.add_argument('--checkpoint', required=True, help='model checkpoint directory')
  parser.add_argument('--video', required=True, help='mp4/GIF file or folder of jpg/png frames')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--config', default='', help='config file[:arg]; default: the checkpoint\'s')
  parser.add_argument('--top_k', type=int, default=None, help='tracks kept (default: config)')
  parser.add_argument('--window', type=int, default=None,
                      help='frames per forward (default: config)')
  parser.add_argument('--tracker', choices=('minvis', 'memory'), default=None,
                      help='association mode (default: config.inference.tracker)')
  parser.add_argument('--score_threshold', type=float, default=0.3,
                      help='tracks drawn on the overlay need at least this score')
  parser.add_argument('--fps', type=float, default=10.0, help='frame rate of the overlay video')
  args = parser.parse_args((argv or [None])[1:])

  t0 = time.time()
  config, variables = load_model(args.checkpoint, args.config)
  if args.tracker:
    config.inference.tracker = args.tracker
  count, frames = video_io.open_video(args.video)
  first = next(frames, None)
  if first is None:
    raise ValueError(f'{args.video}: the video has no frames')
  size = first.shape[:2]
  frames = video_io.same_size(itertools.chain([first], frames), size, args.video)
  bar = tqdm(frames, total=count, unit='frame', desc='infer', dynamic_ncols=True)
  tracks = predictor_lib.from_config(config, variables, args.top_k, args.window)(
      predictor_lib.preprocess(bar, config.data), predictor_lib.valid_size(*size, config.data),
      size)
  bar.close()
  num_frames = len(tracks[0]['segmentations']) if tracks else 0
  ids, names = _category_table(config)
  results = predictor_lib.results_for_video(tracks, 1, ids)
  results_path = os.path.join(args.out, 'results.json')
  dataset_eval.write_json(results_path, results)

  # Second pass over the video: the masks of a track are only known once it has ended.
  video_path = visualize.overlay_video(
      os.path.join(args.out, 'overlay.mp4'),
      video_io.same_size(video_io.read_video(args.video), size, args.video),
      tracks, [names[t['category']] for t in tracks], args.score_threshold, args.fps)
  shown = sum(t['score'] >= args.score_threshold for t in tracks)

  print(f'{args.video}: {num_frames} frames of {size[0]}x{size[1]}, {len(tracks)} tracks '
        f'({shown} with score >= {args.score_threshold}) in {time.time() - t0:.1f} s')
  for track in tracks:
    print(f'  {names[track["category"]]:>16}  score {track["score"]:.3f}')
  print(f'wrote {results_path} and {video_path}')
  return 0


