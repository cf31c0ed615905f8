"""Comparing an exported model's tracks with the live model's."""

import numpy as np
from pycocotools import mask as mask_utils


def assert_close_tracks(a: list[dict], b: list[dict], score_atol: float = 1e-5,
                        pixel_fraction: float = 1e-3) -> None:
  """Same tracks (classes, order, frames), scores within `score_atol`, and in every frame masks
  that differ in at most `pixel_fraction` of the pixels (a logit within rounding of 0 may flip)."""
  assert [t.get('category', t.get('category_id')) for t in a] == \
      [t.get('category', t.get('category_id')) for t in b]
  np.testing.assert_allclose([t['score'] for t in a], [t['score'] for t in b], rtol=0,
                             atol=score_atol)
  for i, (x, y) in enumerate(zip(a, b)):
    assert len(x['segmentations']) == len(y['segmentations'])
    for f, (r, s) in enumerate(zip(x['segmentations'], y['segmentations'])):
      m = mask_utils.decode(dict(r, counts=r['counts'].encode()))
      n = mask_utils.decode(dict(s, counts=s['counts'].encode()))
      assert np.mean(m != n) <= pixel_fraction, f'track {i} frame {f}: {np.sum(m != n)} pixels'
