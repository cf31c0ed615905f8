"""MinVIS on one video (mp4 or anything ffmpeg reads, GIF, or a folder of jpg/png frames): writes
OUT/results.json (YouTube-VIS results format, dataset category ids) and OUT/overlay.mp4.

The model's config (the checkpoint's config.json, or --config) fixes how the video is run: the test
resolution (frames are resized to short side data.min_size_test, long side at most
data.max_size_test), the frames per forward (inference.window), the tracks kept (inference.top_k),
the association (inference.tracker) and the class names drawn. --set overrides any config field.
With --exported model.jax (from `minvis-jax export`) the artifact's manifest fixes them instead
(--top_k and --window still apply) and the Flax model code is not imported (docs/export.md).

  minvis-jax infer --checkpoint ckpt --video clip.mp4 --out out
  minvis-jax infer --checkpoint ckpt --video frames/ --out out --fps 6 --score_threshold 0.5
  minvis-jax infer --checkpoint ckpt --video clip.mp4 --out out --set data.min_size_test=480
  minvis-jax infer --exported model.jax --video clip.mp4 --out out

--online reports each frame's visible tracks as soon as it is processed (OUT/frames.jsonl, one JSON
line a frame, flushed), from a file, a frame folder, a URL ffmpeg opens, or PNG frames on stdin
(--video -); docs/online.md:

  ffmpeg -i rtsp://camera/stream -f image2pipe -c:v png - | \
      minvis-jax infer --checkpoint ckpt --video - --out out --online
"""

import itertools
import json
import time
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from minvis_jax import exported
from minvis_jax import metrics_writer
from minvis_jax import online
from minvis_jax import paths
from minvis_jax import predictor as predictor_lib
from minvis_jax import user_input
from minvis_jax import video_io
from minvis_jax import visualize


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


def _open_frames(video_path: str, check_frame_size=None):
  """(video_io.VideoInput, (H, W), its frames [H, W, 3] uint8 checked to keep that size): the
  first frame read to learn the size; skipped files said before the work."""
  video = video_io.open_video(video_path)
  if video.skipped:   # said before the work, and again in the summary
    print(f'{video_path}: {video_io.skipped_text(video)}')
  first = next(video.frames, None)
  if first is None:
    raise ValueError(f'{video_path}: the video has no frames')
  size = first.shape[:2]
  if check_frame_size is not None:
    check_frame_size(*size, video_path)
  return video, size, video_io.same_size(itertools.chain([first], video.frames), size, video_path)


def run(predictor: predictor_lib.VideoPredictor, data, table: tuple[list[int], list[str]],
        video_path: str, out: str, score_threshold: float, fps: float | None,
        settings_from: str, check_frame_size=None) -> int:
  """Runs `predictor` on one video and writes OUT/results.json (YouTube-VIS results format,
  dataset category ids) and OUT/overlay.mp4 (or .gif); prints a summary.

  Args:
    predictor: the live model's (`model_forward.from_config`) or an exported one's.
    data: its input settings (min_size_test, max_size_test, size_divisibility, mean, std).
    table: (dataset category id, name) of each class index (`categories.of_config`).
    video_path: an mp4 (anything ffmpeg reads), a GIF, or a folder of jpg/png frames.
    out: output directory.
    score_threshold: tracks drawn on the overlay need at least this score (all are in the JSON).
    fps: the overlay's frame rate; None: the source video's, 10 for a frame folder.
    settings_from: where the settings came from, for the summary line.
    check_frame_size: (h, w, where) -> None, raises for a frame size the model cannot run.
  """
  ids, names = table
  t0 = time.time()
  user_input.check_output_dir(out, '--out')
  if video_path == '-':
    raise ValueError('--video -: frames on stdin need --online (offline infer reads a video twice)')
  video, size, frames = _open_frames(video_path, check_frame_size)
  try:
    valid = predictor_lib.valid_size(*size, data)
  except ValueError as e:
    raise ValueError(f'{video_path}: {e}') from None
  # Updated once per window (a few per second at most): print every update.
  with tqdm(total=video.num_frames, unit='frame', desc='infer', dynamic_ncols=True, miniters=1,
            mininterval=0) as bar:
    tracks = predictor(
        count_processed(predictor_lib.preprocess(frames, data), bar, predictor), valid, size)
    num_frames = len(tracks[0]['segmentations']) if tracks else 0
    bar.set_postfix_str('', refresh=False)
    bar.update(num_frames - bar.n)
  results = predictor_lib.results_for_video(tracks, 1, ids)
  results_path = paths.join(out, 'results.json')
  metrics_writer.write_json(results_path, results)

  # Second pass over the video: the masks of a track are only known once it has ended.
  fps = fps or video.fps or 10.0
  with tqdm(video_io.same_size(video_io.read_video(video_path), size, video_path),
            total=num_frames, unit='frame', desc='overlay', dynamic_ncols=True) as again, \
       video_io.ffmpeg_without_preexec():
    overlay_path = visualize.overlay_video(
        paths.join(out, 'overlay.mp4'), again, tracks,
        [names[t['category']] for t in tracks], score_threshold, fps)
  shown = sum(t['score'] >= score_threshold for t in tracks)

  rate = f' at {video.fps:g} fps' if video.fps else ''
  print(f'{video_path}: {num_frames} frames of {size[0]}x{size[1]}{rate}, run at {valid[0]}x'
        f'{valid[1]} (data.min_size_test={data.min_size_test}, max_size_test='
        f'{data.max_size_test}), window {_window_text(predictor)}, top {predictor.top_k} '
        f'(from {settings_from}): {len(tracks)} tracks ({shown} with score >= {score_threshold}) '
        f'in {time.time() - t0:.1f} s')
  for track in tracks:
    print(f'  {names[track["category"]]:>16}  score {track["score"]:.3f}')
  if video.ended_early:
    print(f'warning: {video_path}: decoding stopped at frame {video.decoded} of the '
          f'{video.num_frames} its container declares (a truncated file?): the results and the '
          f'overlay cover frames 0..{video.decoded - 1}')
  if video.skipped:
    print(f'warning: {video_path}: {video_io.skipped_text(video)}')
  for path in (results_path, overlay_path):   # never report a file that is not there
    if not paths.isfile(path) or not paths.getsize(path):
      raise OSError(f'{path}: not written (empty or missing after the run)')
  print(f'wrote {results_path} and {overlay_path} ({fps:g} fps)')
  return 0


def run_exported(model: exported.Model, video_path: str, out: str, score_threshold: float,
                 fps: float | None, top_k: int | None, window: int | str | None) -> int:
  """`run` with an exported model (`exported.load`): the artifact's input settings, classes and
  tracker, without the model code, config files or checkpoint; top_k and window: None for the
  manifest's."""
  predictor = model.video_predictor(window, top_k)
  return run(predictor, model.data, (model.category_ids, model.category_names), video_path, out,
             score_threshold, fps, model.path, model.check_frame_size)


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


def run_online(tracker: online.OnlineTracker, table: tuple[list[int], list[str]],
               video_path: str, out: str, options: Sequence[str], fps: float | None,
               settings_from: str, check_frame_size=None) -> int:
  """Online MinVIS on a stream (`video_io.open_video`, '-' for PNG frames on stdin): each frame's
  visible tracks go to OUT/frames.jsonl as soon as it is processed (flushed; Ctrl-C or the end of
  the stream closes the file with every line written); options: 'summary' writes OUT/results.json
  (the offline result) at the end, 'overlay' OUT/overlay.mp4 as it goes. Prints the latency.

  tracker: built on the live model's forward or an exported one's (cli.py), with summary=True when
  options has 'summary'; table and check_frame_size as in `run`.
  """
  summary, overlay = 'summary' in options, 'overlay' in options
  ids, names = table
  user_input.check_output_dir(out, '--out')
  video, size, frames = _open_frames(video_path, check_frame_size)
  lines_path, latencies, interrupted = paths.join(out, 'frames.jsonl'), [], False
  t0 = time.perf_counter()
  try:
    # On a bucket the lines arrive as one object when the file closes (an object is written whole).
    with paths.open(lines_path, 'w') as lines:
      stream = _online_lines(tracker, frames, lines, ids, names, video.fps, latencies, overlay)
      if overlay:
        with video_io.ffmpeg_without_preexec():
          visualize.write_video(paths.join(out, 'overlay.mp4'), stream, fps or video.fps or 10)
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
    results_path = paths.join(out, 'results.json')
    metrics_writer.write_json(results_path, results)
    print(f'wrote {results_path} ({len(results)} tracks)')
  tracker.close()
  return 130 if interrupted else 0
