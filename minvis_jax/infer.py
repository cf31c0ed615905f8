"""`minvis-jax infer`: one video file or frame folder -> results JSON + overlay video."""

import argparse
import itertools
import os
import time

from tqdm import tqdm

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import metrics_writer
from minvis_jax import predictor as predictor_lib
from minvis_jax import video_io
from minvis_jax import visualize

_DESCRIPTION = """\
MinVIS on one video (mp4 or anything ffmpeg reads, GIF, or a folder of jpg/png frames): writes
OUT/results.json (YouTube-VIS results format, dataset category ids) and OUT/overlay.mp4.

The model's config (the checkpoint's config.json, or --config) fixes how the video is run: the test
resolution (frames are resized to short side data.min_size_test, long side at most
data.max_size_test), the frames per forward (inference.window) and the tracks kept
(inference.top_k), and the class names drawn. --window and --top_k override those two; --set
overrides any config field (e.g. --set data.min_size_test=480).
"""

_EXAMPLES = """\
examples:
  minvis-jax infer --checkpoint ckpt --video clip.mp4 --out out
  minvis-jax infer --checkpoint ckpt --video frames/ --out out --fps 6 --score_threshold 0.5
  minvis-jax infer --checkpoint ckpt --video clip.mp4 --out out --set data.min_size_test=480
"""

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


def count_processed(frames, bar, predictor: predictor_lib.VideoPredictor):
  """Passes the model's input `frames` [Hp, Wp, 3] through, advancing `bar` by a window once the
  predictor has finished it.

  The predictor pulls the first frame of window k + 1 only after window k's masks are on the host,
  so that pull marks window k as processed; the last window is counted by the caller. Until the
  first window is done (it includes compiling the forward) the bar says 'compiling'.
  """
  bar.set_postfix_str('compiling', refresh=True)
  window = None
  for i, frame in enumerate(frames):
    window = window or predictor.frames_per_window(frame.shape[:2])
    if i and i % window == 0:
      if i == window:
        bar.set_postfix_str('', refresh=False)
      bar.update(window)
    yield frame


def _window_text(predictor: predictor_lib.VideoPredictor) -> str:
  n = predictor.mesh.devices.size
  if predictor.window == 'auto':
    return f'auto over {n} device{"s" * (n > 1)}'
  per_device = predictor.window // n
  return f'{per_device} frame{"s" * (per_device > 1)} per device x {n} device{"s" * (n > 1)}'


def main(argv=None) -> int:
  """`minvis-jax infer`: one video -> OUT/results.json and OUT/overlay.mp4 (or .gif)."""
  parser = argparse.ArgumentParser(prog=(argv or ['minvis-jax infer'])[0],
                                   description=_DESCRIPTION, epilog=_EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='minvis-jax checkpoint directory (written by convert or train)')
  parser.add_argument('--video', required=True, help='mp4/GIF file or folder of jpg/png frames')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--config', default='',
                      help='config name[:arg] or file; default: the checkpoint\'s config.json')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override a config field, e.g. --set data.min_size_test=480 '
                      '(repeatable)')
  parser.add_argument('--top_k', type=int, default=None,
                      help='tracks kept (default: the config\'s inference.top_k)')
  parser.add_argument('--window', type=predictor_lib.parse_window, default=None,
                      help='frames per device per forward, or auto (default: the config\'s '
                           'inference.window)')
  parser.add_argument('--tracker', choices=('minvis', 'memory'), default=None,
                      help='association mode (default: config.inference.tracker)')
  parser.add_argument('--score_threshold', type=float, default=0.3,
                      help='tracks drawn on the overlay need at least this score (all are in '
                      'results.json)')
  parser.add_argument('--fps', type=float, default=None,
                      help='frame rate of the overlay (default: the source video\'s; 10 for a '
                      'frame folder)')
  args = parser.parse_args((argv or [None])[1:])

  t0 = time.time()
  config, variables = checkpoints.load_model(args.checkpoint, args.config)
  if args.tracker:
    config.inference.tracker = args.tracker
  config_lib.apply_overrides(config, args.set)
  ids, names = _category_table(config)
  video = video_io.open_video(args.video)
  first = next(video.frames, None)
  if first is None:
    raise ValueError(f'{args.video}: the video has no frames')
  size = first.shape[:2]
  frames = video_io.same_size(itertools.chain([first], video.frames), size, args.video)
  predictor = predictor_lib.from_config(config, variables, args.top_k, args.window)
  valid = predictor_lib.valid_size(*size, config.data)
  # Updated once per window (a few per second at most): print every update.
  with tqdm(total=video.num_frames, unit='frame', desc='infer', dynamic_ncols=True, miniters=1,
            mininterval=0) as bar:
    tracks = predictor(
        count_processed(predictor_lib.preprocess(frames, config.data), bar, predictor), valid, size)
    num_frames = len(tracks[0]['segmentations']) if tracks else 0
    bar.set_postfix_str('', refresh=False)
    bar.update(num_frames - bar.n)
  results = predictor_lib.results_for_video(tracks, 1, ids)
  results_path = os.path.join(args.out, 'results.json')
  metrics_writer.write_json(results_path, results)

  # Second pass over the video: the masks of a track are only known once it has ended.
  fps = args.fps or video.fps or 10.0
  with tqdm(video_io.same_size(video_io.read_video(args.video), size, args.video),
            total=num_frames, unit='frame', desc='overlay', dynamic_ncols=True) as again, \
       video_io.ffmpeg_without_preexec():
    video_path = visualize.overlay_video(
        os.path.join(args.out, 'overlay.mp4'), again, tracks,
        [names[t['category']] for t in tracks], args.score_threshold, fps)
  shown = sum(t['score'] >= args.score_threshold for t in tracks)

  source = (args.config or 'the checkpoint\'s config.json') + (
      ' and flags' if args.set or args.window or args.top_k else '')
  rate = f' at {video.fps:g} fps' if video.fps else ''
  print(f'{args.video}: {num_frames} frames of {size[0]}x{size[1]}{rate}, run at {valid[0]}x'
        f'{valid[1]} (data.min_size_test={config.data.min_size_test}, max_size_test='
        f'{config.data.max_size_test}), window {_window_text(predictor)}, top {predictor.top_k} '
        f'(from {source}): {len(tracks)} tracks ({shown} with score >= {args.score_threshold}) in '
        f'{time.time() - t0:.1f} s')
  for track in tracks:
    print(f'  {names[track["category"]]:>16}  score {track["score"]:.3f}')
  print(f'wrote {results_path} and {video_path} ({fps:g} fps)')
  return 0
