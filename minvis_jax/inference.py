"""MinVIS video inference: per-frame forward in windows, online association, video-level results.

Device memory is flat in the number of frames: one jitted forward over `window` frames at a time
(the last window padded and marked invalid, so one compiled shape serves the whole video). The host
keeps, per frame, the reordered stride-4 mask logits as float16 (top-k is only known at the end).

Also the `minvis-jax infer` (one video file or frame folder -> results JSON + overlay video) and
`minvis-jax evaluate` (a dataset split -> results JSON + metrics) commands.
"""

import argparse
import functools
import itertools
import json
import os
import sys
import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import evaluation
from minvis_jax import tracking
from minvis_jax import visualize
from minvis_jax.data import transforms
from minvis_jax.data import ytvis
from minvis_jax.models import Mask2Former


def _windows(images: Iterable[np.ndarray], window: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Frames [Hp, Wp, 3] -> (batch [window, Hp, Wp, 3], valid [window]); the last one padded."""
  batch = []
  for image in images:
    batch.append(np.asarray(image, np.float32))
    if len(batch) == window:
      yield np.stack(batch), np.ones(window, bool)
      batch = []
  if batch:
    n = len(batch)
    pad = [np.zeros_like(batch[0])] * (window - n)
    yield np.stack(batch + pad), np.arange(window) < n


@functools.lru_cache(maxsize=8)
def _step_fn(model_config_json: str):
  """The jitted window step of a model config, shared by every predictor of that model (so a new
  predictor, e.g. per command or per test, reuses the compiled forward of the same shapes)."""
  model = Mask2Former(ml_collections.ConfigDict(json.loads(model_config_json)))

  @jax.jit
  def step(variables, state, images, valid):
    out = model.apply(variables, images)
    state, perm = tracking.associate_chunk(state, out['pred_embds'], valid)
    logits = tracking.reorder(out['pred_logits'], perm)           # [W, Q, K+1]
    masks = tracking.reorder(out['pred_masks'], perm)             # [W, Q, H/4, W/4]
    logit_sum = jnp.sum(jnp.where(valid[:, None, None], logits, 0.0), axis=0)
    return state, logit_sum, masks.astype(jnp.float16)
  return step


class VideoPredictor:
  """Runs MinVIS on one video at a time with a fixed model and window size."""

  def __init__(self, model_config, variables, window: int = 30, top_k: int = 10):
    self.variables = variables
    self.window = window
    self.top_k = top_k
    self._step = _step_fn(model_config.to_json())
    self._init_state = tracking.init_state(model_config.num_queries, model_config.hidden_dim)

  def __call__(self, images: Iterable[np.ndarray], valid_size: tuple[int, int],
               out_size: tuple[int, int]) -> list[dict]:
    """images: iterable of normalised, zero-padded frames [Hp, Wp, 3]; valid_size (h, w) of the
    resized image inside the padding; out_size (H, W) of the original frames.

    Returns the top-k tracks: {'category': 0-based class, 'score', 'segmentations': [RLE per frame]}.
    """
    state = self._init_state
    logit_sum, frames, padded_size = None, [], None
    for batch, valid in _windows(images, self.window):
      padded_size = batch.shape[1:3]
      state, s, masks = self._step(self.variables, state, jnp.asarray(batch), jnp.asarray(valid))
      logit_sum = s if logit_sum is None else logit_sum + s
      frames.extend(np.asarray(masks)[valid])
    if not frames:
      raise ValueError('a video needs at least one frame')
    probs = jax.nn.softmax(logit_sum / len(frames), axis=-1)[:, :-1]    # [Q, K]
    num_classes = probs.shape[1]
    k = min(self.top_k, probs.size)
    scores, flat = jax.lax.top_k(probs.reshape(-1), k)
    queries = np.asarray(flat) // num_classes
    resize = _mask_resizer(tuple(padded_size), tuple(valid_size), tuple(out_size))
    segs = [[] for _ in range(k)]
    for frame in frames:
      binary = np.asarray(resize(jnp.asarray(frame[queries], jnp.float32)))   # [k, H, W] bool
      rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
      for i, r in enumerate(rles):
        segs[i].append({'size': r['size'], 'counts': r['counts'].decode()})
    return [{'category': int(c), 'score': float(s), 'segmentations': seg}
            for c, s, seg in zip(np.asarray(flat) % num_classes, np.asarray(scores), segs)]


@functools.lru_cache(maxsize=16)  # one compiled resize per frame geometry, shared by all videos
def _mask_resizer(padded_size, valid_size, out_size):
  """Mask logits [k, Hp/4, Wp/4] -> bool [k, H, W]: to the padded input size, crop the valid
  image, to the original size (bilinear, no antialias), threshold at logit > 0 (SPEC 1)."""
  hp, wp = padded_size
  h, w = valid_size
  oh, ow = out_size

  @jax.jit
  def resize(m):
    m = jax.image.resize(m, (m.shape[0], hp, wp), 'bilinear', antialias=False)[:, :h, :w]
    return jax.image.resize(m, (m.shape[0], oh, ow), 'bilinear', antialias=False) > 0
  return resize


def results_for_video(tracks: list[dict], video_id, category_ids: list[int]) -> list[dict]:
  """Tracks of `VideoPredictor` -> results-file entries (dataset category ids)."""
  return [{'video_id': video_id, 'category_id': int(category_ids[t['category']]),
           'score': t['score'], 'segmentations': t['segmentations']} for t in tracks]


# ------------------------------------------------------------------------------------------------
# Reading videos and running a model checkpoint over them.

FRAME_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _open_video(path: str) -> tuple[int | None, Iterator[np.ndarray]]:
  """(number of frames or None when unknown, iterator of uint8 [H, W, 3]); checks up front."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f'{path}: no {"/".join(FRAME_EXTENSIONS)} frames in this folder')
    return len(files), (ytvis.read_frame(os.path.join(path, f)) for f in files)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such video file or frame folder')
  if path.lower().endswith('.gif'):
    from PIL import Image, ImageSequence  # noqa: PLC0415
    try:
      with Image.open(path) as im:
        frames = [np.asarray(f.convert('RGB')) for f in ImageSequence.Iterator(im)]
    except (OSError, ValueError) as e:
      raise ValueError(f'{path}: unreadable GIF ({e})') from None
    return len(frames), iter(frames)
  if not visualize.mp4_available():
    raise ValueError(f'{path}: reading video files needs the imageio-ffmpeg package '
                     f'(pip install imageio-ffmpeg); or pass a folder of jpg/png frames')
  import imageio.v2 as imageio  # noqa: PLC0415
  try:
    reader = imageio.get_reader(path, format='ffmpeg')
    count = reader.get_meta_data().get('nframes')
  except Exception as e:  # imageio/ffmpeg raise assorted errors on bad files
    raise ValueError(f'{path}: not a readable video ({type(e).__name__}: {e})') from None

  def frames():
    try:
      for i, frame in enumerate(reader):
        if frame.ndim != 3 or frame.shape[2] != 3:
          raise ValueError(f'{path}: frame {i} has shape {frame.shape}, expected [H, W, 3]')
        yield np.asarray(frame, np.uint8)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'{path}: video decoding failed ({e})') from None
    finally:
      reader.close()
  known = isinstance(count, (int, float)) and np.isfinite(count) and count > 0
  return (int(count) if known else None), frames()


def read_video(path: str) -> Iterator[np.ndarray]:
  """The frames of a video: uint8 [H, W, 3] RGB, read lazily.

  `path` is a folder of frames (its .jpg/.jpeg/.png files in sorted name order), an mp4 (or another
  format ffmpeg reads; needs imageio-ffmpeg) or a GIF. A missing or unreadable input raises
  FileNotFoundError / ValueError naming the path, before any frame is read where possible.
  """
  return _open_video(path)[1]


def _same_size(frames: Iterable[np.ndarray], size: tuple[int, int], where: str):
  for t, frame in enumerate(frames):
    if frame.shape[:2] != tuple(size):
      raise ValueError(f'{where}: frame {t} is {frame.shape[0]}x{frame.shape[1]}, the video is '
                       f'{size[0]}x{size[1]}')
    yield frame


def _preprocess(frames: Iterable[np.ndarray], data_config) -> Iterator[np.ndarray]:
  """uint8 frames -> the model's test input (SPEC 1): resized, normalised, padded."""
  for frame in frames:
    yield transforms.test_frame(frame, data_config.min_size_test, data_config.max_size_test,
                                data_config.mean, data_config.std,
                                data_config.size_divisibility)[0]


def _valid_size(height: int, width: int, data_config) -> tuple[int, int]:
  return transforms.resize_shape(height, width, data_config.min_size_test,
                                 data_config.max_size_test)


def _predictor(config, variables, top_k: int | None = None,
               window: int | None = None) -> VideoPredictor:
  inf = config.get('inference', {}) or {}
  return VideoPredictor(config.model, variables, window or inf.get('window', 30),
                        top_k or inf.get('top_k', 10))


def predict_dataset(config, variables, dataset, max_videos: int | None = None,
                    top_k: int | None = None, window: int | None = None,
                    progress: bool = True) -> list[dict]:
  """Runs MinVIS over the videos of a `VisDataset` (the first `max_videos` if given).

  Returns results-file entries {video_id, category_id (dataset id), score, segmentations} with one
  RLE per frame at the video's size.
  """
  videos = dataset.videos if max_videos is None else dataset.videos[:max_videos]
  predictor = _predictor(config, variables, top_k, window)
  results = []
  bar = tqdm(total=sum(len(v.frame_paths) for v in videos), unit='frame', disable=not progress,
             desc='evaluate', dynamic_ncols=True)
  with bar:
    for video in videos:
      where = f'{dataset.json_path}: video {video.id} ({video.name!r})'
      if not video.frame_paths:
        raise ValueError(f'{where}: no frames')
      bar.set_postfix_str(str(video.name), refresh=False)

      def frames(video=video, where=where):
        for path in video.frame_paths:
          image = ytvis.read_frame(path)
          ytvis.check_frame_size(image, video, path, where)
          bar.update(1)
          yield image
      size = (video.height, video.width)
      tracks = predictor(_preprocess(frames(), config.data), _valid_size(*size, config.data), size)
      results.extend(results_for_video(tracks, video.id, dataset.category_ids))
  return results


def _load_model(checkpoint: str, config_spec: str):
  """(config, variables): the checkpoint's own config unless `config_spec` is given."""
  config, variables = checkpoints.load_for_inference(checkpoint)
  if config_spec:
    config = config_lib.load_config(config_spec)
  if config is None:
    raise ValueError(f'{os.path.abspath(checkpoint)}: the checkpoint has no config.json; '
                     f'pass --config')
  return config, variables


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


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


def infer_main(argv=None) -> int:
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
  parser.add_argument('--score_threshold', type=float, default=0.3,
                      help='tracks drawn on the overlay need at least this score')
  parser.add_argument('--fps', type=float, default=10.0, help='frame rate of the overlay video')
  args = parser.parse_args((argv or [None])[1:])

  t0 = time.time()
  config, variables = _load_model(args.checkpoint, args.config)
  count, frames = _open_video(args.video)
  first = next(frames, None)
  if first is None:
    raise ValueError(f'{args.video}: the video has no frames')
  size = first.shape[:2]
  frames = _same_size(itertools.chain([first], frames), size, args.video)
  bar = tqdm(frames, total=count, unit='frame', desc='infer', dynamic_ncols=True)
  tracks = _predictor(config, variables, args.top_k, args.window)(
      _preprocess(bar, config.data), _valid_size(*size, config.data), size)
  bar.close()
  num_frames = len(tracks[0]['segmentations']) if tracks else 0
  ids, names = _category_table(config)
  results = results_for_video(tracks, 1, ids)
  results_path = os.path.join(args.out, 'results.json')
  write_json(results_path, results)

  # Second pass over the video: the masks of a track are only known once it has ended.
  video_path = visualize.overlay_video(
      os.path.join(args.out, 'overlay.mp4'), _same_size(read_video(args.video), size, args.video),
      tracks, [names[t['category']] for t in tracks], args.score_threshold, args.fps)
  shown = sum(t['score'] >= args.score_threshold for t in tracks)

  print(f'{args.video}: {num_frames} frames of {size[0]}x{size[1]}, {len(tracks)} tracks '
        f'({shown} with score >= {args.score_threshold}) in {time.time() - t0:.1f} s')
  for track in tracks:
    print(f'  {names[track["category"]]:>16}  score {track["score"]:.3f}')
  print(f'wrote {results_path} and {video_path}')
  return 0


def _subset_ground_truth(json_path: str, video_ids: set) -> dict:
  """The ground-truth JSON restricted to `video_ids` (when only some videos were run)."""
  with open(json_path) as f:
    gt = json.load(f)
  gt['videos'] = [v for v in gt['videos'] if v['id'] in video_ids]
  gt['annotations'] = [a for a in gt.get('annotations', []) if a['video_id'] in video_ids]
  return gt


def evaluate_main(argv=None) -> int:
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
  parser.add_argument('--window', type=int, default=None,
                      help='frames per forward (default: config)')
  args = parser.parse_args((argv or [None])[1:])

  t0 = time.time()
  config, variables = _load_model(args.checkpoint, args.config)
  split = args.split or config.data.get('eval_split', 'valid')
  manual_dir = args.manual_dir or config.data.manual_dir
  if not manual_dir:
    raise ValueError('no dataset folder: set data.manual_dir in the config or pass --manual_dir')
  dataset = ytvis.load_split(config.data.dataset, manual_dir, split)
  if dataset.num_classes != config.model.num_classes:
    raise ValueError(f'{dataset.json_path}: {dataset.num_classes} categories but the model has '
                     f'model.num_classes={config.model.num_classes}')
  results = predict_dataset(config, variables, dataset, args.max_videos, args.top_k, args.window)
  out = args.out or os.path.abspath(args.checkpoint)
  results_path = os.path.join(out, 'results.json')
  write_json(results_path, results)
  n = len(dataset.videos if args.max_videos is None else dataset.videos[:args.max_videos])
  print(f'{config.data.dataset} {split}: {n} videos, {len(results)} tracks in '
        f'{time.time() - t0:.1f} s; wrote {results_path}')
  if not dataset.has_annotations:
    print(f'{dataset.json_path} has no annotations: submit {results_path} to the evaluation server')
    return 0
  if n < len(dataset.videos):
    gt = _subset_ground_truth(dataset.json_path, {v.id for v in dataset.videos[:n]})
    metrics = evaluation.evaluate_dicts(gt, results, gt_name=dataset.json_path,
                                        results_name=results_path)
  else:
    metrics = evaluation.evaluate(dataset.json_path, results_path)
  write_json(os.path.join(out, 'metrics.json'), metrics)
  print(evaluation.format_table(metrics))
  sys.stdout.flush()
  return 0
