"""Host and device memory of MinVIS inference on long videos: R50 at 360x640, 300 and 1,200 frames.

Each length runs in a fresh subprocess, so the peaks are separate. Random weights (the memory does
not depend on them, the RLE sizes a little). Prints per length the peak RSS, the device's peak
memory (None on CPU, where the device memory is the host's), frames/s after compilation, the RLE
bytes kept per frame and the share of the time spent on the host encoding masks; last line RESULT.

  python benchmarks/long_video.py [--frames 300,1200] [--window auto]
  python benchmarks/long_video.py --eval_fps   # evaluation frames/s on 1 and 8 fake CPU devices
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def _child(num_frames: int, window) -> dict:
  import jax  # noqa: PLC0415
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
  from support.variables import random_variables  # noqa: PLC0415

  from minvis_jax import config_lib  # noqa: PLC0415
  from minvis_jax import predictor  # noqa: PLC0415
  from minvis_jax import tracking  # noqa: PLC0415
  from minvis_jax.models import ModelConfig  # noqa: PLC0415

  config = config_lib.load_config('minvis')   # R50, 40 classes
  model = ModelConfig.from_config(config.model)
  variables = random_variables(model)
  h, w, hp = 360, 640, 384          # a 360x640 frame, padded to a multiple of 32
  rng = np.random.default_rng(0)
  base = rng.normal(size=(hp, w, 3)).astype(np.float32)
  base[h:] = 0

  times, encode_s = [], [0.0]
  encode = predictor._encode

  def timed_encode(bits, out_size):
    t = time.perf_counter()
    out = encode(bits, out_size)
    encode_s[0] += time.perf_counter() - t
    return out
  predictor._encode = timed_encode

  def frames():
    for t in range(num_frames):
      times.append(time.perf_counter())
      # A slowly moving scene: shifted copies of one random image.
      yield np.roll(base, t, axis=1) * (base != 0)

  start = time.perf_counter()
  tracks = predictor.VideoPredictor(model, variables, window, config.inference.top_k,
                                    tracking.tracker_from_config(config))(frames(), (h, w), (h, w))
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
          'encode_share': encode_s[0] / (end - start),
          'top10_rle_bytes_per_frame': rle_bytes / num_frames}


def _eval_fps() -> dict:
  """`predict_dataset` frames/s of the tiny model (configs/tiny.py) on 8 generated 128x224 videos
  of 16 frames, on 1 and on 8 CPU devices (window 'auto': a frame per device), after a
  compiling run."""
  import tempfile  # noqa: PLC0415

  import jax  # noqa: PLC0415
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
  from support.variables import random_variables as _random_variables  # noqa: PLC0415

  from minvis_jax import config_lib  # noqa: PLC0415
  from minvis_jax import dataset_eval  # noqa: PLC0415
  from minvis_jax.data import synthetic  # noqa: PLC0415
  from minvis_jax.data import ytvis  # noqa: PLC0415

  config = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                               'configs', 'tiny.py'))
  variables = _random_variables(config.model)
  out = {}
  with tempfile.TemporaryDirectory() as data:
    synthetic.generate(data, 'valid', num_videos=8, num_frames=16, height=128, width=224)
    dataset = ytvis.load_split('synthetic', data, 'valid')
    frames = sum(len(v.frame_paths) for v in dataset.videos)
    for n in (1, 8):
      run = lambda: dataset_eval.predict_dataset(config, variables, dataset, progress=False,  # noqa
                                                 devices=jax.devices()[:n])
      run()
      start = time.perf_counter()
      run()
      out[n] = frames / (time.perf_counter() - start)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--frames', default='300,1200', help='comma-separated video lengths')
  parser.add_argument('--window', default='auto', help='frames per device per forward, or auto')
  parser.add_argument('--child', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--eval_fps', action='store_true',
                      help='instead: evaluation frames/s on 1 and 8 fake CPU devices')
  parser.add_argument('--eval_fps_child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.eval_fps_child:
    print('CHILD ' + json.dumps(_eval_fps()))
    return
  if args.eval_fps:
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    out = subprocess.run([sys.executable, __file__, '--eval_fps_child'], env=env,
                         capture_output=True, text=True, check=True)
    fps = json.loads([x for x in out.stdout.splitlines() if x.startswith('CHILD ')][-1][6:])
    print(f'tiny model, 128 frames of 128x224: {fps["1"]:.1f} frames/s on 1 CPU device, '
          f'{fps["8"]:.1f} on 8 (one host: the fake devices share its cores)')
    print('RESULT ' + json.dumps({'name': 'evaluate_fps_tiny_cpu_devices',
                                  'frames_per_s': {k: round(v, 2) for k, v in fps.items()}}))
    return
  window = args.window if args.window == 'auto' else int(args.window)
  if args.child is not None:
    print('CHILD ' + json.dumps(_child(args.child, window)))
    return
  rows = []
  for n in (int(x) for x in args.frames.split(',')):
    out = subprocess.run([sys.executable, __file__, '--child', str(n), '--window', args.window],
                         capture_output=True, text=True, check=True)
    row = json.loads([x for x in out.stdout.splitlines() if x.startswith('CHILD ')][-1][6:])
    rows.append(row)
    fps = f'{row["frames_per_s"]:.2f}' if row['frames_per_s'] else 'n/a'
    dev = f'{row["device_peak_gib"]:.2f} GiB' if row['device_peak_gib'] else 'n/a (CPU)'
    print(f'{n:5d} frames (window {row["window"]}): peak RSS {row["peak_rss_gib"]:.2f} GiB, '
          f'device peak {dev}, {fps} frames/s after compilation ({row["total_s"]:.0f} s in all), '
          f'mask encoding {100 * row["encode_share"]:.1f}% of the time, top-10 RLEs '
          f'{row["top10_rle_bytes_per_frame"] / 1024:.1f} KB a frame')
  peaks = [r['peak_rss_gib'] for r in rows]
  print('RESULT ' + json.dumps({
      'name': 'long_video_r50_360x640', 'frames': [r['frames'] for r in rows],
      'peak_rss_gib': [round(p, 3) for p in peaks],
      'device_peak_gib': [r['device_peak_gib'] and round(r['device_peak_gib'], 3) for r in rows],
      'frames_per_s': [r['frames_per_s'] and round(r['frames_per_s'], 3) for r in rows],
      'rss_growth': round(max(peaks) / min(peaks) - 1, 3)}))


if __name__ == '__main__':
  main()
