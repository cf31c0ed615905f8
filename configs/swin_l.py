"""MinVIS Swin-L (200 queries) on YouTube-VIS 2019 (paper: 61.6 AP; model zoo 62.0).

Variants: --config configs/swin_l.py:dataset=ovis,fraction=0.01
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from minvis_jax import config_lib  # noqa: E402


def get_config(arg=None):
  args = dict(a.split('=') for a in arg.split(',')) if arg else {}
  model = config_lib.mask2former_model(config_lib.swin_backbone('L'), num_queries=200)
  c = common.base_config(model)
  c = common.with_dataset(c, args.get('dataset', 'ytvis_2019'))
  c.data.annotation_fraction = float(args.get('fraction', 1.0))
  c.batch_size = 32  # on 16 GPUs in the original
  if c.data.dataset in ('ytvis_2019', 'ovis'):
    c.data.min_size_test = 480
  return c
