"""MinVIS R50 on YouTube-VIS 2019 (paper: 47.4 AP; model zoo 47.3).

Variants: --config configs/r50.py:dataset=ovis,fraction=0.1
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from minvis_jax import config_lib  # noqa: E402


def get_config(arg=None):
  args = dict(a.split('=') for a in arg.split(',')) if arg else {}
  c = common.base_config(config_lib.mask2former_model(config_lib.resnet_backbone(50)))
  c = common.with_dataset(c, args.get('dataset', 'ytvis_2019'))
  c.data.annotation_fraction = float(args.get('fraction', 1.0))
  return c
