"""Masks as pycocotools RLEs, checked before pycocotools sees them, and the small JSON field readers
shared by the dataset readers (data/ytvis.py) and the metric (ytvis_eval.py).

pycocotools trusts an RLE: counts that do not add up to height x width make its IoU loop forever and
its decode return uninitialised memory, so every RLE a user file supplies is checked here first.
"""

import math

import numpy as np
from pycocotools import mask as mask_utils

from minvis_jax import paths
from minvis_jax import user_input

# ------------------------------------------------------------------------------------------------
# JSON fields.


def is_int(x) -> bool:
  """An integer of JSON or numpy, not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def load_json(path: str, what: str):
  """The parsed JSON of file `path`; FileNotFoundError / ValueError name the path and `what` it is
  (e.g. 'annotation', 'results')."""
  if not paths.isfile(path):
    raise FileNotFoundError(f'{path}: {what} file not found')
  with paths.open(path, 'rb') as f:
    return user_input.parse_json(f.read(), path, what)


def field(obj: dict, key: str, where: str):
  """obj[key]; ValueError naming `where` unless obj is an object with that key."""
  if not isinstance(obj, dict):
    raise ValueError(f'{where}: expected an object, got {type(obj).__name__}')
  if key not in obj:
    raise ValueError(f'{where}: missing field {key!r}')
  return obj[key]


# ------------------------------------------------------------------------------------------------
# Frames and polygons.

# pycocotools counts pixels in 32-bit integers.
MAX_FRAME_PIXELS = 2 ** 31 - 1


def check_frame_pixels(height: int, width: int, where: str) -> None:
  if height * width > MAX_FRAME_PIXELS:
    raise ValueError(f'{where}: a {height}x{width} frame is larger than the {MAX_FRAME_PIXELS} '
                     'pixels pycocotools can count')



def _is_coordinate(x) -> bool:
  return (isinstance(x, (int, float, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)) and math.isfinite(x))


def check_polygons(seg: list, height: int, width: int, where: str) -> None:
  """A polygon segmentation must be a list of lists of finite numbers near the frame (pycocotools
  rasterises a far-away point into an allocation that can exhaust the memory)."""
  for p in seg:
    if not isinstance(p, (list, tuple)):
      raise ValueError(f'{where}: a polygon segmentation must be a list of coordinate lists, '
                       f'got an element {str(p)[:80]}')
    if not all(map(_is_coordinate, p)):
      bad = next(x for x in p if not _is_coordinate(x))
      raise ValueError(f'{where}: polygon coordinates must be finite numbers, got {bad!r}')
    for x, y in zip(p[0::2], p[1::2]):
      if not (-width <= x <= 2 * width and -height <= y <= 2 * height):
        raise ValueError(f'{where}: polygon point ({x}, {y}) lies far outside the '
                         f'{height}x{width} frame')


# ------------------------------------------------------------------------------------------------
# RLEs.
#
# Compressed counts (pycocotools' string format): each run length is 5-bit groups, least
# significant first, as characters chr(48 + g) with g in 0..63; bit 0x20 of g = another group
# follows, bit 0x10 of a run's last group = negative (two's complement). Run m > 2 is stored as the
# difference to run m - 2.

_RLE_BATCH = 1 << 16  # characters
_RLE_MAX_GROUPS = 6  # 30 bits; pycocotools reads a 7th group through an overflowing int shift


def bad_compressed_counts(counts: list, pixels: np.ndarray) -> np.ndarray:
  """Compressed counts (str or bytes) [N], pixels of their frames (h * w) [N] -> bool [N]: True
  where pycocotools would not read a mask of exactly that many pixels.

  Many RLEs at once, in a few passes over their runs (the evaluator checks every RLE of a dataset);
  in batches of about _RLE_BATCH characters, whose arrays stay in cache."""
  strs = [c if isinstance(c, str) else c.decode('latin-1') for c in counts]  # bytes map 1:1
  ends = np.cumsum(np.fromiter(map(len, strs), np.int64, len(strs)))
  cuts = np.unique(np.searchsorted(ends, np.arange(0, ends[-1] if len(ends) else 0, _RLE_BATCH),
                                   'right'))
  bounds = np.r_[0, cuts[cuts > 0], len(strs)].tolist()
  return np.concatenate([np.zeros(0, bool)] + [_bad_counts(strs[a:b], pixels[a:b])
                                               for a, b in zip(bounds[:-1], bounds[1:]) if b > a])


def _bad_counts(strs: list, pixels: np.ndarray) -> np.ndarray:
  n = len(strs)
  bad = np.zeros(n, bool)
  joined = ''.join(strs)
  if not joined.isascii():
    bad[:] = [not s.isascii() for s in strs]
    strs = [s if s.isascii() else '' for s in strs]
    joined = ''.join(strs)
  lengths = np.fromiter(map(len, strs), np.int64, n)
  ends = np.cumsum(lengths)  # [N] one past each string's last character
  bad |= lengths == 0  # no run: covers no pixel
  full = np.flatnonzero(lengths)  # [F]
  if not len(full):
    return bad
  g = np.frombuffer(joined.encode('ascii'), np.uint8) - np.uint8(48)  # bad characters wrap > 63
  if (g > 63).any():
    bad[np.searchsorted(ends, np.flatnonzero(g > 63), 'right')] = True
    g &= np.uint8(63)
  stop = g < 32  # the last group of a run
  last = ends[full] - 1
  bad[full[~stop[last]]] = True  # the string ends inside a run
  stop[last] = True  # so that no run spans two strings
  more = np.flatnonzero(~stop)  # [C] groups that are not the last of their run (few)
  # [F] runs of each string: its characters less its groups that are not the last.
  runs = lengths[full] - np.diff(np.searchsorted(more, ends[full]), prepend=0)
  first = np.cumsum(runs) - runs  # [F] index of each string's first run
  # Run values: the last group sign-extended from its bit 0x10 ((g ^ 16) - 16 in int8), plus the
  # lower groups of the runs of more than one group.
  x = ((g[stop] & np.uint8(31)) ^ np.uint8(16)) + np.uint8(240)
  x = x.view(np.int8).astype(np.int64)  # [R]
  if len(more):
    run = more - np.arange(len(more))  # [C] its run: characters before it less groups not last
    multi, head, lower = np.unique(run, return_index=True, return_counts=True)
    start = more[head]  # the run's first character
    bad[np.searchsorted(ends, start[lower >= _RLE_MAX_GROUPS], 'right')] = True
    shift = 5 * np.minimum(lower, _RLE_MAX_GROUPS - 1)
    x[multi] <<= shift
    position = np.minimum(more - np.repeat(start, lower), _RLE_MAX_GROUPS - 1)
    np.add.at(x, run, (g[more] & np.uint8(31)).astype(np.int64) << 5 * position)
  # Run m > 2 is stored as the difference to run m - 2: the runs of a string at even and at odd
  # global index are two running sums (run 0 stands alone: zeroed in them).
  bad[full[x[first] < 0]] = True
  total = x[first]
  x[first] = 0
  for parity in (0, 1):
    sums = np.cumsum(x[parity::2])
    seg_start = (first + 1 - parity) // 2  # [F] each string's runs in this chain
    seg_end = (first + runs + 1 - parity) // 2
    some = np.flatnonzero(seg_end > seg_start)
    if not len(some):
      continue
    start, count = seg_start[some], (seg_end - seg_start)[some]
    before = np.where(start > 0, sums[np.maximum(start - 1, 0)], 0)
    # Run lengths are sums - before: the smallest must not be negative.
    bad[full[some[np.minimum.reduceat(sums, start) < before]]] = True
    total[some] += np.add.reduceat(sums, start) - count * before
  bad[full] |= total != pixels[full]
  return bad


def compressed_counts_problem(counts, pixels: int) -> str:
  """Why compressed counts (str or bytes) are not an RLE of `pixels` pixels, one run at a time."""
  s = counts if isinstance(counts, str) else counts.decode('latin-1')
  runs, x, k = [], 0, 0
  for i, ch in enumerate(s):
    g = ord(ch) - 48
    if not 0 <= g <= 63:
      return f'character {ch!r} at position {i} of the counts is not in the RLE alphabet'
    x |= (g & 31) << (5 * k)
    k += 1
    if g & 32:
      if k == _RLE_MAX_GROUPS:
        return f'run {len(runs)} of the counts is longer than {_RLE_MAX_GROUPS} characters'
      continue
    if g & 16:
      x -= 1 << (5 * k)
    if len(runs) > 2:
      x += runs[-2]
    if x < 0:
      return f'run {len(runs)} has a negative length ({x})'
    runs.append(x)
    x, k = 0, 0
  if k:
    return 'the counts string ends inside a run (truncated)'
  return f'the runs cover {sum(runs)} pixels, the frame has {pixels}'


def check_rle_counts(counts: list, sizes: list, where) -> None:
  """Raises ValueError unless compressed counts[i] (str or bytes) is an RLE of a sizes[i] = (h, w)
  frame; where(i) -> the file / record / frame named in the message."""
  if not counts:
    return
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  bad = np.flatnonzero(bad_compressed_counts(counts, sizes[:, 0] * sizes[:, 1]))
  if len(bad):
    i = int(bad[0])
    h, w = sizes[i].tolist()
    raise ValueError(f'{where(i)}: malformed RLE: {compressed_counts_problem(counts[i], h * w)} '
                     f'({h}x{w})')



def check_rle_size(size, height: int, width: int, where: str) -> None:
  """An RLE's `size` must be [height, width] (two ints)."""
  if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(is_int, size))):
    raise ValueError(f'{where}: RLE "size" must be [height, width] (two integers), got {size!r}')
  if [int(s) for s in size] != [height, width]:
    raise ValueError(f'{where}: mask size {[int(s) for s in size]} does not match the frame size '
                     f'{[height, width]}')


def uncompressed_rle(seg: dict, height: int, width: int, where: str) -> dict:
  """An RLE with a list of run lengths -> the compressed RLE pycocotools reads, checked."""
  counts = seg['counts']
  if not all(map(is_int, counts)):
    bad = next(c for c in counts if not is_int(c))
    raise ValueError(f'{where}: uncompressed RLE counts must be integers, got {bad!r}')
  if counts and min(counts) < 0:
    raise ValueError(f'{where}: uncompressed RLE has a negative run length ({min(counts)})')
  if sum(counts) != height * width:
    raise ValueError(f'{where}: uncompressed RLE covers {sum(counts)} pixels, expected '
                     f'{height * width} ({height}x{width})')
  return mask_utils.frPyObjects({'size': [height, width], 'counts': [int(c) for c in counts]},
                                height, width)


class MaskList:
  """The metric's masks: every non-empty frame segmentation of the tracks added (ground truth and
  results) as a pycocotools RLE in one flat list, checked against its frame before pycocotools sees
  it: pycocotools' IoU never returns on an RLE whose counts do not add up to its size."""

  def __init__(self):
    self.rles = []
    self._pixels = []  # [len(rles)] h * w of each mask's frame
    self._checked = 0  # rles[:_checked] are checked

  def add_track(self, segs: list, h: int, w: int, where, slots: list) -> None:
    """Appends a track's masks; per frame, its index in `rles` (-1: none) to slots; where(t) names
    frame t in errors."""
    hw, pixels = [h, w], h * w
    for t, s in enumerate(segs):
      if s is None:
        slots.append(-1)
        continue
      slots.append(len(self.rles))
      self._pixels.append(pixels)
      # The common case in few Python operations: compressed counts (checked in `check`) and the
      # frame's size as two ints.
      if type(s) is dict:
        size, counts = s.get('size'), s.get('counts')
        if (type(counts) is str and size == hw and type(size) is list and type(size[0]) is int
            and type(size[1]) is int):
          self.rles.append(s)
          continue
      self.rles.append(self._other(s, h, w, where(t)))

  def _other(self, seg, h: int, w: int, where: str) -> dict:
    if isinstance(seg, dict):
      if 'size' not in seg or 'counts' not in seg:
        raise ValueError(f'{where}: an RLE needs "size" and "counts", got keys {sorted(seg)}')
      check_rle_size(seg['size'], h, w, where)
      counts = seg['counts']
      if isinstance(counts, list):
        return uncompressed_rle(seg, h, w, where)
      if not isinstance(counts, (str, bytes)):
        raise ValueError(f'{where}: RLE "counts" must be a string or a list of run lengths, got '
                         f'{type(counts).__name__}')
      return {'size': [h, w], 'counts': counts}
    if isinstance(seg, list) and seg:  # polygons
      check_polygons(seg, h, w, where)
      short = next((p for p in seg if len(p) < 6 or len(p) % 2), None)
      if short is not None:
        raise ValueError(f'{where}: a polygon needs at least 3 (x, y) points, got {len(short)} '
                         f'coordinates')
      return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    raise ValueError(f'{where}: a frame segmentation must be an RLE object, polygons or null, got '
                     f'{str(seg)[:80]}')

  def check(self, where) -> None:
    """Checks the counts of the masks added since the last check; where(i) names rles[i]. (Those
    made here from polygons or run-length lists are checked again: few, and valid.)"""
    new = self.rles[self._checked:]
    bad = np.flatnonzero(bad_compressed_counts(
        [r['counts'] for r in new], np.asarray(self._pixels[self._checked:], np.int64)))
    if len(bad):
      i = self._checked + int(bad[0])
      problem = compressed_counts_problem(self.rles[i]['counts'], self._pixels[i])
      raise ValueError(f'{where(i)}: malformed RLE: {problem}')
    self._checked = len(self.rles)
