"""data/ytvis.py, the dataset readers: standard layouts, masks vs pycocotools, COCO, and every
bad-input case."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from support import json_edits, rle_codes

from minvis_jax.data import ytvis

H, W = 24, 32


def _rle(mask: np.ndarray) -> dict:
  r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'size': [int(s) for s in r['size']], 'counts': r['counts'].decode('ascii')}


def _uncompressed_rle(mask: np.ndarray) -> dict:
  """Column-major run lengths starting with zeros, as the COCO crowd format."""
  flat = mask.astype(np.uint8).flatten(order='F')
  counts, value, run = [], 0, 0
  for x in flat:
    if x == value:
      run += 1
    else:
      counts.append(run)
      value, run = x, 1
  counts.append(run)
  return {'size': list(mask.shape), 'counts': counts}


def _box(y0, y1, x0, x1, h=H, w=W):
  m = np.zeros((h, w), np.uint8)
  m[y0:y1, x0:x1] = 1
  return m


def _write_frames(root: str, name: str, n: int, h=H, w=W, seed=0) -> list[str]:
  os.makedirs(os.path.join(root, name), exist_ok=True)
  rng = np.random.default_rng(seed)
  files = []
  for t in range(n):
    rel = f'{name}/{t:05d}.png'  # lossless so that the pixels can be compared
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, rel))
    files.append(rel)
  return files


def _write_json(path: str, data: dict) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)
  return path


CATEGORIES = [{'id': 12, 'name': 'zebra'}, {'id': 3, 'name': 'cat'}, {'id': 7, 'name': 'dog'}]


def _ytvis(image_root: str, num_frames: int = 3, annotations=None, **video_kw) -> dict:
  files = _write_frames(image_root, 'vid_a', num_frames)
  video = {'id': 5, 'height': H, 'width': W, 'length': num_frames, 'file_names': files}
  video.update(video_kw)
  m0 = _box(2, 10, 3, 12)
  default = [
      {'id': 1, 'video_id': 5, 'category_id': 7, 'iscrowd': 0,
       'segmentations': [_rle(m0), None, _rle(m0[::-1].copy())][:num_frames]},
  ]
  return {'videos': [video], 'categories': CATEGORIES,
          'annotations': default if annotations is None else annotations}


def _load(tmp_path, data: dict) -> ytvis.VisDataset:
  root = str(tmp_path)
  path = _write_json(os.path.join(root, 'train.json'), data)
  return ytvis.load_ytvis(path, os.path.join(root, 'train', 'JPEGImages'))


# ------------------------------------------------------------------------------------------------
# Layouts.


def test_split_paths_standard_layouts():
  r = '/data'
  assert ytvis.split_paths('ytvis_2019', r, 'train') == ('/data/train.json',
                                                         '/data/train/JPEGImages')
  assert ytvis.split_paths('synthetic', r, 'valid') == ('/data/valid.json',
                                                        '/data/valid/JPEGImages')
  for ds in ('ytvis_2021', 'ytvis_2022'):
    assert ytvis.split_paths(ds, r, 'train') == ('/data/train/instances.json',
                                                 '/data/train/JPEGImages')
  assert ytvis.split_paths('ovis', r, 'valid') == ('/data/annotations/annotations_valid.json',
                                                   '/data/valid')
  assert ytvis.split_paths('coco', r, 'val') == ('/data/annotations/instances_val2017.json',
                                                 '/data/val2017')
  assert ytvis.split_paths('coco', r, 'train2017')[1] == '/data/train2017'
  with pytest.raises(ValueError, match='unknown dataset'):
    ytvis.split_paths('kitti', r, 'train')


@pytest.mark.parametrize('dataset', ['ytvis_2019', 'ytvis_2021', 'ovis'])
def test_load_split_reads_each_layout(tmp_path, dataset):
  json_path, image_root = ytvis.split_paths(dataset, str(tmp_path), 'train')
  _write_json(json_path, _ytvis(image_root))
  ds = ytvis.load_split(dataset, str(tmp_path), 'train')
  assert ds.json_path == json_path and ds.has_annotations
  # Category index = position of the id among the sorted ids.
  assert ds.category_ids == (3, 7, 12) and ds.category_names == ('cat', 'dog', 'zebra')
  (video,) = ds.videos
  assert (video.id, video.name, video.height, video.width) == (5, 'vid_a', H, W)
  assert video.frame_paths == tuple(os.path.join(image_root, f'vid_a/{t:05d}.png')
                                    for t in range(3))
  assert all(os.path.isabs(p) and os.path.isfile(p) for p in video.frame_paths)
  (inst,) = video.instances
  assert (inst.id, inst.category, inst.iscrowd) == (1, 1, False)
  assert inst.segmentations[1] is None


def test_folder_source_frames_masks_labels(tmp_path):
  ds = _load(tmp_path, _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages')))
  src = ytvis.FolderSource(ds)
  assert src.num_videos == 1 and src.num_frames(0) == 3
  image, masks, labels = src.load(0, 2)
  expected = np.asarray(Image.open(ds.videos[0].frame_paths[2]).convert('RGB'))
  np.testing.assert_array_equal(image, expected)
  assert image.dtype == np.uint8 and masks.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(masks, _box(2, 10, 3, 12)[::-1][None])
  np.testing.assert_array_equal(labels, [1])
  # Frame 1: the only instance is absent -> no instances (legal).
  image, masks, labels = src.load(0, 1)
  assert masks.shape == (0, H, W) and labels.shape == (0,)
  with pytest.raises(IndexError):
    src.load(0, 3)


def test_masks_polygon_and_rle_match_pycocotools(tmp_path):
  rng = np.random.default_rng(1)
  rand = (rng.random((H, W)) < 0.4).astype(np.uint8)
  poly = [[2.0, 3.0, 20.5, 4.0, 15.0, 19.5], [22.0, 2.0, 30.0, 2.0, 30.0, 9.0, 22.0, 9.0]]
  unc = _uncompressed_rle(rand)
  anns = [
      {'id': 1, 'video_id': 5, 'category_id': 3, 'segmentations': [_rle(rand), None]},
      {'id': 2, 'video_id': 5, 'category_id': 12, 'segmentations': [unc, None]},
      {'id': 3, 'video_id': 5, 'category_id': 7, 'segmentations': [poly, None]},
  ]
  ds = _load(tmp_path, _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'), 2, anns))
  _, masks, labels = ytvis.FolderSource(ds).load(0, 0)
  np.testing.assert_array_equal(labels, [0, 2, 1])
  np.testing.assert_array_equal(masks[0], rand)
  np.testing.assert_array_equal(masks[1], rand)
  ref_poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W)))
  assert ref_poly.sum() > 50
  np.testing.assert_array_equal(masks[2], ref_poly)
  # Bytes counts decode too, and None gives zeros.
  rle = mask_utils.encode(np.asfortranarray(rand))
  np.testing.assert_array_equal(ytvis.decode_mask(rle, H, W, 'x'), rand)
  np.testing.assert_array_equal(ytvis.decode_mask(None, H, W, 'x'), np.zeros((H, W)))


def test_crowd_instances_are_dropped_and_logged(tmp_path, caplog):
  m = _box(0, 5, 0, 5)
  anns = [{'id': 1, 'video_id': 5, 'category_id': 3, 'segmentations': [_rle(m)], 'iscrowd': 1},
          {'id': 2, 'video_id': 5, 'category_id': 7, 'segmentations': [_rle(1 - m)]}]
  ds = _load(tmp_path, _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'), 1, anns))
  assert [i.iscrowd for i in ds.videos[0].instances] == [True, False]
  with caplog.at_level(logging.INFO):
    src = ytvis.FolderSource(ds)
  assert 'crowd' in caplog.text
  _, masks, labels = src.load(0, 0)
  np.testing.assert_array_equal(labels, [1])
  np.testing.assert_array_equal(masks[0], 1 - m)


def test_valid_json_without_annotations(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'))
  del data['annotations']
  ds = _load(tmp_path, data)
  assert not ds.has_annotations and ds.videos[0].instances == ()
  _, masks, labels = ytvis.FolderSource(ds).load(0, 0)
  assert masks.shape == (0, H, W) and labels.shape == (0,)


def test_coco_images_are_one_frame_videos(tmp_path):
  root = str(tmp_path)
  json_path, image_root = ytvis.split_paths('coco', root, 'val')
  sizes = [(H, W), (20, 28), (H, W)]
  images, anns = [], []
  rng = np.random.default_rng(3)
  for i, (h, w) in enumerate(sizes):
    fname = f'{i:012d}.jpg'
    os.makedirs(image_root, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(image_root, fname))
    images.append({'id': 100 + i, 'file_name': fname, 'height': h, 'width': w})
  crowd = _uncompressed_rle(_box(10, 20, 0, 28, 20, 28))
  anns = [
      {'id': 1, 'image_id': 100, 'category_id': 12, 'iscrowd': 0, 'area': 1.0, 'bbox': [0, 0, 1, 1],
       'segmentation': [[1.0, 1.0, 20.0, 1.0, 20.0, 15.0, 1.0, 15.0]]},
      {'id': 2, 'image_id': 101, 'category_id': 3, 'iscrowd': 1, 'area': 1.0, 'bbox': [0, 0, 1, 1],
       'segmentation': crowd},
      {'id': 3, 'image_id': 101, 'category_id': 7, 'iscrowd': 0, 'area': 1.0, 'bbox': [0, 0, 1, 1],
       'segmentation': [[2.0, 2.0, 9.0, 3.0, 5.0, 8.0]]},
  ]
  _write_json(json_path, {'images': images, 'annotations': anns, 'categories': CATEGORIES})
  ds = ytvis.load_split('coco', root, 'val')
  assert [v.id for v in ds.videos] == [100, 101, 102]
  assert [len(v.frame_paths) for v in ds.videos] == [1, 1, 1]
  assert ds.videos[1].name == f'{1:012d}' and (ds.videos[1].height, ds.videos[1].width) == (20, 28)
  coco = COCO(json_path)
  src = ytvis.FolderSource(ds)
  image, masks, labels = src.load(0, 0)
  assert image.shape == (H, W, 3)
  np.testing.assert_array_equal(masks, coco.annToMask(coco.anns[1])[None])
  np.testing.assert_array_equal(labels, [2])
  _, masks, labels = src.load(1, 0)  # the crowd one is dropped
  np.testing.assert_array_equal(masks, coco.annToMask(coco.anns[3])[None])
  np.testing.assert_array_equal(labels, [1])
  # The crowd RLE itself decodes as pycocotools does.
  crowd_inst = ds.videos[1].instances[0]
  assert crowd_inst.iscrowd
  np.testing.assert_array_equal(ytvis.decode_mask(crowd_inst.segmentations[0], 20, 28, 'x'),
                                coco.annToMask(coco.anns[2]))
  _, masks, _ = src.load(2, 0)
  assert masks.shape == (0, H, W)


# ------------------------------------------------------------------------------------------------
# Bad input: each error names the file and the video.


def test_missing_json_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.json'):
    ytvis.load_ytvis(str(tmp_path / 'nope.json'), str(tmp_path))


def test_malformed_json(tmp_path):
  path = tmp_path / 'train.json'
  path.write_text('{"videos": [1, 2')
  with pytest.raises(ValueError, match=r'train\.json: not a JSON annotation file \(malformed JSON'):
    ytvis.load_ytvis(str(path), str(tmp_path))


def test_missing_frame_at_read_time(tmp_path):
  ds = _load(tmp_path, _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages')))
  os.remove(ds.videos[0].frame_paths[1])
  src = ytvis.FolderSource(ds)
  src.load(0, 0)
  with pytest.raises(FileNotFoundError, match=r"00001\.png: frame not found.*video 5 \('vid_a'\)"):
    src.load(0, 1)


def test_corrupt_frame(tmp_path):
  ds = _load(tmp_path, _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages')))
  with open(ds.videos[0].frame_paths[2], 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n this is not a png')
  with pytest.raises(ValueError, match=r"00002\.png: corrupt.*video 5 \('vid_a'\)"):
    ytvis.FolderSource(ds).load(0, 2)


def test_truncated_jpeg_frame(tmp_path):
  path = str(tmp_path / 'f.jpg')
  Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'f\.jpg: corrupt'):
    ytvis.read_frame(path)


def test_frame_of_wrong_size(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'), annotations=[], height=H + 1)
  ds = _load(tmp_path, data)
  with pytest.raises(ValueError, match=r"00000\.png: frame is 24x32 but .*video 5 \('vid_a'\)"):
    ytvis.FolderSource(ds).load(0, 0)


def test_unknown_category(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'))
  data['annotations'][0]['category_id'] = 99
  with pytest.raises(ValueError,
                     match=r"train\.json: annotations\[0\] \(id 1\) of video 5 \('vid_a'\): "
                           'unknown category id 99'):
    _load(tmp_path, data)


def test_unknown_video_id(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'))
  data['annotations'][0]['video_id'] = 6
  with pytest.raises(ValueError,
                     match=r'train\.json: annotations\[0\] \(id 1\): video id 6 is not in '
                           '"videos"'):
    _load(tmp_path, data)


def test_mask_of_wrong_size_when_read(tmp_path):
  big = _rle(np.ones((H, W + 4), np.uint8))
  anns = [{'id': 4, 'video_id': 5, 'category_id': 3, 'segmentations': [None, big]}]
  # Checked when the file is read, not when (hours into training) the frame is first decoded.
  with pytest.raises(ValueError, match=r"train\.json: annotations\[0\] \(id 4\) of video 5 "
                                       r"\('vid_a'\), frame 1: mask size \[24, 36\] does not "
                                       'match'):
    _load(tmp_path, _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'), 2, anns))
  with pytest.raises(ValueError, match=r'somewhere: mask size \[24, 36\] does not match'):
    ytvis.decode_mask(big, H, W, 'somewhere')


def test_uncompressed_rle_of_wrong_length(tmp_path):
  bad = {'size': [H, W], 'counts': [5, 10, 3]}
  with pytest.raises(ValueError, match='covers 18 pixels'):
    ytvis.decode_mask(bad, H, W, 'somewhere')


def test_corrupt_compressed_rle(tmp_path):
  with pytest.raises(ValueError, match="somewhere: malformed RLE: character 'r' at position 2"):
    ytvis.decode_mask({'size': [H, W], 'counts': 'garbage!!'}, H, W, 'somewhere')


def test_video_with_no_frames(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'))
  data['videos'].append({'id': 8, 'height': H, 'width': W, 'length': 0, 'file_names': []})
  with pytest.raises(ValueError, match=r'train\.json: video 8: video has no frames'):
    _load(tmp_path, data)


def test_segmentations_length_differs_from_frames(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'))
  data['annotations'][0]['segmentations'].append(None)
  with pytest.raises(ValueError, match=r"annotations\[0\] \(id 1\) of video 5 \('vid_a'\): 4 "
                                       'segmentations for a video of 3 frames'):
    _load(tmp_path, data)


def test_missing_field(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'))
  del data['videos'][0]['height']
  with pytest.raises(ValueError, match=r"video 5 \('vid_a'\): missing field 'height'"):
    _load(tmp_path, data)


def test_degenerate_polygons_are_skipped_and_logged(tmp_path, caplog):
  anns = [{'id': 1, 'video_id': 5, 'category_id': 3,
           'segmentations': [[[1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0], [1.0]]]}]
  with caplog.at_level(logging.INFO):
    ds = _load(tmp_path, _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'), 2, anns))
  assert 'degenerate polygon' in caplog.text
  segs = ds.videos[0].instances[0].segmentations
  assert segs[0] is None and segs[1] == [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]


# ------------------------------------------------------------------------------------------------
# Training readers: bad input (never a silent result; every error names the file, the record
# and the field).

SH, SW = 4, 4
SQUARE = np.zeros((SH, SW), np.uint8)
SQUARE[:2, :2] = 1


def _frames(root: str, n: int) -> list[str]:
  os.makedirs(os.path.join(root, 'v'), exist_ok=True)
  for t in range(n):
    Image.new('RGB', (SW, SH)).save(os.path.join(root, 'v', f'{t}.png'))
  return [f'v/{t}.png' for t in range(n)]


def _train_json(tmp_path, seg1) -> str:
  root = str(tmp_path / 'JPEGImages')
  data = dict(videos=[dict(id=3, height=SH, width=SW, length=2, file_names=_frames(root, 2))],
              categories=[dict(id=1, name='x')],
              annotations=[dict(id=5, video_id=3, category_id=1, iscrowd=0,
                                segmentations=[rle_codes.mask_rle(SQUARE), None]),
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
  path = _train_json(tmp_path, {'size': [SH, SW], 'counts': rle_codes.encode(counts)})
  with pytest.raises(ValueError) as e:
    ytvis.load_ytvis(path, str(tmp_path / 'JPEGImages'))
  assert str(e.value) == (f"{path}: annotations[1] (id 6) of video 3 ('v'), frame 1: malformed "
                          f'RLE: {problem} (4x4)')
  # The same check where a mask is decoded (e.g. from TFDS records): never uninitialised memory.
  with pytest.raises(ValueError, match=f'somewhere: malformed RLE: {problem}'):
    ytvis.decode_mask({'size': [SH, SW], 'counts': rle_codes.encode(counts)}, SH, SW, 'somewhere')


def test_training_masks_are_zero_one(tmp_path):
  rng = np.random.default_rng(0)
  noise = (rng.random((SH, SW)) < 0.5).astype(np.uint8)
  path = _train_json(tmp_path, rle_codes.mask_rle(noise))
  source = ytvis.FolderSource(ytvis.load_ytvis(path, str(tmp_path / 'JPEGImages')))
  for t, want in ((0, SQUARE), (1, noise)):
    _, masks, labels = source.load(0, t)
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    np.testing.assert_array_equal(masks[0], want)
  for seed in range(20):  # also through decode_mask directly, many shapes
    m = (np.random.default_rng(seed).random((13, 7)) < 0.4).astype(np.uint8)
    got = ytvis.decode_mask(rle_codes.mask_rle(m), 13, 7, 'x')
    assert set(np.unique(got)) <= {0, 1}
    np.testing.assert_array_equal(got, m)


def _reader_problem(tmp_path, change) -> str:
  root = str(tmp_path / 'JPEGImages')
  data = dict(videos=[dict(id=3, height=SH, width=SW, length=2, file_names=_frames(root, 2))],
              categories=[dict(id=1, name='x')],
              annotations=[dict(id=5, video_id=3, category_id=1, iscrowd=0,
                                segmentations=[rle_codes.mask_rle(SQUARE), None])])
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
    ((*_RA, 'segmentations', 0), {'size': [SH, SW], 'counts': 3.0},
     f'{_WHERE}, frame 0: RLE counts must be a string or a list, got float'),
    ((*_RA, 'segmentations', 0), {'size': [SH, SW], 'counts': [0, 2, 2, 2]},
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
  assert _reader_problem(tmp_path, json_edits.set_at(path, value)).startswith(message)


def test_coco_fields_of_the_wrong_kind(tmp_path):
  root = tmp_path / 'val2017'
  root.mkdir()
  data = dict(images=[dict(id=1, file_name='a.jpg', height=SH, width=SW)],
              categories=[dict(id=1, name='x')],
              annotations=[dict(id=2, image_id=1, category_id=1, iscrowd=0,
                                segmentation={'size': [SH, SW],
                                              'counts': rle_codes.encode([0, 3])})])
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
  data = dict(videos=[dict(id=3, height=SH, width=SW, file_names=_frames(root, 1))],
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
# Duplicates and JSON that is not what it seems.


def test_duplicate_annotation_ids_name_both_records(tmp_path):
  data = _ytvis(os.path.join(str(tmp_path), 'train', 'JPEGImages'))
  data['annotations'].append(dict(data['annotations'][0]))
  with pytest.raises(ValueError, match=r'train\.json: annotations\[1\]: duplicate annotation id 1 '
                     r'\(also annotations\[0\]\)$'):
    _load(tmp_path, data)
  data['annotations'].pop()
  data['videos'].append(dict(data['videos'][0]))
  with pytest.raises(ValueError, match=r'train\.json: videos\[1\]: duplicate video id 5 \(also '
                     r'videos\[0\]\)$'):
    _load(tmp_path, data)


def test_duplicate_coco_annotation_and_image_ids_name_both_records(tmp_path):
  root = str(tmp_path)
  Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(os.path.join(root, 'a.png'))
  images = [{'id': 1, 'file_name': 'a.png', 'height': H, 'width': W}]
  ann = {'id': 4, 'image_id': 1, 'category_id': 3, 'segmentation': _rle(_box(2, 9, 2, 9))}
  path = _write_json(os.path.join(root, 'c.json'), {'images': images, 'categories': CATEGORIES,
                                                     'annotations': [ann, ann]})
  with pytest.raises(ValueError, match=r'c\.json: annotations\[1\]: duplicate annotation id 4 '
                     r'\(also annotations\[0\]\)'):
    ytvis.load_coco(path, root)
  _write_json(path, {'images': images * 2, 'categories': CATEGORIES, 'annotations': []})
  with pytest.raises(ValueError, match=r'c\.json: images\[1\]: duplicate image id 1 \(also '
                     r'images\[0\]\)'):
    ytvis.load_coco(path, root)


@pytest.mark.parametrize('content, message', [
    (b'{"videos": [], "annotations": [], "annotations": [], "categories": []}',
     r"train\.json: key 'annotations' appears 2 times in one object \(JSON keeps only the last\)"),
    (b'{"videos": [{"id": 1, "id": 2}]}', r"train\.json: key 'id' appears 2 times"),
    (b'[' * 100000 + b']' * 100000, r'train\.json: not a JSON annotation file: nested too deeply'),
    (b'{"videos": "\xff\xfe"}', r'train\.json: not a JSON annotation file: not UTF-8 text \(byte '
     r'12: invalid start byte\)'),
])
def test_json_that_is_not_what_it_seems_names_the_file(tmp_path, content, message):
  """Duplicate keys (json keeps the last silently), nesting past the parser's recursion limit and
  bytes that are not UTF-8: one ValueError naming the file."""
  path = tmp_path / 'train.json'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as info:
    ytvis.load_ytvis(str(path), str(tmp_path))
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('bad', ['../../../x/00000.png', '/etc/passwd', 'vid_a/../../00000.png'])
def test_a_frame_path_that_leaves_the_dataset_root_is_refused(tmp_path, bad):
  image_root = os.path.join(str(tmp_path), 'train', 'JPEGImages')
  data = _ytvis(image_root)
  data['videos'][0]['file_names'][1] = bad
  with pytest.raises(ValueError, match=r"train\.json: video 5 \('vid_a'\): \"file_names\": path "
                     + repr(bad).replace('.', r'\.') + ' leaves the dataset root ' + image_root):
    _load(tmp_path, data)


def test_paths_inside_the_root_and_symlinks_are_followed(tmp_path):
  """A `..` that stays inside the root is fine; a symlinked folder inside the root may point
  anywhere (datasets are often assembled from links): the text of the path is judged, not where
  a link leads."""
  image_root = os.path.join(str(tmp_path), 'train', 'JPEGImages')
  data = _ytvis(image_root)
  outside = tmp_path / 'elsewhere'
  os.rename(os.path.join(image_root, 'vid_a'), outside)
  os.symlink(outside, os.path.join(image_root, 'vid_a'))
  data['videos'][0]['file_names'][0] = 'vid_a/../vid_a/00000.png'
  ds = _load(tmp_path, data)
  assert ds.videos[0].frame_paths[0] == os.path.join(image_root, 'vid_a', '00000.png')
  image, _, _ = ytvis.FolderSource(ds).load(0, 0)
  np.testing.assert_array_equal(image, np.asarray(Image.open(outside / '00000.png')))
