"""Association modes on occlusion: 'minvis' vs 'memory' tracking (work in progress)."""

import argparse
import os

import jax

from minvis_jax import config_lib
from minvis_jax import demo
from minvis_jax import train


def train_or_reuse(workdir: str, steps: int | None = None, seed: int = 0):
  """The demo's tiny checkpoint in WORKDIR/train (trained as `minvis-jax demo` does unless there)."""
  config = config_lib.load_config(demo.TINY_CONFIG)
  config.seed = seed
  steps = config.total_steps if steps is None else steps
  config.optim.decay_steps = (max(1, 2 * steps // 3),)
  config.data.manual_dir = data_dir = os.path.abspath(os.path.join(workdir, 'data'))
  height, width = config.data.canvas
  demo.make_data(data_dir, 40, 8, 12, height, width, seed)
  train_dir = os.path.join(workdir, 'train')
  train.train(config, train_dir, total_steps=steps)
  return train_dir


if __name__ == '__main__':
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', default='/tmp/minvis_tracking')
  a = p.parse_args()
  print(jax.devices())
  print(train_or_reuse(a.workdir))
