"""RLE codes for tests: pycocotools' compressed string of any run lengths (also ones that do not
add up to a frame), and the compressed RLE of a mask as a results file holds it."""

import numpy as np
from pycocotools import mask as mask_utils


def encode(counts: list[int]) -> str:
  """pycocotools' compressed string of any run lengths (also ones that do not add up to a frame)."""
  out = []
  for m, x in enumerate(counts):
    if m > 2:
      x -= counts[m - 2]
    more = True
    while more:
      g = x & 0x1f
      x >>= 5
      more = x != -1 if g & 0x10 else x != 0
      out.append(chr(48 + (g | 0x20 if more else g)))
  return ''.join(out)


def mask_rle(mask) -> dict:
  r = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return {'size': [int(s) for s in r['size']], 'counts': r['counts'].decode()}

