"""data/rle.py: the vectorised check of compressed RLE counts, and the JSON field readers."""

import json

import numpy as np
import pytest
from support import rle_codes

from minvis_jax.data import rle, ytvis


def test_encoder_matches_pycocotools():
  rng = np.random.default_rng(0)
  for _ in range(20):
    m = (rng.random((7, 9)) < 0.3).astype(np.uint8)
    flat = m.flatten(order='F')
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.r_[0, change, flat.size]).tolist()
    if flat[0]:
      counts = [0] + counts
    assert rle_codes.encode(counts) == rle_codes.mask_rle(m)['counts']


def _decode(counts: str) -> list[int] | None:
  """Run lengths of a compressed string as pycocotools reads them (None: not a complete string of
  its alphabet or a run of more than 6 characters)."""
  runs, x, k = [], 0, 0
  for ch in counts:
    g = ord(ch) - 48
    if not 0 <= g < 64 or k == 6:
      return None
    x |= (g & 0x1f) << 5 * k
    k += 1
    if not g & 0x20:
      if g & 0x10:
        x -= 1 << 5 * k
      runs.append(x + (runs[-2] if len(runs) > 2 else 0))
      x, k = 0, 0
  return None if k else runs


def test_rle_check_against_a_plain_decoder():
  """The vectorized check of many RLEs at once against a one-run-at-a-time decoder: valid exactly
  when every run is >= 0 and they add up to the frame; valid ones decode as their runs say."""
  rng = np.random.default_rng(1)
  strings, pixels, shapes = [], [], []
  for _ in range(600):
    big = rng.random() < 0.1
    h, w = (300, 500) if big else (int(v) for v in rng.integers(1, 30, 2))
    m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
    if big or rng.random() < 0.5:  # long runs (several characters each)
      m = np.zeros((h, w), np.uint8)
      m[:int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1)):] = 1
    c = rle_codes.mask_rle(m)['counts']
    kind = rng.integers(0, 5)
    if kind == 1:
      c = c[:int(rng.integers(0, len(c) + 1))]
    elif kind == 2:
      c += rle_codes.encode([int(v) for v in rng.integers(-3, 4, int(rng.integers(1, 4)))])[-2:]
    elif kind == 3 and c:
      j = int(rng.integers(0, len(c)))
      c = c[:j] + chr(int(rng.integers(40, 115))) + c[j + 1:]
    strings.append(c if rng.random() < 0.5 else c.encode())
    pixels.append(h * w)
    shapes.append((h, w))
  bad = rle.bad_compressed_counts(strings, np.asarray(pixels))
  for c, p, b, (h, w) in zip(strings, pixels, bad, shapes):
    runs = _decode(c if isinstance(c, str) else c.decode())
    valid = runs is not None and min(runs, default=0) >= 0 and sum(runs) == p
    assert b == (not valid), (c, runs, p)
    if valid:
      want = np.repeat(np.arange(len(runs)) % 2, runs).reshape(w, h).T
      np.testing.assert_array_equal(ytvis.decode_mask({'size': [h, w], 'counts': c}, h, w, 'x'),
                                    want)
  assert 100 < bad.sum() < 500  # both kinds well represented



def test_load_json_names_the_file_and_what_it_is(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nope\.json: results file not found'):
    rle.load_json(str(tmp_path / 'nope.json'), 'results')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"videos": [')
  with pytest.raises(ValueError, match=r'bad\.json: not a JSON annotation file \(malformed JSON'):
    rle.load_json(str(bad), 'annotation')
  good = tmp_path / 'good.json'
  good.write_text(json.dumps([1, {'a': 2}]))
  assert rle.load_json(str(good), 'results') == [1, {'a': 2}]


def test_field_and_is_int():
  assert rle.field({'a': 0}, 'a', 'x') == 0
  with pytest.raises(ValueError, match="where: missing field 'b'"):
    rle.field({'a': 0}, 'b', 'where')
  with pytest.raises(ValueError, match='where: expected an object, got list'):
    rle.field([], 'a', 'where')
  assert rle.is_int(3) and rle.is_int(np.int64(3))
  assert not any(map(rle.is_int, [True, np.bool_(True), 3.0, '3', None]))
