"""MinVIS model-zoo experiments (docs/method.md §4), one row per argument set.

  --config minvis                                   # YouTube-VIS 2019, R50, 100%
  --config minvis:dataset=ytvis_2021,backbone=swin_l,fraction=0.1
  --config minvis:dataset=ovis,backbone=swin_l,fraction=0.01
  --config minvis:backbone=swin_l,pod=v5e-16        # the recipe on a named TPU slice

dataset: ytvis_2019 | ytvis_2021 | ovis; backbone: r50 | swin_l; fraction: 1.0 | 0.1 | 0.05 | 0.01
(sub-sampled annotations exist for Swin-L in the original zoo); pod: a slice of
`common.POD_PLANS` (mesh size and memory settings, the global batch kept), '' for none.
"""

from minvis_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, 'configs/minvis.py', dataset='ytvis_2019', backbone='r50',
                          fraction='1.0', pod='')
  fractions = {'1.0': 1.0, '1': 1.0, '0.1': 0.1, '0.05': 0.05, '0.01': 0.01}
  if args['fraction'] not in fractions:
    raise ValueError(f"configs/minvis.py: fraction={args['fraction']!r}: expected one of 1.0, "
                     '0.1, 0.05, 0.01 (another fraction: --set data.annotation_fraction=...)')
  c = common.zoo_config(args['dataset'], args['backbone'], fractions[args['fraction']])
  return common.with_pod(c, args['backbone'], args['pod']) if args['pod'] else c
