"""Tiny model on synthetic videos: tests and the CPU demo.

  minvis-jax train --config tiny --workdir /tmp/tiny
"""

from minvis_jax.configs import common


def get_config(arg=None):
  common.parse_arg(arg, 'configs/tiny.py')   # takes none: refuses one rather than ignore it
  c = common.base_config(common.tiny_model())
  c = common.with_dataset(c, 'synthetic')
  c.data.min_size_train = (128,)
  c.data.max_size_train = 224
  c.data.canvas = (128, 224)
  c.data.min_size_test = 128
  c.data.max_size_test = 224
  c.data.max_instances = 8
  c.loss.num_points = 1024
  c.batch_size = 8
  c.optim.lr = 1e-3
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = 20
  c.checkpoint.every_steps = 100
  c.log_every = 10
  c.eval.every_steps = 100   # the demo's AP curve (its held-out videos)
  return c
