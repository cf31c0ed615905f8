"""Mask2Former instance segmentation on COCO (the image model MinVIS starts from).

  --config coco                      # R50, 100 queries
  --config coco:backbone=swin_l      # Swin-L, 200 queries

Original recipe: batch 16, 50 epochs (368,750 iterations), LSJ crop 1024 (here: resize + pad).
"""

from minvis_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, 'configs/coco.py', backbone='r50')
  if args['backbone'] == 'r50':
    model = common.mask2former_model(common.resnet_backbone(50), num_classes=80)
  elif args['backbone'] == 'swin_l':
    model = common.mask2former_model(common.swin_backbone('L'), num_classes=80, num_queries=200)
  else:
    raise ValueError(f"configs/coco.py: backbone must be r50 or swin_l, got {args['backbone']!r}")
  c = common.with_dataset(common.base_config(model), 'coco')
  c.batch_size = 16
  c.data.eval_split = 'val2017'
  c.data.train_split = 'train2017'
  c.data.min_size_train = tuple(range(480, 801, 32))
  c.data.max_size_train = 1333
  c.data.canvas = (800, 1344)
  c.data.max_instances = 100
  c.data.min_size_test = 800
  c.data.annotation_fraction = 1.0
  return c
