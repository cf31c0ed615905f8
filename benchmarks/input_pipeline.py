"""Input pipeline throughput at the R50 training resolution vs what the R50 train step consumes.

Generates YouTube-VIS-layout videos of 720x1280 frames (the common YouTube-VIS size), then times
(a) the frame-level training input (JPEG decode, RLE decode, random short side 360/480, flip,
padding to the 480x864 canvas, batching) with its default thread pool, and (b) the jitted R50 train
step at that canvas, batch 2, on the same machine. The pipeline must deliver frames faster than the
step consumes them: RESULT's ratio = pipeline seconds per frame / train-step seconds per frame < 1.

  python benchmarks/input_pipeline.py [--steps 20] [--skip_train_step]
  python benchmarks/input_pipeline.py --dry-run   # the tiny config, 2 small videos, 2 batches
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

from timing import median_time, result_line

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from minvis_jax import config_lib  # noqa: E402
from minvis_jax import train  # noqa: E402
from minvis_jax.data import input_pipeline  # noqa: E402
from minvis_jax.data import synthetic  # noqa: E402

STEP_BATCH = 2


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=20, help='batches of 32 frames to time')
  parser.add_argument('--videos', type=int, default=16)
  parser.add_argument('--skip_train_step', action='store_true')
  parser.add_argument('--dry-run', action='store_true',
                      help='the tiny config, 2 videos of 72x128 frames, 2 batches (tests)')
  args = parser.parse_args(argv)
  model_name, height, width = ('tiny', 72, 128) if args.dry_run else ('r50', 720, 1280)
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                               'tiny.py' if args.dry_run else 'minvis.py'))
  if args.dry_run:   # one encoder and decoder layer, few queries and points: a quick compile
    args.steps, args.videos = 2, 2
    config.model.update(dict(enc_layers=1, dec_layers=1, num_queries=8))
    config.loss.num_points = 256
  with tempfile.TemporaryDirectory() as data_dir:
    synthetic.generate(data_dir, 'train', args.videos, 6, height=height, width=width, seed=0)
    config.data.dataset = 'synthetic'
    config.data.manual_dir = data_dir
    config.model.num_classes = 4
    stream = input_pipeline.train_iterator(config, 0)
    next(stream)   # thread start-up, first JSON parse
    start = time.perf_counter()
    for _ in range(args.steps):
      next(stream)
    pipeline_s = (time.perf_counter() - start) / (args.steps * config.batch_size)
    print(f'input pipeline: {1 / pipeline_s:.1f} frames/s at canvas {tuple(config.data.canvas)} '
          f'(batch {config.batch_size}, {config.data.workers} threads, {os.cpu_count()} cores)')
    if args.skip_train_step:
      return
    train_input = input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(config),
                                            input_pipeline.make_source(config.data, 'train'))
    batch = train_input.batch(0)
    batch = {k: v[:STEP_BATCH] for k, v in batch.items()}

  config.batch_size = STEP_BATCH
  config.mesh.data = 1
  config.init.checkpoint = ''   # weights set below / random: no pretrained files needed
  trainer = train.Trainer(config, mesh=train.make_mesh(config.mesh, jax.devices()[:1]))
  holder = [trainer.init_state()]
  global_batch = trainer.global_batch(batch)

  def step():
    holder[0], metrics = trainer.step(holder[0], global_batch)
    jax.block_until_ready(metrics)
  step_s = median_time(step, repeats=1 if args.dry_run else 3, warmup=1) / STEP_BATCH
  print(f'{model_name} train step consumes {1 / step_s:.2f} frames/s ({jax.default_backend()}, '
        f'batch {STEP_BATCH})')
  print(result_line(f'input_pipeline_vs_{model_name}_train_step_frames', pipeline_s, step_s))


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  main()
