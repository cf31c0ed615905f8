"""TFDS builders (array_record, no TensorFlow) of the dataset folders read by `ytvis`, and a frame
source over `tfds.data_source` with the same interface as `ytvis.FolderSource`.

  minvis-jax data build --dataset ytvis_2019 --manual_dir ROOT --data_dir DIR
  (or python -m minvis_jax.data.tfds_builders with the same flags)

One example = one whole video: its encoded frames as stored on disk (never re-encoded, so pixels are
identical to the folder's), and per instance one compressed RLE string per frame (b'' = absent).
"""

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.data_sources.base import file_instructions

from minvis_jax import paths
from minvis_jax.data import bucket_records
from minvis_jax.data import ytvis

_SPLITS = {
    'synthetic': ('train', 'valid'),
    'ytvis_2019': ('train', 'valid', 'test'),
    'ytvis_2021': ('train', 'valid', 'test'),
    'ytvis_2022': ('train', 'valid', 'test'),
    'ovis': ('train', 'valid', 'test'),
    'coco': ('train', 'val'),
}


class _VisBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads a standard folder layout (see `ytvis.split_paths`) from manual_dir: the splits there."""

  DATASET = ''  # key of ytvis.split_paths
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'Whole videos: encoded frames, per-frame RLE instance masks.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put the dataset in its standard layout in manual_dir '
      '(see minvis_jax.data.ytvis.split_paths).')
  # TFDS otherwise infers this through importlib_resources, which is not a dependency here.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = 'array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'{self.DATASET} videos for MinVIS (frames + per-frame instance RLEs).',
        features=tfds.features.FeaturesDict({
            'video_id': tfds.features.Tensor(shape=(), dtype=np.int64),
            'name': tfds.features.Text(),
            'height': tfds.features.Tensor(shape=(), dtype=np.int32),
            'width': tfds.features.Tensor(shape=(), dtype=np.int32),
            'file_names': tfds.features.Tensor(shape=(None,), dtype=np.object_),  # [T] rel. paths
            'frames': tfds.features.Tensor(shape=(None,), dtype=np.object_),      # [T] encoded
            'annotated': tfds.features.Tensor(shape=(None,), dtype=np.bool_),     # [T]
            'instances': {
                'id': tfds.features.Tensor(shape=(None,), dtype=np.int64),           # [N]
                'category': tfds.features.Tensor(shape=(None,), dtype=np.int64),     # [N] 0-based
                'category_id': tfds.features.Tensor(shape=(None,), dtype=np.int64),  # [N] dataset
                'iscrowd': tfds.features.Tensor(shape=(None,), dtype=np.bool_),      # [N]
                # [N * T] row-major; TFDS stores only one unknown dimension for strings.
                'rles': tfds.features.Tensor(shape=(None,), dtype=np.object_),
            },
        }),
        metadata=tfds.core.MetadataDict(),
        # Example i is video i of the JSON: the same indices as ytvis.FolderSource.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = str(dl_manager.manual_dir)
    datasets, roots = {}, {}
    for split in _SPLITS[self.DATASET]:
      json_path, roots[split] = ytvis.split_paths(self.DATASET, root, split)
      if paths.isfile(json_path):
        datasets[split] = ytvis.load_split(self.DATASET, root, split)
    if not datasets:
      expected = [ytvis.split_paths(self.DATASET, root, s)[0] for s in _SPLITS[self.DATASET]]
      raise FileNotFoundError(f'{root}: no {self.DATASET} annotation file found (expected any of '
                              f'{expected})')
    first = next(iter(datasets.values()))
    self.info.metadata.update({
        'dataset': self.DATASET,
        'category_ids': list(first.category_ids),
        'category_names': list(first.category_names),
        'num_frames': {s: [len(v.frame_paths) for v in d.videos] for s, d in datasets.items()},
        'has_annotations': {s: d.has_annotations for s, d in datasets.items()},
        'num_instances': {s: d.num_instances for s, d in datasets.items()},
    })
    return {s: self._generate_examples(d, roots[s]) for s, d in datasets.items()}

  def _generate_examples(self, dataset: ytvis.VisDataset, image_root: str):
    for index, video in enumerate(dataset.videos):
      yield f'{index:09d}', _video_example(dataset, video, image_root)


def _video_example(dataset: ytvis.VisDataset, video: ytvis.Video, image_root: str) -> dict:
  where = f'{dataset.json_path}: video {video.id} ({video.name!r})'
  frames = []
  for t, path in enumerate(video.frame_paths):
    if not paths.isfile(path):
      raise FileNotFoundError(f'{path}: frame {t} of {where} not found')
    with paths.open(path, 'rb') as f:
      data = f.read()
    # Decoded whole (a truncated JPEG has a valid header): a bad frame fails the build, not the
    # training run that reads it hours later.
    image = ytvis.decode_frame(data, f'{path} (frame {t} of {where})')
    ytvis.check_frame_size(image, video, path, where)
    frames.append(data)
  rles = []
  for inst in video.instances:
    for t, seg in enumerate(inst.segmentations):
      rle = ytvis.to_rle(seg, video.height, video.width,
                         f'{where}, annotation {inst.id}, frame {t}')
      rles.append(b'' if rle is None else rle['counts'])
  n = len(video.instances)
  return {
      'video_id': video.id,
      'name': video.name,
      'height': video.height,
      'width': video.width,
      'file_names': np.asarray([paths.relpath(p, image_root).encode() for p in video.frame_paths],
                               dtype=object),
      'frames': np.asarray(frames, dtype=object),
      'annotated': np.full(len(frames), dataset.has_annotations),
      'instances': {
          'id': np.asarray([i.id for i in video.instances], np.int64).reshape(n),
          'category': np.asarray([i.category for i in video.instances], np.int64).reshape(n),
          'category_id': np.asarray([dataset.category_ids[i.category] for i in video.instances],
                                    np.int64).reshape(n),
          'iscrowd': np.asarray([i.iscrowd for i in video.instances], bool).reshape(n),
          'rles': np.asarray(rles, dtype=object).reshape(len(rles)),
      },
  }


class MinvisSynthetic(_VisBuilder):
  DATASET = 'synthetic'


class MinvisYtvis2019(_VisBuilder):
  DATASET = 'ytvis_2019'


class MinvisYtvis2021(_VisBuilder):
  DATASET = 'ytvis_2021'


class MinvisYtvis2022(_VisBuilder):
  DATASET = 'ytvis_2022'


class MinvisOvis(_VisBuilder):
  DATASET = 'ovis'


class MinvisCoco(_VisBuilder):
  DATASET = 'coco'


BUILDERS = {b.DATASET: b for b in (MinvisSynthetic, MinvisYtvis2019, MinvisYtvis2021,
                                   MinvisYtvis2022, MinvisOvis, MinvisCoco)}


def builder_name(dataset: str) -> str:
  """'ytvis_2019' (or the TFDS name 'minvis_ytvis2019') -> 'minvis_ytvis2019'."""
  names = {b.name: b.name for b in BUILDERS.values()}
  if dataset in names:
    return dataset
  return BUILDERS[ytvis.canonical_dataset(dataset)].name


def build(dataset: str, manual_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Prepares (once) the TFDS dataset of `dataset` from its folder layout in manual_dir."""
  builder = tfds.builder(builder_name(dataset), data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


class TfdsSource:
  """Random access to the frames of a prepared TFDS split; the interface of ytvis.FolderSource.
  `data_dir` is a local folder (tfds.data_source) or a URL (records read one byte range at a time
  through `bucket_records`, never a local copy of the shards)."""

  def __init__(self, dataset: str, split: str, data_dir: str):
    name = builder_name(dataset)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(f'{data_dir}: TFDS dataset {name} is not prepared '
                              f'(run minvis_jax.data.tfds_builders.build first)')
    if split not in builder.info.splits:
      raise ValueError(f'{builder.data_dir}: no split {split!r} (has {list(builder.info.splits)})')
    self.name, self.split = name, split
    if paths.is_remote(data_dir):
      # array_record's reader opens local files only: records are read one range at a time.
      self.source = bucket_records.BucketRecords(
          file_instructions(builder.info, split), builder.info.features.deserialize_example_np)
    else:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    meta = builder.info.metadata
    self.category_ids = tuple(meta['category_ids'])
    self.category_names = tuple(meta['category_names'])
    self.has_annotations = bool(meta['has_annotations'][split])
    # Instances training can use (not crowd); None for datasets prepared before it was recorded.
    self.num_instances = meta.get('num_instances', {}).get(split)
    self.origin = f'{builder.data_dir} ({name} {split})'
    self._num_frames = list(meta['num_frames'][split])
    self.num_videos = len(self.source)
    if len(self._num_frames) != self.num_videos:
      raise ValueError(f'{builder.data_dir}: metadata lists {len(self._num_frames)} videos, the '
                       f'{split} split has {self.num_videos}')
    self._cache = (None, None)  # (v, video): frames of one video are often read in a row

  def __getstate__(self) -> dict:
    # Sent to input workers: without the cached video.
    return {**self.__dict__, '_cache': (None, None)}

  def num_frames(self, v: int) -> int:
    return self._num_frames[v]

  def video(self, v: int) -> tuple[ytvis.Video, dict]:
    """(ytvis.Video with RLE segmentations, raw example) of video v; frame_paths are relative."""
    if self._cache[0] == v:
      return self._cache[1]
    ex = self.source[v]
    h, w, t_count = int(ex['height']), int(ex['width']), len(ex['frames'])
    inst = ex['instances']
    rles = np.asarray(inst['rles'], dtype=object).reshape(len(inst['id']), t_count)
    instances = tuple(
        ytvis.Instance(id=int(inst['id'][i]), category=int(inst['category'][i]),
                       iscrowd=bool(inst['iscrowd'][i]),
                       segmentations=[{'size': [h, w], 'counts': r} if r else None
                                      for r in rles[i]])
        for i in range(len(inst['id'])))
    name = ex['name'].decode() if isinstance(ex['name'], bytes) else str(ex['name'])
    video = ytvis.Video(id=int(ex['video_id']), name=name, height=h, width=w,
                        frame_paths=tuple(f.decode() for f in ex['file_names']),
                        instances=instances)
    self._cache = (v, (video, ex))
    return video, ex

  def load(self, v: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame t of video v: (image uint8 [H, W, 3], masks uint8 [N, H, W], labels int32 [N])."""
    video, ex = self.video(v)
    if not 0 <= t < video.num_frames:
      raise IndexError(f'frame {t} out of range for video {video.id} ({video.name!r}) of '
                       f'{video.num_frames} frames')
    where = f'{self.name}/{self.split}: video {video.id} ({video.name!r})'
    path = video.frame_paths[t]
    image = ytvis.decode_frame(ex['frames'][t], f'{path} (frame {t} of {where})')
    ytvis.check_frame_size(image, video, path, where)
    masks, labels = ytvis.frame_annotations(video, t, where)
    return image, masks, labels


if __name__ == '__main__':
  import sys

  # The CLI uses this very module: TFDS registers a builder class once per name, so a second import
  # of this file under its package name would fail.
  sys.modules['minvis_jax.data.tfds_builders'] = sys.modules['__main__']
  from minvis_jax import cli
  sys.exit(cli.main(['data', 'build'] + sys.argv[1:]))
