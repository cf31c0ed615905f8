"""Comparing the tracks of two predictions."""

import numpy as np
from pycocotools import mask as mask_utils


def assert_same_tracks(a: list[dict], b: list[dict]) -> None:
  """Same tracks (classes, order, videos), scores within 1e-6 and the same RLEs, byte for byte."""
  for key in ('category', 'category_id', 'video_id'):
    assert [t.get(key) for t in a] == [t.get(key) for t in b]
  np.testing.assert_allclose([t['score'] for t in a], [t['score'] for t in b], rtol=0, atol=1e-6)
  for i, (x, y) in enumerate(zip(a, b)):
    assert len(x['segmentations']) == len(y['segmentations'])
    for f, (r, s) in enumerate(zip(x['segmentations'], y['segmentations'])):
      if r != s:   # say how far apart they are
        flipped = np.sum(mask_utils.decode(dict(r, counts=r['counts'].encode())) !=
                         mask_utils.decode(dict(s, counts=s['counts'].encode())))
        raise AssertionError(f'track {i} frame {f}: RLEs differ ({flipped} pixels)')
