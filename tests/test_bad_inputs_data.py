"""Bad input to the evaluator, the dataset readers and the training input: never a hang, never a
silent result; every error names the file, the record and the field."""

import json
import logging
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from minvis_jax import config_lib
from minvis_jax.data import input_pipeline, synthetic, ytvis
from minvis_jax.evaluation import evaluate, evaluate_dicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 4, 4


def _encode(counts: list[int]) -> str:
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


def _rle(mask) -> dict:
  r = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return {'size': [int(s) for s in r['size']], 'counts': r['counts'].decode()}


def test_encoder_matches_pycocotools():
  rng = np.random.default_rng(0)
  for _ in range(20):
    m = (rng.random((7, 9)) < 0.3).astype(np.uint8)
    flat = m.flatten(order='F')
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.r_[0, change, flat.size]).tolist()
    if flat[0]:
      counts = [0] + counts
    assert _encode(counts) == _rle(m)['counts']


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
    c = _rle(m)['counts']
    kind = rng.integers(0, 5)
    if kind == 1:
      c = c[:int(rng.integers(0, len(c) + 1))]
    elif kind == 2:
      c += _encode([int(v) for v in rng.integers(-3, 4, int(rng.integers(1, 4)))])[-2:]
    elif kind == 3 and c:
      j = int(rng.integers(0, len(c)))
      c = c[:j] + chr(int(rng.integers(40, 115))) + c[j + 1:]
    strings.append(c if rng.random() < 0.5 else c.encode())
    pixels.append(h * w)
    shapes.append((h, w))
  bad = ytvis.bad_compressed_counts(strings, np.asarray(pixels))
  for c, p, b, (h, w) in zip(strings, pixels, bad, shapes):
    runs = _decode(c if isinstance(c, str) else c.decode())
    valid = runs is not None and min(runs, default=0) >= 0 and sum(runs) == p
    assert b == (not valid), (c, runs, p)
    if valid:
      want = np.repeat(np.arange(len(runs)) % 2, runs).reshape(w, h).T
      np.testing.assert_array_equal(ytvis.decode_mask({'size': [h, w], 'counts': c}, h, w, 'x'),
                                    want)
  assert 100 < bad.sum() < 500  # both kinds well represented


SQUARE = np.zeros((H, W), np.uint8)
SQUARE[:2, :2] = 1                       # column-major runs: [0, 2, 2, 2, 10]


def _gt(**video):
  v = dict(id=1, height=H, width=W, length=2, file_names=['a/0.jpg', 'a/1.jpg'])
  v.update(video)
  return dict(videos=[v], categories=[dict(id=1, name='x'), dict(id=2, name='y')],
              annotations=[dict(id=7, video_id=1, category_id=1, iscrowd=0,
                                segmentations=[_rle(SQUARE), _rle(SQUARE)], areas=[4.0, 4.0])])


def _result(**kw):
  r = dict(video_id=1, category_id=1, score=0.9, segmentations=[_rle(SQUARE), None])
  r.update(kw)
  return r


def _write(tmp_path, gt, results) -> tuple[str, str]:
  gt_path, res_path = tmp_path / 'gt.json', tmp_path / 'res.json'
  gt_path.write_text(json.dumps(gt))
  res_path.write_text(json.dumps(results))
  return str(gt_path), str(res_path)


# ------------------------------------------------------------------------------------------------
# Evaluator: malformed RLEs (pycocotools' IoU never returns on counts that miss the frame size).

def _compressed(counts) -> dict:
  return {'size': [H, W], 'counts': counts if isinstance(counts, str) else _encode(counts)}


_HANG_CASES = [
    # (which side, frame segmentation, expected problem)
    ('results', _compressed([0, 2, 2, 2]), 'malformed RLE: the runs cover 6 pixels, the frame '
                                           'has 16'),
    ('results', _compressed([0, 2, 2, 2, 11]), 'malformed RLE: the runs cover 17 pixels'),
    ('results', _compressed([0, 2, 5, -1, 10]), 'malformed RLE: run 3 has a negative length'),
    ('results', _compressed('02208P'), 'malformed RLE: the counts string ends inside a run'),
    ('results', _compressed('0220 8'), "malformed RLE: character ' ' at position 4"),
    ('results', _compressed('PPPPPP0'), 'malformed RLE: run 0 of the counts is longer than 6'),
    ('results', _compressed(''), 'malformed RLE: the runs cover 0 pixels'),
    ('results', {'size': [H, W], 'counts': [0, 2, 2, 2]}, 'uncompressed RLE covers 6 pixels, '
                                                          'expected 16'),
    ('results', {'size': [H, W], 'counts': [0, 20, -4]}, 'uncompressed RLE has a negative run '
                                                         'length (-4)'),
    ('results', [[0, 0, 1, 0, math.nan, 1]], 'polygon coordinates must be finite numbers, got '
                                             'nan'),
    ('gt', _compressed([0, 2, 2, 2]), 'malformed RLE: the runs cover 6 pixels, the frame has 16'),
    ('gt', _compressed([0, 2, 2, 2, 10, 3]), 'malformed RLE: the runs cover 19 pixels'),
    ('gt', {'size': [H, W], 'counts': [0, 2, 2, 2]}, 'uncompressed RLE covers 6 pixels'),
]


@pytest.mark.timeout(120)
def test_malformed_masks_raise_instead_of_hanging(tmp_path):
  """In a subprocess with a timeout: on such masks pycocotools loops forever in C, where no
  in-process timeout can interrupt it."""
  paths = []
  for k, (side, seg, _) in enumerate(_HANG_CASES):
    gt, results = _gt(), [_result(), _result()]
    if side == 'gt':
      gt['annotations'][0]['segmentations'][1] = seg
    else:
      results[1]['segmentations'][1] = seg
    case = tmp_path / str(k)
    case.mkdir()
    paths.append(_write(case, gt, results))
  script = ('import json, sys\n'
            'from minvis_jax.evaluation import evaluate\n'
            'for gt, res in json.loads(sys.argv[1]):\n'
            '  try:\n'
            '    evaluate(gt, res)\n'
            '    print("accepted", flush=True)\n'
            '  except ValueError as e:\n'
            '    print(str(e).replace("\\n", " "), flush=True)\n')
  try:
    out = subprocess.run([sys.executable, '-c', script, json.dumps(paths)], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
  except subprocess.TimeoutExpired as e:
    pytest.fail(f'the evaluator hangs on a malformed mask (output so far: {e.stdout!r})')
  lines = out.splitlines()
  assert len(lines) == len(_HANG_CASES)
  for (side, _, problem), (gt_path, res_path), line in zip(_HANG_CASES, paths, lines):
    where = (f'{gt_path}: annotations[0] (id 7) of video 1, frame 1' if side == 'gt' else
             f'{res_path}: result 1 (video 1), frame 1')
    assert line.startswith(f'{where}: {problem}'), (where, problem, line)


def test_valid_rles_of_every_kind_are_accepted():
  # Compressed str and bytes, tuple or numpy sizes, uncompressed counts: the same mask, the same
  # metrics (the track matches at IoU 0.5: its second frame is empty).
  gt = _gt()
  base = evaluate_dicts(gt, [_result()])
  assert base['AP50'] == pytest.approx(1.0) and base['AP'] == pytest.approx(0.1)
  counts = _rle(SQUARE)['counts']
  for seg in ({'size': [H, W], 'counts': [0, 2, 2, 2, 10]},
              {'size': (H, W), 'counts': counts.encode()},
              {'size': [np.int64(H), np.int64(W)], 'counts': counts}):
    assert evaluate_dicts(gt, [_result(segmentations=[seg, None])]) == base
  # Polygons (as pycocotools rasterises them).
  poly = [[0.0, 0.0, 1.5, 0.0, 1.5, 1.5, 0.0, 1.5]]
  m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W)))
  assert evaluate_dicts(gt, [_result(segmentations=[poly, None])]) == evaluate_dicts(
      gt, [_result(segmentations=[_rle(m), None])])


# ------------------------------------------------------------------------------------------------
# Evaluator: unknown categories are not scored (official), but said once per file.


def test_unknown_result_categories_warn_once_and_are_not_scored(tmp_path):
  gt = _gt()
  good = [_result()]
  stray = [_result(category_id=41), _result(category_id=99, score=0.95),
           _result(category_id=41, score=0.99)]
  gt_path, res_path = _write(tmp_path, gt, good + stray)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    metrics = evaluate(gt_path, res_path)
  assert len(caught) == 1
  assert str(caught[0].message) == (
      f'{res_path}: 3 result(s) have a "category_id" that is not in the ground truth\'s '
      'categories (41, 99); they are not scored')
  assert metrics == evaluate_dicts(gt, good)  # as if they were not there: the official scoring


def test_unknown_ground_truth_categories_warn_once_and_are_not_scored():
  gt = _gt()
  known = evaluate_dicts(gt, [_result()])
  for aid, cat in ((8, 5), (9, 5)):
    gt['annotations'].append(dict(gt['annotations'][0], id=aid, category_id=cat))
  with pytest.warns(UserWarning, match=r'gt\.json: 2 annotation\(s\) have a "category_id" that is '
                                       r'not in "categories" \(5\); they are not scored') as rec:
    metrics = evaluate_dicts(gt, [_result()], gt_name='gt.json')
  assert len(rec) == 1
  assert metrics == known


# ------------------------------------------------------------------------------------------------
# Evaluator: every field of a results file.


@pytest.mark.parametrize('score, problem', [
    (math.nan, '"score" must be finite, got nan'),
    (math.inf, '"score" must be finite, got inf'),
    (-math.inf, '"score" must be finite, got -inf'),
    (True, '"score" must be a number, got True'),
    ('0.5', '"score" must be a number, got \'0.5\''),
    (None, '"score" must be a number, got None'),
    ([0.5], '"score" must be a number, got [0.5]'),
])
def test_bad_scores(tmp_path, score, problem):
  gt_path, res_path = _write(tmp_path, _gt(), [_result(), _result(score=score)])
  with pytest.raises(ValueError) as e:
    evaluate(gt_path, res_path)
  assert str(e.value) == f'{res_path}: result 1 (video 1): {problem}'


def test_nan_score_in_the_json_text(tmp_path):
  # Python's json reads NaN; a NaN score would rank the track last and change AP.
  gt_path, res_path = _write(tmp_path, _gt(), [])
  with open(res_path, 'w') as f:
    f.write('[{"video_id": 1, "category_id": 1, "score": NaN, "segmentations": [null, null]}]')
  with pytest.raises(ValueError, match=r'res\.json: result 0 \(video 1\): "score" must be finite'):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('results, message', [
    ({'video_id': 1}, r'res\.json: expected a JSON list of tracks, got dict'),
    ([[1, 2]], r'res\.json: result 0: expected an object .*got list'),
    (['x'], r'res\.json: result 0: expected an object .*got str'),
    ([None], r'res\.json: result 0: expected an object .*got NoneType'),
])
def test_results_that_are_not_objects(tmp_path, results, message):
  gt_path, res_path = _write(tmp_path, _gt(), results)
  with pytest.raises(ValueError, match=message):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('field', ['video_id', 'category_id', 'score', 'segmentations'])
def test_results_missing_a_field(tmp_path, field):
  r = _result()
  del r[field]
  gt_path, res_path = _write(tmp_path, _gt(), [_result(), r])
  with pytest.raises(ValueError, match=rf"res\.json: result 1.*: missing field '{field}'"):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('change, message', [
    (dict(video_id=7), r"result 1 is for video 7, which the ground truth does not have"),
    (dict(video_id='1'), r"result 1 is for video '1', which the ground truth does not have"),
    (dict(video_id=True), r"result 1 is for video True, which the ground truth does not have"),
    (dict(video_id=[1]), r"result 1 is for video \[1\], which the ground truth does not have"),
    (dict(category_id='1'), r'result 1 \(video 1\): "category_id" must be an integer, got \'1\''),
    (dict(category_id=1.0), r'result 1 \(video 1\): "category_id" must be an integer, got 1.0'),
    (dict(category_id=None), r'result 1 \(video 1\): "category_id" must be an integer'),
    (dict(segmentations=None), r'result 1 \(video 1\): "segmentations" must be a list .*got '
                               r'NoneType'),
    (dict(segmentations={'size': [4, 4]}), r'result 1 \(video 1\): "segmentations" must be a list'),
    (dict(segmentations=[None]), r'result 1 \(video 1\): "segmentations" must be a list of one '
                                 r'RLE or null per frame: got 1 for a video of 2 frames'),
    (dict(segmentations=[None] * 3), r'result 1 \(video 1\): "segmentations" .*got 3 for a video '
                                     'of 2'),
])
def test_results_fields_of_the_wrong_kind(tmp_path, change, message):
  gt_path, res_path = _write(tmp_path, _gt(), [_result(), _result(**change)])
  with pytest.raises(ValueError, match=r'res\.json: ' + message):
    evaluate(gt_path, res_path)


@pytest.mark.parametrize('seg, problem', [
    (7, 'a frame segmentation must be an RLE object, polygons or null, got 7'),
    ('abc', 'a frame segmentation must be an RLE object, polygons or null, got abc'),
    ([], 'a frame segmentation must be an RLE object, polygons or null, got []'),
    ({}, 'an RLE needs "size" and "counts", got keys []'),
    ({'size': [H, W]}, 'an RLE needs "size" and "counts", got keys [\'size\']'),
    ({'size': [H, W], 'counts': 5}, 'RLE "counts" must be a string or a list of run lengths, got '
                                    'int'),
    ({'size': [H, W], 'counts': None}, 'RLE "counts" must be a string'),
    ({'size': [4.0, 4], 'counts': '02208'}, 'RLE "size" must be [height, width] (two integers), '
                                            'got [4.0, 4]'),
    ({'size': [True, 4], 'counts': '02208'}, 'RLE "size" must be [height, width]'),
    ({'size': '4x4', 'counts': '02208'}, 'RLE "size" must be [height, width]'),
    ({'size': [4], 'counts': '02208'}, 'RLE "size" must be [height, width]'),
    ({'size': [4, 5], 'counts': '02208'}, 'mask size [4, 5] does not match the frame size [4, 4]'),
    ({'size': [H, W], 'counts': [0, 2.0, 14]}, 'uncompressed RLE counts must be integers, got 2.0'),
    ({'size': [H, W], 'counts': [0, True, 15]}, 'uncompressed RLE counts must be integers, got '
                                                'True'),
    ([[0, 0, 1, 0, '1', 1]], 'polygon coordinates must be finite numbers, got \'1\''),
    ([[0, 0, 1, 0]], 'a polygon needs at least 3 (x, y) points, got 4 coordinates'),
    ([[0, 0, 1, 0, 1, 1, 2]], 'a polygon needs at least 3 (x, y) points, got 7 coordinates'),
    ([5, 6, 7], 'a polygon segmentation must be a list of coordinate lists'),
    ([[0, 0, 1, 0, 1e12, 1]], 'polygon point (1000000000000.0, 1) lies far outside the 4x4 frame'),
])
def test_frame_segmentations_of_the_wrong_kind(tmp_path, seg, problem):
  # (Masks the evaluator used to hang on: test_malformed_masks_raise_instead_of_hanging.)
  for side in ('results', 'gt'):
    gt, results = _gt(), [_result()]
    if side == 'gt':
      gt['annotations'][0]['segmentations'][1] = seg
      where = 'gt.json: annotations[0] (id 7) of video 1, frame 1'
    else:
      results[0]['segmentations'][1] = seg
      where = 'res.json: result 0 (video 1), frame 1'
    with pytest.raises(ValueError) as e:
      evaluate_dicts(gt, results, gt_name='gt.json', results_name='res.json')
    assert str(e.value).startswith(f'{where}: {problem}'), str(e.value)


# ------------------------------------------------------------------------------------------------
# Evaluator: every field of the ground truth.


def test_video_without_length_counts_its_file_names():
  gt = _gt()
  want = evaluate_dicts(gt, [_result()])
  del gt['videos'][0]['length']
  assert evaluate_dicts(gt, [_result()]) == want
  del gt['videos'][0]['file_names']
  with pytest.raises(ValueError, match=r'gt\.json: videos\[0\] \(id 1\): missing field "length" '
                                       r'\(and no "file_names" to count\)'):
    evaluate_dicts(gt, [_result()], gt_name='gt.json')


def _gt_problem(change) -> str:
  gt = _gt()
  change(gt)
  with pytest.raises(ValueError) as e:
    evaluate_dicts(gt, [_result()], gt_name='gt.json', results_name='res.json')
  return str(e.value)


def _set(path, value):
  def change(gt):
    obj = gt
    for key in path[:-1]:
      obj = obj[key]
    if value is _DELETE:
      del obj[path[-1]]
    else:
      obj[path[-1]] = value
  return change


_DELETE = object()
_V, _A = ('videos', 0), ('annotations', 0)


@pytest.mark.parametrize('path, value, message', [
    (('annotations',), _DELETE, 'gt.json: no "annotations": a split without ground truth cannot '
                                'be scored'),
    (('videos',), _DELETE, "gt.json: missing field 'videos'"),
    (('videos',), {}, 'gt.json: "videos" must be a list, got dict'),
    (('categories',), _DELETE, "gt.json: missing field 'categories'"),
    (('categories', 0), 3, 'gt.json: categories[0]: expected an object, got int'),
    (('categories', 0, 'id'), '1', 'gt.json: categories[0]: "id" must be an integer, got \'1\''),
    (('categories', 1, 'id'), 1, 'gt.json: categories[1]: duplicate category id 1'),
    (('annotations',), {}, 'gt.json: "annotations" must be a list, got dict'),
    (('annotations', 0), [1], 'gt.json: annotations[0]: expected an object, got list'),
    (_V, 'v', 'gt.json: videos[0]: expected an object, got str'),
    ((*_V, 'id'), _DELETE, "gt.json: videos[0]: missing field 'id'"),
    ((*_V, 'id'), 1.5, 'gt.json: videos[0]: "id" must be an integer, got 1.5'),
    ((*_V, 'height'), 0, 'gt.json: videos[0] (id 1): \'height\' must be a positive integer, got 0'),
    ((*_V, 'width'), '4', 'gt.json: videos[0] (id 1): \'width\' must be a positive integer, got '
                          '\'4\''),
    ((*_V, 'width'), _DELETE, "gt.json: videos[0] (id 1): missing field 'width'"),
    ((*_V, 'length'), 3, 'gt.json: videos[0] (id 1): "length" is 3 but "file_names" lists 2 '
                         'frames'),
    ((*_V, 'length'), 2.0, 'gt.json: videos[0] (id 1): "length" must be an integer, got 2.0'),
    ((*_V, 'file_names'), 'a', 'gt.json: videos[0] (id 1): "file_names" must be a list, got str'),
    ((*_A, 'video_id'), 5, 'gt.json: annotations[0] (id 7): "video_id" 5 is not a video of '
                           '"videos"'),
    ((*_A, 'video_id'), _DELETE, "gt.json: annotations[0] (id 7): missing field 'video_id'"),
    ((*_A, 'category_id'), _DELETE, "gt.json: annotations[0] (id 7) of video 1: missing field "
                                    "'category_id'"),
    ((*_A, 'category_id'), [1], 'gt.json: annotations[0] (id 7) of video 1: "category_id" must be '
                                'an integer, got [1]'),
    ((*_A, 'segmentations'), _DELETE, "gt.json: annotations[0] (id 7) of video 1: missing field "
                                      "'segmentations'"),
    ((*_A, 'segmentations'), 'x', 'gt.json: annotations[0] (id 7) of video 1: "segmentations" '
                                  'must be a list of one segmentation or null per frame: got str '
                                  'for a video of 2 frames'),
    ((*_A, 'iscrowd'), 2, 'gt.json: annotations[0] (id 7) of video 1: "iscrowd" must be 0 or 1, '
                          'got 2'),
    ((*_A, 'iscrowd'), '0', 'gt.json: annotations[0] (id 7) of video 1: "iscrowd" must be 0 or 1'),
    ((*_A, 'areas'), [4.0], 'gt.json: annotations[0] (id 7) of video 1: "areas" must be a list of '
                            '2 per-frame areas or nulls, got 1'),
    ((*_A, 'areas'), [4.0, -1], 'gt.json: annotations[0] (id 7) of video 1: "areas" of frame 1 '
                                'must be a non-negative number or null, got -1'),
    ((*_A, 'areas'), [4.0, '4'], 'gt.json: annotations[0] (id 7) of video 1: "areas" of frame 1 '
                                 'must be a non-negative number or null, got \'4\''),
    ((*_A, 'occlusion'), ['no_occlusion', ['x']], 'gt.json: annotations[0] (id 7) of video 1: '
                                                  'unknown occlusion level [\'x\'] at frame 1'),
    ((*_A, 'occlusion'), ['no_occlusion'], 'gt.json: annotations[0] (id 7) of video 1: '
                                           '"occlusion" has 1 levels for a video of 2 frames'),
    ((*_V, 'width'), 2 ** 30, 'gt.json: videos[0] (id 1): a 4x1073741824 frame is larger than'),
])
def test_ground_truth_fields_of_the_wrong_kind(path, value, message):
  assert _gt_problem(_set(path, value)).startswith(message)


def test_duplicate_video_ids():
  def change(gt):
    gt['videos'].append(dict(gt['videos'][0]))
  assert _gt_problem(change) == 'gt.json: videos[1]: duplicate video id 1'


def test_ground_truth_that_is_not_an_object(tmp_path):
  gt_path, res_path = _write(tmp_path, [1, 2], [])
  with pytest.raises(ValueError, match=r'gt\.json: expected a YouTube-VIS JSON object, got list'):
    evaluate(gt_path, res_path)


# ------------------------------------------------------------------------------------------------
# Training readers.


def _frames(root: str, n: int) -> list[str]:
  from PIL import Image
  os.makedirs(os.path.join(root, 'v'), exist_ok=True)
  for t in range(n):
    Image.new('RGB', (W, H)).save(os.path.join(root, 'v', f'{t}.png'))
  return [f'v/{t}.png' for t in range(n)]


def _train_json(tmp_path, seg1) -> str:
  root = str(tmp_path / 'JPEGImages')
  data = dict(videos=[dict(id=3, height=H, width=W, length=2, file_names=_frames(root, 2))],
              categories=[dict(id=1, name='x')],
              annotations=[dict(id=5, video_id=3, category_id=1, iscrowd=0,
                                segmentations=[_rle(SQUARE), None]),
                           dict(id=6, video_id=3, category_id=1, iscrowd=0,
                                segmentations=[None, seg1])])
  path = tmp_path / 'train.json'
  path.write_text(json.dumps(data))
  return str(path)


@pytest.mark.parametrize('counts, problem', [
    ([0, 2, 2, 2], 'the runs cover 6 pixels, the frame has 16'),
    ([0, 2, 2, 2, 12], 'the runs cover 18 pixels, the frame has 16'),
])
def test_training_rle_that_misses_the_frame(tmp_path, counts, problem):
  path = _train_json(tmp_path, {'size': [H, W], 'counts': _encode(counts)})
  with pytest.raises(ValueError) as e:
    ytvis.load_ytvis(path, str(tmp_path / 'JPEGImages'))
  assert str(e.value) == (f"{path}: annotations[1] (id 6) of video 3 ('v'), frame 1: malformed "
                          f'RLE: {problem} (4x4)')
  # The same check where a mask is decoded (e.g. from TFDS records): never uninitialised memory.
  with pytest.raises(ValueError, match=f'somewhere: malformed RLE: {problem}'):
    ytvis.decode_mask({'size': [H, W], 'counts': _encode(counts)}, H, W, 'somewhere')


def test_training_masks_are_zero_one(tmp_path):
  rng = np.random.default_rng(0)
  noise = (rng.random((H, W)) < 0.5).astype(np.uint8)
  path = _train_json(tmp_path, _rle(noise))
  source = ytvis.FolderSource(ytvis.load_ytvis(path, str(tmp_path / 'JPEGImages')))
  for t, want in ((0, SQUARE), (1, noise)):
    _, masks, labels = source.load(0, t)
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    np.testing.assert_array_equal(masks[0], want)
  for seed in range(20):  # also through decode_mask directly, many shapes
    m = (np.random.default_rng(seed).random((13, 7)) < 0.4).astype(np.uint8)
    got = ytvis.decode_mask(_rle(m), 13, 7, 'x')
    assert set(np.unique(got)) <= {0, 1}
    np.testing.assert_array_equal(got, m)


def _reader_problem(tmp_path, change) -> str:
  root = str(tmp_path / 'JPEGImages')
  data = dict(videos=[dict(id=3, height=H, width=W, length=2, file_names=_frames(root, 2))],
              categories=[dict(id=1, name='x')],
              annotations=[dict(id=5, video_id=3, category_id=1, iscrowd=0,
                                segmentations=[_rle(SQUARE), None])])
  change(data)
  path = tmp_path / 'train.json'
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError) as e:
    ytvis.load_ytvis(str(path), root)
  return str(e.value).replace(str(path), 'train.json')


_RV, _RA = ('videos', 0), ('annotations', 0)
_WHERE = "train.json: annotations[0] (id 5) of video 3 ('v')"


@pytest.mark.parametrize('path, value, message', [
    (('categories', 0, 'id'), '1', 'train.json: categories[0]: \'id\' must be an integer, got '
                                   '\'1\''),
    (('videos',), {}, 'train.json: \'videos\' must be a list, got dict'),
    (('annotations',), {}, 'train.json: "annotations" must be a list, got dict'),
    ((*_RV, 'id'), True, 'train.json: videos[0]: \'id\' must be an integer, got True'),
    ((*_RV, 'height'), '4', "train.json: video 3 ('v'): 'height' must be an integer, got '4'"),
    ((*_RV, 'width'), 0, "train.json: video 3 ('v'): 'width' must be at least 1, got 0"),
    ((*_RV, 'length'), 3, "train.json: video 3 ('v'): \"length\" is 3 but \"file_names\" lists 2"),
    ((*_RV, 'file_names'), ['v/0.png', 5], 'train.json: video 3: "file_names" must be non-empty '
                                           'strings, got 5'),
    ((*_RA, 'id'), 5.5, 'train.json: annotations[0]: \'id\' must be an integer, got 5.5'),
    ((*_RA, 'video_id'), '3', "train.json: annotations[0] (id 5): 'video_id' must be an integer"),
    ((*_RA, 'category_id'), None, f"{_WHERE}: 'category_id' must be an integer, got None"),
    ((*_RA, 'iscrowd'), 'yes', f'{_WHERE}: "iscrowd" must be 0 or 1, got \'yes\''),
    ((*_RA, 'segmentations', 0), {'size': ['4', 4], 'counts': '02208'},
     f'{_WHERE}, frame 0: RLE "size" must be [height, width] (two integers), got [\'4\', 4]'),
    ((*_RA, 'segmentations', 0), {'size': [H, W], 'counts': 3.0},
     f'{_WHERE}, frame 0: RLE counts must be a string or a list, got float'),
    ((*_RA, 'segmentations', 0), {'size': [H, W], 'counts': [0, 2, 2, 2]},
     f'{_WHERE}, frame 0: uncompressed RLE covers 6 pixels, expected 16 (4x4)'),
    ((*_RA, 'segmentations', 0), [[0, 0, 3, 0, 3, 'x']],
     f"{_WHERE}, frame 0: polygon coordinates must be finite numbers, got 'x'"),
    ((*_RA, 'segmentations', 0), [[0, 0, 3, 0, 3, True]],
     f'{_WHERE}, frame 0: polygon coordinates must be finite numbers, got True'),
    ((*_RA, 'segmentations', 0), 'RLE', f'{_WHERE}, frame 0: a segmentation must be an RLE dict, '
                                        'a polygon list or null, got str'),
    ((*_RA, 'segmentations', 0), [[0, 0, 3, 0, 3, -1e9]],
     f'{_WHERE}, frame 0: polygon point (3, -1000000000.0) lies far outside the 4x4 frame'),
    ((*_RV, 'height'), 2 ** 29, "train.json: video 3 ('v'): a 536870912x4 frame is larger than"),
])
def test_training_fields_of_the_wrong_kind(tmp_path, path, value, message):
  assert _reader_problem(tmp_path, _set(path, value)).startswith(message)


def test_coco_fields_of_the_wrong_kind(tmp_path):
  root = tmp_path / 'val2017'
  root.mkdir()
  data = dict(images=[dict(id=1, file_name='a.jpg', height=H, width=W)],
              categories=[dict(id=1, name='x')],
              annotations=[dict(id=2, image_id=1, category_id=1, iscrowd=0,
                                segmentation={'size': [H, W], 'counts': _encode([0, 3])})])
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"instances\.json: annotations\[0\] \(id 2\) of image 1 "
                                       r"\('a'\): malformed RLE: the runs cover 3 pixels"):
    ytvis.load_coco(str(path), str(root))
  data['images'][0]['height'] = 4.0
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"instances\.json: image 1 \('a.jpg'\): 'height' must be an "
                                       'integer, got 4.0'):
    ytvis.load_coco(str(path), str(root))


def test_degenerate_polygons_are_a_warning(tmp_path, caplog):
  def change(data):
    data['annotations'][0]['segmentations'][0] = [[0.0, 0.0, 3.0, 0.0, 3.0, 3.0], [1.0, 2.0]]
  root = str(tmp_path / 'JPEGImages')
  data = dict(videos=[dict(id=3, height=H, width=W, file_names=_frames(root, 1))],
              categories=[dict(id=1, name='x')],
              annotations=[dict(id=5, video_id=3, category_id=1, segmentations=[None])])
  change(data)
  path = tmp_path / 'train.json'
  path.write_text(json.dumps(data))
  with caplog.at_level(logging.WARNING, logger='minvis_jax.data.ytvis'):
    ytvis.load_ytvis(str(path), root)
  (record,) = [r for r in caplog.records if 'degenerate' in r.getMessage()]
  assert record.levelno == logging.WARNING
  assert record.getMessage() == (f"{path}: annotations[0] (id 5) of video 3 ('v'), frame 0: "
                                 'skipped 1 degenerate polygon(s)')


# ------------------------------------------------------------------------------------------------
# Training input: an unannotated split is an error when the source is built (not when evaluating).


def _config(manual_dir: str):
  c = config_lib.load_config(os.path.join(REPO, 'configs', 'tiny.py'))
  c.data.manual_dir = manual_dir
  c.batch_size = 2
  return c


def test_training_on_an_unannotated_split(tmp_path):
  synthetic.generate(str(tmp_path), 'train', num_videos=2, num_frames=2, height=32, width=32,
                     seed=0)
  json_path = ytvis.split_paths('synthetic', str(tmp_path), 'train')[0]
  with open(json_path) as f:
    data = json.load(f)
  c = _config(str(tmp_path))
  input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c),
                            input_pipeline.make_source(c.data, 'train'))  # annotated: fine
  data['annotations'] = []
  with open(json_path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=f'{json_path}: no instance to train on'):
    input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c),
                              input_pipeline.make_source(c.data, 'train'))
  del data['annotations']  # e.g. YouTube-VIS valid.json given as training data
  with open(json_path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=f'{json_path}: has no "annotations", so it cannot be '
                                       'trained on'):
    input_pipeline.train_iterator(c, 0)
  # Reading it for evaluation stays fine: its results go to the evaluation server.
  assert not ytvis.load_split('synthetic', str(tmp_path), 'train').has_annotations
