"""Host and device memory of MinVIS inference on long videos: R50 at 360x640, 300 and 1,200 frames.

Each length runs in a fresh subprocess, so the peaks are separate. Random weights (the memory does
not depend on them, the RLE sizes a little). Prints per length the peak RSS, the device's peak
memory (None on CPU, where the device memory is the host's), frames/s after compilation and the
RLE bytes kept per frame. The RESULT line's times are seconds per frame of the longest video
(`ours_s`) and of the shortest (`ref_s`): a ratio near 1 means the cost per frame does not grow
with the length.

  python benchmarks/long_video.py [--frames 300,1200] [--window auto]
  python benchmarks/long_video.py --eval_fps   # evaluation frames/s on 1 and 8 fake CPU devices
  python benchmarks/long_video.py --dry-run [--eval_fps]   # the tiny model on 64x96 frames

With --eval_fps the RESULT times are seconds per frame on 8 devices (`ours_s`) and on 1 (`ref_s`).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.variables import random_variables  # noqa: E402

from minvis_jax import config_lib  # noqa: E402
from minvis_jax import evaluate  # noqa: E402
from minvis_jax import model_forward  # noqa: E402
from minvis_jax import predictor  # noqa: E402
from minvis_jax import tracking  # noqa: E402
from minvis_jax.models import ModelConfig  # noqa: E402
from minvis_jax.data import synthetic  # noqa: E402
from minvis_jax.data import ytvis  # noqa: E402

def _child(num_frames: int, window, dry_run: bool) -> dict:
  config = config_lib.load_config('tiny' if dry_run else 'minvis')   # minvis: R50, 40 classes
  model = ModelConfig.from_config(config.model)
  h, w, hp = (64, 96, 64) if dry_run else (360, 640, 384)   # a frame, padded to a multiple of 32
  variables = random_variables(model)
  rng = np.random.default_rng(0)
  base = rng.normal(size=(hp, w, 3)).astype(np.float32)
  base[h:] = 0
  times = []

  def frames():
    for t in range(num_frames):
      times.append(time.perf_counter())
      # A slowly moving scene: shifted copies of one random image.
      yield np.roll(base, t, axis=1) * (base != 0)

  start = time.perf_counter()
  tracks = predictor.VideoPredictor(model_forward.forward(model), variables, window,
                                    config.inference.top_k, tracking.tracker_from_config(config))(
      frames(), (h, w), (h, w))
  end = time.perf_counter()
  pw = predictor.auto_window((hp, w), jax.local_devices()) if window == 'auto' else window
  # Frames/s after the first window (compilation).
  steady = (num_frames - pw) / (end - times[pw]) if num_frames > 2 * pw else None
  stats = jax.local_devices()[0].memory_stats() or {}
  rle_bytes = sum(len(s['counts']) for t in tracks for s in t['segmentations'])
  return {'frames': num_frames, 'window': pw,
          'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
          'device_peak_gib': stats['peak_bytes_in_use'] / 2 ** 30 if stats else None,
          'frames_per_s': steady, 'total_s': end - start,
          'top10_rle_bytes_per_frame': rle_bytes / num_frames}


def _eval_fps(dry_run: bool) -> dict:
  """`predict_dataset` frames/s of the tiny model (configs/tiny.py) on generated videos (8 of 16
  frames at 128x224; dry run: 2 of 4 at 64x96) on 1 and on 8 CPU devices (window 'auto': a frame
  per device), after a compiling run."""
  config = config_lib.load_config('tiny')
  variables = random_variables(config.model)
  videos, frames_per_video, height, width = (2, 4, 64, 96) if dry_run else (8, 16, 128, 224)
  out = {}
  with tempfile.TemporaryDirectory() as data:
    synthetic.generate(data, 'valid', num_videos=videos, num_frames=frames_per_video,
                       height=height, width=width)
    dataset = ytvis.load_split('synthetic', data, 'valid')
    frames = sum(len(v.frame_paths) for v in dataset.videos)
    for n in (1, 8):
      run = lambda: evaluate.predict_dataset(config, variables, dataset, progress=False,  # noqa
                                                 devices=jax.devices()[:n])
      run()
      start = time.perf_counter()
      run()
      out[n] = frames / (time.perf_counter() - start)
  return out


def _run_child(flags: list[str], env=None) -> dict:
  out = subprocess.run([sys.executable, __file__, *flags], env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f'{" ".join(flags)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}')
  return json.loads([x for x in out.stdout.splitlines() if x.startswith('CHILD ')][-1][6:])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--frames', default='300,1200', help='comma-separated video lengths')
  parser.add_argument('--window', default='auto', help='frames per device per forward, or auto')
  parser.add_argument('--child', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--eval_fps', action='store_true',
                      help='instead: evaluation frames/s on 1 and 8 fake CPU devices')
  parser.add_argument('--eval_fps_child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--dry-run', action='store_true',
                      help='the tiny model on 64x96 frames, 6 and 12 frames (tests)')
  args = parser.parse_args(argv)
  dry = ['--dry-run'] if args.dry_run else []
  if args.eval_fps_child:
    print('CHILD ' + json.dumps(_eval_fps(args.dry_run)))
    return
  if args.eval_fps:
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    fps = _run_child(['--eval_fps_child', *dry], env)
    print(f'tiny model: {fps["1"]:.1f} frames/s on 1 CPU device, {fps["8"]:.1f} on 8 (one host: '
          'the fake devices share its cores)')
    print('RESULT ' + json.dumps({
        'name': 'evaluate_fps_tiny_cpu_devices' + ('_dry_run' if args.dry_run else ''),
        'ours_s': 1 / fps['8'], 'ref_s': 1 / fps['1'], 'ratio': round(fps['1'] / fps['8'], 3),
        'frames_per_s': {k: round(v, 2) for k, v in fps.items()}}))
    return
  window = args.window if args.window == 'auto' else int(args.window)
  if args.child is not None:
    print('CHILD ' + json.dumps(_child(args.child, window, args.dry_run)))
    return
  lengths = [6, 12] if args.dry_run else [int(x) for x in args.frames.split(',')]
  rows = []
  for n in lengths:
    row = _run_child(['--child', str(n), '--window', args.window, *dry])
    rows.append(row)
    fps = f'{row["frames_per_s"]:.2f}' if row['frames_per_s'] else 'n/a'
    dev = f'{row["device_peak_gib"]:.2f} GiB' if row['device_peak_gib'] else 'n/a (CPU)'
    print(f'{n:5d} frames (window {row["window"]}): peak RSS {row["peak_rss_gib"]:.2f} GiB, '
          f'device peak {dev}, {fps} frames/s after compilation ({row["total_s"]:.0f} s in all), '
          f'top-10 RLEs {row["top10_rle_bytes_per_frame"] / 1024:.1f} KB a frame')
  peaks = [r['peak_rss_gib'] for r in rows]
  per_frame = [r['total_s'] / r['frames'] for r in rows]
  print('RESULT ' + json.dumps({
      'name': 'long_video_tiny_64x96_dry_run' if args.dry_run else 'long_video_r50_360x640',
      'ours_s': per_frame[-1], 'ref_s': per_frame[0],
      'ratio': round(per_frame[-1] / per_frame[0], 3),
      'frames': [r['frames'] for r in rows],
      'peak_rss_gib': [round(p, 3) for p in peaks],
      'device_peak_gib': [r['device_peak_gib'] and round(r['device_peak_gib'], 3) for r in rows],
      'frames_per_s': [r['frames_per_s'] and round(r['frames_per_s'], 3) for r in rows],
      'rss_growth': round(max(peaks) / min(peaks) - 1, 3)}))


if __name__ == '__main__':
  main()
