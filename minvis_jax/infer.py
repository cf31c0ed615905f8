"""MinVIS on one video (mp4 or anything ffmpeg reads, GIF, or a folder of jpg/png frames): writes
OUT/results.json (YouTube-VIS results format, dataset category ids) and OUT/overlay.mp4.

The model's config (the checkpoint's config.json, or --config) fixes how the video is run: the test
resolution (frames are resized to short side data.min_size_test, long side at most
data.max_size_test), the frames per forward (inference.window), the tracks kept (inference.top_k),
the association (inference.tracker) and the class names drawn. --set overrides any config field.

  minvis-jax infer --checkpoint ckpt --video clip.mp4 --out out
  minvis-jax infer --checkpoint ckpt --video frames/ --out out --fps 6 --score_threshold 0.5
  minvis-jax infer --checkpoint ckpt --video clip.mp4 --out out --set data.min_size_test=480

--online reports each frame's visible tracks as soon as it is processed (OUT/frames.jsonl, one JSON
line a frame, flushed), from a file, a frame folder, a URL ffmpeg opens, or PNG frames on stdin
(--video -); docs/online.md:

  ffmpeg -i rtsp://camera/stream -f image2pipe -c:v png - | \
      minvis-jax infer --checkpoint ckpt --video - --out out --online
"""

import itertools
import json
import os
import time
from typing import Sequence

import ml_collections
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from minvis_jax import live_model
from minvis_jax import metrics_writer
from minvis_jax import online
from minvis_jax import predictor as predictor_lib
from minvis_jax import tracking
from minvis_jax import video_io
from minvis_jax import visualize
from minvis_jax.models import ModelConfig

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


def run(config: ml_collections.ConfigDict, variables: dict, video_path: str, out: str,
        score_threshold: float, fps: float | None, settings_from: str) -> int:
  """Runs the model of `config`/`variables` on one video and writes OUT/results.json (YouTube-VIS
  results format, dataset category ids) and OUT/overlay.mp4 (or .gif); prints a summary.

  Args:
    config: the experiment (model, data.min/max_size_test, inference.window/top_k/tracker).
    variables: the model's variables.
    video_path: an mp4 (anything ffmpeg reads), a GIF, or a folder of jpg/png frames.
    out: output directory.
    score_threshold: tracks drawn on the overlay need at least this score (all are in the JSON).
    fps: the overlay's frame rate; None: the source video's, 10 for a frame folder.
    settings_from: where the config came from, for the summary line.
  """
  t0 = time.time()
  ids, names = _category_table(config)
  if video_path == '-':
    raise ValueError('--video -: frames on stdin need --online (offline infer reads a video twice)')
  video = video_io.open_video(video_path)
  first = next(video.frames, None)
  if first is None:
    raise ValueError(f'{video_path}: the video has no frames')
  size = first.shape[:2]
  frames = video_io.same_size(itertools.chain([first], video.frames), size, video_path)
  predictor = predictor_lib.from_config(config, variables)
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
  results_path = os.path.join(out, 'results.json')
  metrics_writer.write_json(results_path, results)

  # Second pass over the video: the masks of a track are only known once it has ended.
  fps = fps or video.fps or 10.0
  with tqdm(video_io.same_size(video_io.read_video(video_path), size, video_path),
            total=num_frames, unit='frame', desc='overlay', dynamic_ncols=True) as again, \
       video_io.ffmpeg_without_preexec():
    overlay_path = visualize.overlay_video(
        os.path.join(out, 'overlay.mp4'), again, tracks,
        [names[t['category']] for t in tracks], score_threshold, fps)
  shown = sum(t['score'] >= score_threshold for t in tracks)

  rate = f' at {video.fps:g} fps' if video.fps else ''
  print(f'{video_path}: {num_frames} frames of {size[0]}x{size[1]}{rate}, run at {valid[0]}x'
        f'{valid[1]} (data.min_size_test={config.data.min_size_test}, max_size_test='
        f'{config.data.max_size_test}), window {_window_text(predictor)}, top {predictor.top_k} '
        f'(from {settings_from}): {len(tracks)} tracks ({shown} with score >= {score_threshold}) '
        f'in {time.time() - t0:.1f} s')
  for track in tracks:
    print(f'  {names[track["category"]]:>16}  score {track["score"]:.3f}')
  print(f'wrote {results_path} and {overlay_path} ({fps:g} fps)')
  return 0


def _online_lines(tracker: online.OnlineTracker, frames, lines, ids, names, fps, latencies,
                  overlay: bool):
  """Runs `tracker` frame by frame, writing and flushing each frame's JSON line to `lines` and its
  processing time (frame in hand -> its tracks encoded) to `latencies`; yields the overlay frames
  (or nothing, without `overlay`)."""
  for i, frame in enumerate(frames):
    t0 = time.perf_counter()
    [result] = tracker.process([frame])
    tracks = [{'id': t['id'], 'category_id': int(ids[t['category']]),
               'category': names[t['category']], 'score': round(t['score'], 5),
               'segmentation': t['segmentation']} for t in result.tracks]
    latency = time.perf_counter() - t0
    lines.write(json.dumps({'frame': i, 'time': round(i / fps, 6) if fps else None,
                            'latency_ms': round(1000 * latency, 2), 'tracks': tracks}) + '\n')
    lines.flush()
    latencies.append(latency)
    if overlay:
      masks = np.array([mask_utils.decode(dict(t['segmentation'],
                                               counts=t['segmentation']['counts'].encode()))
                        for t in tracks], bool).reshape(-1, *frame.shape[:2])
      colors = [visualize.track_colors(t['id'])[-1] for t in tracks]
      yield visualize.overlay(frame, masks, [f'{t["id"]} {t["category"]}' for t in tracks],
                              [t['score'] for t in tracks], np.array(colors, np.uint8))


def latency_text(latencies: list[float], seconds: float) -> str:
  """'N frames, latency p50 X ms / p95 Y ms per frame; first frame Z s with compiling; F frames/s
  overall': the percentiles over the frames after the first (whose time includes compiling)."""
  if not latencies:
    return '0 frames'
  rest = latencies[1:] or latencies
  p50, p95 = (1000 * np.percentile(rest, q) for q in (50, 95))
  rate = len(latencies) / seconds if seconds > 0 else 0.0
  return (f'{len(latencies)} frames, latency p50 {p50:.1f} ms / p95 {p95:.1f} ms per frame; first '
          f'frame {latencies[0]:.2f} s with compiling; {rate:.2f} frames/s overall')


def run_online(config: ml_collections.ConfigDict, variables: dict, video_path: str, out: str,
               options: Sequence[str], fps: float | None, settings_from: str) -> int:
  """Online MinVIS on a stream (`video_io.open_video`, '-' for PNG frames on stdin): each frame's
  visible tracks go to OUT/frames.jsonl as soon as it is processed (flushed; Ctrl-C or the end of
  the stream closes the file with every line written); options: 'summary' writes OUT/results.json
  (the offline result) at the end, 'overlay' OUT/overlay.mp4 as it goes. Prints the latency."""
  summary, overlay = 'summary' in options, 'overlay' in options
  ids, names = _category_table(config)
  video = video_io.open_video(video_path)
  first = next(video.frames, None)
  if first is None:
    raise ValueError(f'{video_path}: the video has no frames')
  size = first.shape[:2]
  frames = video_io.same_size(itertools.chain([first], video.frames), size, video_path)
  tracker = online.OnlineTracker(
      live_model.frame_forward(ModelConfig.from_config(config.model), variables),
      tracking.tracker_from_config(config), online.input_spec_from_config(config.data),
      online.rules_from_config(config), config.inference.top_k, summary)
  os.makedirs(out, exist_ok=True)
  lines_path, latencies, interrupted = os.path.join(out, 'frames.jsonl'), [], False
  t0 = time.perf_counter()
  try:
    with open(lines_path, 'w') as lines:
      stream = _online_lines(tracker, frames, lines, ids, names, video.fps, latencies, overlay)
      if overlay:
        with video_io.ffmpeg_without_preexec():
          visualize.write_video(os.path.join(out, 'overlay.mp4'), stream, fps or video.fps or 10)
      else:
        for _ in stream:
          pass
  except KeyboardInterrupt:   # a live stream's usual end: the lines so far are all written
    interrupted = True
  seconds = time.perf_counter() - t0
  rules = tracker.rules
  print(f'{video_path}: {latency_text(latencies, seconds)} (report score >= {rules.report_score}, '
        f'retire after {rules.retire_frames} unseen frames; from {settings_from})'
        + (' -- interrupted' * interrupted))
  print(f'wrote {lines_path}')
  if summary and not interrupted:
    results = predictor_lib.results_for_video(tracker.finish(), 1, ids)
    metrics_writer.write_json(os.path.join(out, 'results.json'), results)
    print(f'wrote {os.path.join(out, "results.json")} ({len(results)} tracks)')
  tracker.close()
  return 130 if interrupted else 0
