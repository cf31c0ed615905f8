"""Readers of the standard dataset folders: YouTube-VIS 2019/2021/2022, OVIS and COCO instances.

Every dataset becomes a `VisDataset` of videos (a COCO image is a one-frame video); masks are
decoded per frame on demand through pycocotools, so a reader never holds a decoded video in memory.
"""

import dataclasses
import io
import logging
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from minvis_jax import paths as path_lib
from minvis_jax import user_input
from minvis_jax.data import rle

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Instance:
  id: int                 # annotation id
  category: int           # 0-based class index (position of its id among the sorted category ids)
  iscrowd: bool
  segmentations: list     # per frame: RLE dict (checked, compressed counts), polygon list, or None


@dataclasses.dataclass(frozen=True)
class Video:
  id: int
  name: str               # the frame folder name
  height: int
  width: int
  frame_paths: tuple[str, ...]   # absolute paths, in order
  instances: tuple[Instance, ...]

  @property
  def num_frames(self) -> int:
    return len(self.frame_paths)


@dataclasses.dataclass(frozen=True)
class VisDataset:
  json_path: str
  videos: tuple[Video, ...]
  category_ids: tuple[int, ...]      # dataset category id of class index i (sorted ids)
  category_names: tuple[str, ...]
  has_annotations: bool              # False for e.g. the official valid.json without annotations

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  @property
  def num_instances(self) -> int:
    """Instances a training input can use (crowd ones are dropped)."""
    return sum(not inst.iscrowd for v in self.videos for inst in v.instances)


# ------------------------------------------------------------------------------------------------
# JSON parsing.


def _load_json(path: str) -> dict:
  data = rle.load_json(path, 'annotation')
  if not isinstance(data, dict):
    raise ValueError(f'{path}: malformed annotation file: top level is {type(data).__name__}, '
                     'expected an object')
  return data


def _int_field(obj: dict, key: str, where: str, minimum: int | None = None) -> int:
  """An integer field (not a bool, a float or a string), at least `minimum` if given."""
  x = rle.field(obj, key, where)
  if not rle.is_int(x):
    raise ValueError(f'{where}: {key!r} must be an integer, got {x!r}')
  if minimum is not None and x < minimum:
    raise ValueError(f'{where}: {key!r} must be at least {minimum}, got {x}')
  return int(x)


def _crowd(obj: dict, where: str) -> bool:
  flag = obj.get('iscrowd', 0)
  if not isinstance(flag, (int, np.integer, bool, np.bool_)) or flag not in (0, 1):
    raise ValueError(f'{where}: "iscrowd" must be 0 or 1, got {flag!r}')
  return bool(flag)


def _list_field(obj: dict, key: str, where: str) -> list:
  x = rle.field(obj, key, where)
  if not isinstance(x, list):
    raise ValueError(f'{where}: {key!r} must be a list, got {type(x).__name__}')
  return x


def _categories(data: dict, path: str) -> tuple[tuple[int, ...], tuple[str, ...], dict[int, int]]:
  """(sorted dataset ids, their names, dataset id -> contiguous index)."""
  cats = rle.field(data, 'categories', path)
  if not isinstance(cats, list) or not cats:
    raise ValueError(f'{path}: "categories" must be a non-empty list')
  by_id, seen = {}, {}
  for j, c in enumerate(cats):
    cid = _int_field(c, 'id', f'{path}: categories[{j}]')
    _unique(seen, cid, j, path, 'categories', 'category')
    by_id[cid] = str(c.get('name', cid))
  ids = tuple(sorted(by_id))
  return ids, tuple(by_id[i] for i in ids), {cid: i for i, cid in enumerate(ids)}


def _unique(seen: dict, rid: int, j: int, path: str, key: str, what: str) -> None:
  """Records id `rid` of record `key`[j]; ValueError naming both records when it was seen before
  (two records with one id would both be trained on or scored)."""
  if rid in seen:
    raise ValueError(f'{path}: {key}[{j}]: duplicate {what} id {rid} (also {key}[{seen[rid]}])')
  seen[rid] = j


def _valid_polygons(seg: list, height: int, width: int, where: str) -> list | None:
  """Keeps the polygons of >= 3 points as detectron2 does; None when none is left."""
  rle.check_polygons(seg, height, width, where)
  polys = [list(map(float, p)) for p in seg if len(p) % 2 == 0 and len(p) >= 6]
  if len(polys) != len(seg):
    _log.warning('%s: skipped %d degenerate polygon(s)', where, len(seg) - len(polys))
  return polys or None


def _clean_segmentation(seg: Any, height: int, width: int, where: str):
  """Normalises 'absent' (None, [], {}) to None; checks the type and the RLE size; drops degenerate
  polygons; an uncompressed RLE becomes a compressed one (checked). Compressed counts are left to
  check_rle_counts, which checks many at once."""
  if seg is None or (isinstance(seg, (list, dict)) and not seg):
    return None
  if isinstance(seg, list):
    return _valid_polygons(seg, height, width, where)
  if isinstance(seg, dict):
    if 'counts' not in seg or 'size' not in seg:
      raise ValueError(f'{where}: an RLE segmentation needs "counts" and "size"')
    rle.check_rle_size(seg['size'], height, width, where)
    counts = seg['counts']
    if isinstance(counts, list):
      return rle.uncompressed_rle(seg, height, width, where)
    if not isinstance(counts, (str, bytes)):
      raise ValueError(f'{where}: RLE counts must be a string or a list, got '
                       f'{type(counts).__name__}')
    return {'size': [height, width], 'counts': counts}
  raise ValueError(f'{where}: a segmentation must be an RLE dict, a polygon list or null, '
                   f'got {type(seg).__name__}')


class _CompressedRles:
  """Compressed RLEs of a file, checked together once it is read (check_rle_counts)."""

  def __init__(self):
    self.counts, self.sizes, self.where = [], [], []

  def add(self, seg, height: int, width: int, where: str):
    if isinstance(seg, dict) and isinstance(seg['counts'], (str, bytes)):
      self.counts.append(seg['counts'])
      self.sizes.append((height, width))
      self.where.append(where)
    return seg

  def check(self) -> None:
    rle.check_rle_counts(self.counts, self.sizes, lambda i: self.where[i])


def _annotations(data: dict, path: str) -> list | None:
  anns = data.get('annotations')
  if anns is not None and not isinstance(anns, list):
    raise ValueError(f'{path}: "annotations" must be a list, got {type(anns).__name__}')
  return anns


def load_ytvis(json_path: str, image_root: str) -> VisDataset:
  """Reads a YouTube-VIS (2019/2021/2022) or OVIS annotation file; frames live under image_root.

  Annotations (if any) keep every frame's segmentation; crowd instances are kept with iscrowd=True
  (the training input drops them, as the original). Every field read is checked here, RLEs against
  their frame size included, with the record and the frame in the message.
  """
  json_path = path_lib.abspath(json_path)
  image_root = path_lib.abspath(image_root)
  data = _load_json(json_path)
  category_ids, category_names, cat_index = _categories(data, json_path)
  raw_videos = _list_field(data, 'videos', json_path)

  videos, video_index = {}, {}  # id -> (name, h, w, frame paths); id -> record index
  for j, rv in enumerate(raw_videos):
    vid = _int_field(rv, 'id', f'{json_path}: videos[{j}]')
    where = f'{json_path}: video {vid}'
    _unique(video_index, vid, j, json_path, 'videos', 'video')
    files = rle.field(rv, 'file_names', where)
    if not isinstance(files, list) or not files:
      raise ValueError(f'{where}: video has no frames ("file_names" is empty)')
    if not all(isinstance(f, str) and f for f in files):
      bad = next(f for f in files if not (isinstance(f, str) and f))
      raise ValueError(f'{where}: "file_names" must be non-empty strings, got {bad!r}')
    name = path_lib.dirname(files[0]) or str(vid)
    where = f'{json_path}: video {vid} ({name!r})'
    h, w = _int_field(rv, 'height', where, 1), _int_field(rv, 'width', where, 1)
    rle.check_frame_pixels(h, w, where)
    if 'length' in rv and _int_field(rv, 'length', where) != len(files):
      raise ValueError(f'{where}: "length" is {rv["length"]} but "file_names" lists '
                       f'{len(files)} frames')
    videos[vid] = (name, h, w, tuple(user_input.path_under(image_root, f, f'{where}: "file_names"')
                                     for f in files))

  raw_anns = _annotations(data, json_path)
  has_annotations = raw_anns is not None
  instances = {vid: [] for vid in videos}
  rles, ann_index = _CompressedRles(), {}
  for j, ann in enumerate(raw_anns or ()):
    aid = _int_field(ann, 'id', f'{json_path}: annotations[{j}]')
    _unique(ann_index, aid, j, json_path, 'annotations', 'annotation')
    where = f'{json_path}: annotations[{j}] (id {aid})'
    vid = _int_field(ann, 'video_id', where)
    if vid not in videos:
      raise ValueError(f'{where}: video id {vid} is not in "videos"')
    name, h, w, paths = videos[vid]
    where = f'{json_path}: annotations[{j}] (id {aid}) of video {vid} ({name!r})'
    cid = _int_field(ann, 'category_id', where)
    if cid not in cat_index:
      raise ValueError(f'{where}: unknown category id {cid} (known: {list(category_ids)})')
    segs = rle.field(ann, 'segmentations', where)
    if not isinstance(segs, list) or len(segs) != len(paths):
      n = len(segs) if isinstance(segs, list) else type(segs).__name__
      raise ValueError(f'{where}: {n} segmentations for a video of {len(paths)} frames')
    segs = [rles.add(_clean_segmentation(s, h, w, f'{where}, frame {t}'), h, w,
                     f'{where}, frame {t}')
            for t, s in enumerate(segs)]
    instances[vid].append(
        Instance(id=aid, category=cat_index[cid], iscrowd=_crowd(ann, where), segmentations=segs))
  rles.check()

  return VisDataset(
      json_path=json_path,
      videos=tuple(Video(id=vid, name=n, height=h, width=w, frame_paths=p,
                         instances=tuple(instances[vid]))
                   for vid, (n, h, w, p) in videos.items()),
      category_ids=category_ids, category_names=category_names, has_annotations=has_annotations)


def load_coco(json_path: str, image_root: str) -> VisDataset:
  """Reads a COCO instances file: every image becomes a one-frame video (id = image id)."""
  json_path = path_lib.abspath(json_path)
  image_root = path_lib.abspath(image_root)
  data = _load_json(json_path)
  category_ids, category_names, cat_index = _categories(data, json_path)
  images = _list_field(data, 'images', json_path)
  videos, image_index = {}, {}
  for j, im in enumerate(images):
    iid = _int_field(im, 'id', f'{json_path}: images[{j}]')
    where = f'{json_path}: image {iid}'
    _unique(image_index, iid, j, json_path, 'images', 'image')
    fname = rle.field(im, 'file_name', where)
    if not isinstance(fname, str) or not fname:
      raise ValueError(f'{where}: "file_name" must be a non-empty string, got {fname!r}')
    where = f'{json_path}: image {iid} ({fname!r})'
    h, w = _int_field(im, 'height', where, 1), _int_field(im, 'width', where, 1)
    rle.check_frame_pixels(h, w, where)
    path = user_input.path_under(image_root, fname, f'{where}: "file_name"')
    videos[iid] = (path_lib.splitext(fname)[0], h, w, (path,))

  raw_anns = _annotations(data, json_path)
  instances = {iid: [] for iid in videos}
  rles, ann_index = _CompressedRles(), {}
  for j, ann in enumerate(raw_anns or ()):
    aid = _int_field(ann, 'id', f'{json_path}: annotations[{j}]')
    _unique(ann_index, aid, j, json_path, 'annotations', 'annotation')
    where = f'{json_path}: annotations[{j}] (id {aid})'
    iid = _int_field(ann, 'image_id', where)
    if iid not in videos:
      raise ValueError(f'{where}: image id {iid} is not in "images"')
    _, h, w, _ = videos[iid]
    where = f'{json_path}: annotations[{j}] (id {aid}) of image {iid} ({videos[iid][0]!r})'
    cid = _int_field(ann, 'category_id', where)
    if cid not in cat_index:
      raise ValueError(f'{where}: unknown category id {cid} (known: {list(category_ids)})')
    seg = rles.add(_clean_segmentation(ann.get('segmentation'), h, w, where), h, w, where)
    if seg is None:
      # detectron2 drops annotations without a valid segmentation.
      _log.info('%s: no valid segmentation, skipped', where)
      continue
    instances[iid].append(
        Instance(id=aid, category=cat_index[cid], iscrowd=_crowd(ann, where), segmentations=[seg]))
  rles.check()

  return VisDataset(
      json_path=json_path,
      videos=tuple(Video(id=iid, name=n, height=h, width=w, frame_paths=p,
                         instances=tuple(instances[iid]))
                   for iid, (n, h, w, p) in videos.items()),
      category_ids=category_ids, category_names=category_names,
      has_annotations=raw_anns is not None)


# ------------------------------------------------------------------------------------------------
# Standard layouts.

DATASETS = ('synthetic', 'ytvis_2019', 'ytvis_2021', 'ytvis_2022', 'ovis', 'coco')


def canonical_dataset(dataset: str) -> str:
  """The name in DATASETS of a dataset name or alias (ytvis2019, youtube_vis_2021, coco2017...)."""
  name = dataset.lower().replace('-', '_')
  name = {'ytvis2019': 'ytvis_2019', 'ytvis2021': 'ytvis_2021', 'ytvis2022': 'ytvis_2022',
          'youtube_vis_2019': 'ytvis_2019', 'youtube_vis_2021': 'ytvis_2021',
          'youtube_vis_2022': 'ytvis_2022', 'coco2017': 'coco'}.get(name, name)
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')
  return name


def split_paths(dataset: str, manual_dir: str, split: str) -> tuple[str, str]:
  """(annotation json, image root) of a split in the dataset's standard folder layout.

  synthetic, ytvis_2019: <split>.json, <split>/JPEGImages; ytvis_2021/2022: <split>/instances.json,
  <split>/JPEGImages; ovis: annotations/annotations_<split>.json, <split>;
  coco: annotations/instances_<split>2017.json, <split>2017 ('train' / 'val').
  """
  name = canonical_dataset(dataset)
  root = path_lib.abspath(manual_dir)
  if name in ('synthetic', 'ytvis_2019'):
    return path_lib.join(root, f'{split}.json'), path_lib.join(root, split, 'JPEGImages')
  if name in ('ytvis_2021', 'ytvis_2022'):
    return (path_lib.join(root, split, 'instances.json'),
            path_lib.join(root, split, 'JPEGImages'))
  if name == 'ovis':
    return (path_lib.join(root, 'annotations', f'annotations_{split}.json'),
            path_lib.join(root, split))
  split = split if split.endswith('2017') else f'{split}2017'
  return path_lib.join(root, 'annotations', f'instances_{split}.json'), path_lib.join(root, split)


def load_split(dataset: str, manual_dir: str, split: str) -> VisDataset:
  """Reads a split of a dataset from its standard layout under manual_dir."""
  json_path, image_root = split_paths(dataset, manual_dir, split)
  if canonical_dataset(dataset) == 'coco':
    return load_coco(json_path, image_root)
  return load_ytvis(json_path, image_root)


# ------------------------------------------------------------------------------------------------
# Masks and frames.


def to_rle(segmentation, height: int, width: int, where: str) -> dict | None:
  """A segmentation (RLE dict, polygons or None) -> compressed RLE (counts bytes) or None.

  Raises ValueError naming `where` unless it is a valid mask of height x width.
  """
  seg = _clean_segmentation(segmentation, height, width, where)
  if seg is None:
    return None
  if isinstance(seg, list):
    return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
  counts = seg['counts']
  rle.check_rle_counts([counts], [(height, width)], lambda i: where)
  return {'size': [height, width], 'counts': counts.encode() if isinstance(counts, str) else counts}


def decode_mask(segmentation, height: int, width: int, where: str) -> np.ndarray:
  """A segmentation (RLE dict, polygons or None) -> uint8 [height, width] in {0, 1}; zeros for None.

  `where` names the file/video/frame in errors (e.g. a mask whose size is not the frame's).
  """
  compressed = to_rle(segmentation, height, width, where)
  if compressed is None:
    return np.zeros((height, width), np.uint8)
  # The counts are checked (to_rle): the decoded mask is exactly 0/1 over height x width.
  return np.ascontiguousarray(mask_utils.decode(compressed), np.uint8)


# Pillow modes whose conversion to RGB keeps every colour: 1/L gray, P palette, alpha dropped,
# CMYK/YCbCr converted. 16-bit gray (I;16*, and I within 0..65535) is scaled to 8 bits here.
_RGB_MODES = ('RGB', '1', 'L', 'P', 'RGBA', 'RGBX', 'RGBa', 'LA', 'PA', 'CMYK', 'YCbCr')
_GRAY16_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def decode_frame(data: bytes, where: str) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) -> uint8 [H, W, 3] RGB; ValueError names `where`.

  Gray, palette, RGBA (alpha dropped), CMYK and YCbCr frames are converted to RGB, 16-bit gray
  ones scaled to 8 bits (v * 255 / 65535, rounded); any other pixel format (32-bit float, values
  beyond 16 bits) is refused naming it, never clipped."""
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{where}: corrupt or unreadable image ({e})') from None
  with im:
    if im.mode in _RGB_MODES:
      return np.asarray(im.convert('RGB'))
    if im.mode not in _GRAY16_MODES:
      raise ValueError(f'{where}: a {im.format} image of pixel format {im.mode}, which has no '
                       f'exact 8-bit RGB form: convert it to 8-bit RGB (or 8/16-bit gray)')
    gray = np.asarray(im).astype(np.int64)
    if gray.size and (gray.min() < 0 or gray.max() > 65535):
      raise ValueError(f'{where}: a {im.format} image of pixel format {im.mode} with values '
                       f'outside 0..65535: convert it to 8-bit RGB')
    gray = ((gray * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def read_frame(path: str) -> np.ndarray:
  """An image file -> uint8 [H, W, 3] RGB; FileNotFoundError / ValueError name the file."""
  if not path_lib.isfile(path):
    raise FileNotFoundError(f'{path}: frame not found')
  with path_lib.open(path, 'rb') as f:
    return decode_frame(f.read(), path)


def frame_annotations(video: Video, t: int, where: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(masks uint8 [N, H, W], labels int32 [N]) of frame t: non-crowd instances present at t.

  Crowd instances are dropped (docs/method.md §1); only frame t's segmentations are decoded.
  """
  where = where or f'video {video.id} ({video.name!r})'
  masks, labels = [], []
  for inst in video.instances:
    seg = inst.segmentations[t]
    if inst.iscrowd or seg is None:
      continue
    masks.append(decode_mask(seg, video.height, video.width,
                             f'{where}, annotation {inst.id}, frame {t}'))
    labels.append(inst.category)
  if not masks:
    return np.zeros((0, video.height, video.width), np.uint8), np.zeros((0,), np.int32)
  return np.stack(masks), np.asarray(labels, np.int32)


def check_frame_size(image: np.ndarray, video: Video, path: str, where: str) -> None:
  if image.shape[:2] != (video.height, video.width):
    raise ValueError(f'{path}: frame is {image.shape[0]}x{image.shape[1]} but {where} says '
                     f'{video.height}x{video.width}')


class FolderSource:
  """Random access to the frames of a VisDataset read from its folder (a training input source)."""

  def __init__(self, dataset: VisDataset):
    self.dataset = dataset
    self.origin = dataset.json_path
    self.num_videos = len(dataset.videos)
    self.has_annotations = dataset.has_annotations
    self.num_instances = dataset.num_instances
    crowd = sum(inst.iscrowd for v in dataset.videos for inst in v.instances)
    if crowd:
      _log.info('%s: %d crowd instance(s) are skipped for training', dataset.json_path, crowd)

  def num_frames(self, v: int) -> int:
    return len(self.dataset.videos[v].frame_paths)

  def load(self, v: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame t of video v: (image uint8 [H, W, 3], masks uint8 [N, H, W], labels int32 [N])."""
    video = self.dataset.videos[v]
    if not 0 <= t < len(video.frame_paths):
      raise IndexError(f'frame {t} out of range for video {video.id} ({video.name!r}) of '
                       f'{len(video.frame_paths)} frames')
    where = f'{self.dataset.json_path}: video {video.id} ({video.name!r})'
    path = video.frame_paths[t]
    try:
      image = read_frame(path)
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f'{e}; frame {t} of {where}') from None
    check_frame_size(image, video, path, where)
    masks, labels = frame_annotations(video, t, where)
    return image, masks, labels
