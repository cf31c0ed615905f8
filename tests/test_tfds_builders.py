"""TFDS builders: every builder prepares offline from a small generated folder and reads back equal
to the folder reader, frame by frame; no TensorFlow involved."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from minvis_jax import cli
from minvis_jax.data import synthetic, tfds_builders, ytvis

from support import layouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

H, W, T = 40, 56, 4


def _read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('synthetic'))
  synthetic.generate(root, 'train', 3, T, H, W, seed=5)
  synthetic.generate(root, 'valid', 2, T, H, W, seed=5)
  return root


def _assert_same_as_folder(dataset: str, manual_dir: str, data_dir: str, split: str) -> int:
  folder = ytvis.FolderSource(ytvis.load_split(dataset, manual_dir, split))
  source = tfds_builders.TfdsSource(dataset, split, data_dir)
  assert source.num_videos == folder.num_videos
  assert source.category_ids == folder.dataset.category_ids
  assert source.category_names == folder.dataset.category_names
  assert source.has_annotations == folder.dataset.has_annotations
  frames = 0
  for v in range(folder.num_videos):
    assert source.num_frames(v) == folder.num_frames(v)
    video, _ = source.video(v)
    ref = folder.dataset.videos[v]
    assert (video.id, video.name, video.height, video.width) == (ref.id, ref.name, ref.height,
                                                                 ref.width)
    assert [i.id for i in video.instances] == [i.id for i in ref.instances]
    for t in range(folder.num_frames(v)):
      for got, want in zip(source.load(v, t), folder.load(v, t)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
      frames += 1
  return frames


@pytest.mark.parametrize('dataset', ['synthetic', 'ytvis_2019', 'ytvis_2021', 'ytvis_2022', 'ovis'])
def test_video_builders_read_back_like_the_folder(tmp_path, synthetic_root, dataset):
  manual_dir = synthetic_root
  if dataset != 'synthetic':
    manual_dir = str(tmp_path / 'manual')
    layouts.relayout(synthetic_root, manual_dir, dataset)
  data_dir = str(tmp_path / 'tfds')
  name = tfds_builders.builder_name(dataset)
  assert name == 'minvis_' + dataset.replace('_', '')
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  assert builder.info.file_format.value == 'array_record'
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      'train': 3, 'valid': 2}
  # The raw example through tfds.data_source.
  train = tfds.data_source(name, split='train', data_dir=data_dir, download=False)
  ex = train[1]
  ref = ytvis.load_split(dataset, manual_dir, 'train').videos[1]
  assert int(ex['video_id']) == ref.id and len(ex['frames']) == T and ex['annotated'].all()
  np.testing.assert_array_equal(ex['instances']['category_id'],
                                [i.category + 1 for i in ref.instances])  # synthetic ids 1..4
  assert len(ex['instances']['rles']) == T * len(ref.instances)
  assert _assert_same_as_folder(dataset, manual_dir, data_dir, 'train') == 3 * T
  assert _assert_same_as_folder(dataset, manual_dir, data_dir, 'valid') == 2 * T
  assert 'tensorflow' not in sys.modules


def test_coco_builder(tmp_path):
  manual_dir, data_dir = str(tmp_path / 'coco'), str(tmp_path / 'tfds')
  layouts.coco_root(manual_dir)
  builder = tfds_builders.build('coco', manual_dir, data_dir)
  assert builder.name == 'minvis_coco' and list(builder.info.splits) == ['train']
  assert _assert_same_as_folder('coco', manual_dir, data_dir, 'train') == 3
  source = tfds_builders.TfdsSource('minvis_coco', 'train', data_dir)
  _, masks, labels = source.load(0, 0)
  np.testing.assert_array_equal(labels, [1, 0])
  assert masks[0].sum() > 100 and masks[1].sum() == 100
  _, masks, labels = source.load(1, 0)  # crowd dropped
  assert masks.shape == (1, 30, 44) and labels.tolist() == [1]
  video, _ = source.video(1)
  assert video.instances[0].iscrowd
  np.testing.assert_array_equal(
      ytvis.decode_mask(video.instances[0].segmentations[0], 30, 44, 'x')[5:20, 10:30], 1)
  _, masks, labels = source.load(2, 0)
  assert masks.shape == (0, H, W) and labels.shape == (0,)


def test_split_without_annotations(tmp_path, synthetic_root):
  manual_dir = str(tmp_path / 'ovis')
  layouts.relayout(synthetic_root, manual_dir, 'ovis')
  json_path = ytvis.split_paths('ovis', manual_dir, 'valid')[0]
  data = _read_json(json_path)
  del data['annotations']
  with open(json_path, 'w') as f:
    json.dump(data, f)
  data_dir = str(tmp_path / 'tfds')
  tfds_builders.build('ovis', manual_dir, data_dir)
  ex = tfds.data_source('minvis_ovis', split='valid', data_dir=data_dir, download=False)[0]
  assert not ex['annotated'].any() and len(ex['instances']['id']) == 0
  assert _assert_same_as_folder('ovis', manual_dir, data_dir, 'valid') == 2 * T


def test_missing_frame_fails_the_build(tmp_path, synthetic_root):
  manual_dir = str(tmp_path / 'm')
  layouts.relayout(synthetic_root, manual_dir, 'ytvis_2019', splits=('train',))
  os.remove(os.path.join(manual_dir, 'train/JPEGImages/train_00001/00002.jpg'))
  with pytest.raises(FileNotFoundError, match=r"00002\.jpg: frame 2 of .*train\.json: video 2 "
                                              r"\('train_00001'\)"):
    tfds_builders.build('ytvis_2019', manual_dir, str(tmp_path / 'tfds'))


def test_frame_of_wrong_size_fails_the_build(tmp_path, synthetic_root):
  manual_dir = str(tmp_path / 'm')
  layouts.relayout(synthetic_root, manual_dir, 'ytvis_2019', splits=('train',))
  Image.new('RGB', (W + 2, H)).save(
      os.path.join(manual_dir, 'train/JPEGImages/train_00000/00001.jpg'))
  with pytest.raises(ValueError,
                     match=r"00001\.jpg: frame is 40x58 but .*video 1 \('train_00000'\)"):
    tfds_builders.build('ytvis_2019', manual_dir, str(tmp_path / 'tfds'))


def test_no_annotation_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='no ytvis_2021 annotation file found'):
    tfds_builders.build('ytvis_2021', str(tmp_path), str(tmp_path / 'tfds'))


def test_unprepared_source(tmp_path):
  with pytest.raises(FileNotFoundError, match='minvis_ovis is not prepared'):
    tfds_builders.TfdsSource('ovis', 'train', str(tmp_path))


def test_cli(tmp_path, synthetic_root, capsys):
  assert cli.main(['data', 'build', '--dataset', 'synthetic', '--manual_dir', synthetic_root,
                   '--data_dir', str(tmp_path)]) == 0
  assert 'minvis_synthetic' in capsys.readouterr().out
  source = tfds_builders.TfdsSource('synthetic', 'valid', str(tmp_path))
  assert source.num_videos == 2
  # Input workers receive the source pickled.
  want = source.load(1, 3)
  for got, exp in zip(pickle.loads(pickle.dumps(source)).load(1, 3), want):
    np.testing.assert_array_equal(got, exp)


def test_truncated_jpeg_fails_the_build(tmp_path, synthetic_root):
  # Its header is intact (the size reads fine): only decoding the whole frame finds it.
  manual_dir = str(tmp_path / 'm')
  layouts.relayout(synthetic_root, manual_dir, 'ytvis_2019', splits=('train',))
  path = os.path.join(manual_dir, 'train/JPEGImages/train_00001/00003.jpg')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) * 2 // 3])
  with Image.open(path) as im:
    assert im.size == (W, H)
  with pytest.raises(ValueError, match=r"00003\.jpg \(frame 3 of .*train\.json: video 2 "
                                       r"\('train_00001'\)\): corrupt or unreadable image"):
    tfds_builders.build('ytvis_2019', manual_dir, str(tmp_path / 'tfds'))


def test_training_on_an_unannotated_prepared_split(tmp_path, synthetic_root):
  from minvis_jax import config_lib
  from minvis_jax.data import input_pipeline
  manual_dir = str(tmp_path / 'm')
  layouts.relayout(synthetic_root, manual_dir, 'ytvis_2019', splits=('train',))
  json_path = ytvis.split_paths('ytvis_2019', manual_dir, 'train')[0]
  data = _read_json(json_path)
  del data['annotations']
  with open(json_path, 'w') as f:
    json.dump(data, f)
  data_dir = str(tmp_path / 'tfds')
  tfds_builders.build('ytvis_2019', manual_dir, data_dir)
  c = config_lib.load_config(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'configs', 'tiny.py'))
  c.data.dataset, c.data.tfds_dir, c.batch_size = 'ytvis_2019', data_dir, 2
  with pytest.raises(ValueError, match=r'minvis_ytvis2019 train\): has no "annotations", so it '
                                       'cannot be trained on'):
    input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c),
                              input_pipeline.make_source(c.data, 'train'))


def test_python_m_forwards_to_the_data_build_subcommand():
  proc = subprocess.run([sys.executable, '-m', 'minvis_jax.data.tfds_builders', '--help'],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('usage: minvis-jax data build') and '--manual_dir' in proc.stdout


def test_records_in_a_bucket_stream_record_by_record_like_the_local_copy(
    tmp_path, gcs_bucket, monkeypatch):
  """Two shards whose records (about 90 KB) cross riegeli's 64 KiB block boundaries, uploaded to
  the storage emulator: read through data.tfds_dir=gs://..., every example and training batch
  equals the local read, and the local staging never holds more than one record's chunk (plus
  the shard's head and tail) per reader, never a shard."""
  from array_record.python import array_record_module

  from minvis_jax import config_lib
  from minvis_jax import paths
  from minvis_jax.data import bucket_records, input_pipeline
  from support import gcs_emulator as emulator
  manual_dir, data_dir = str(tmp_path / 'raw'), str(tmp_path / 'tfds')
  synthetic.generate(manual_dir, 'train', 8, 3, 480, 640, seed=3)
  builder = tfds.builder('minvis_synthetic', data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, num_shards=2))
  shards = sorted(f for f in os.listdir(builder.data_dir) if '.array_record-' in f)
  assert len(shards) == 2
  url = emulator.upload_tree(data_dir, f'{gcs_bucket}/tfds')

  staging = tmp_path / 'staging'
  staging.mkdir()
  monkeypatch.setattr(bucket_records, 'STAGING_DIR', str(staging))
  seen = []   # (files, allocated bytes) in the staging folder whenever a record is read
  real_reader = array_record_module.ArrayRecordReader

  def watched_reader(path, *args, **kwargs):
    if path.startswith(str(staging)):
      sizes = []
      for f in staging.iterdir():
        try:   # another input thread may delete its staged record between listing and stat
          sizes.append(f.stat().st_blocks * 512)
        except FileNotFoundError:
          pass
      seen.append((len(sizes), sum(sizes)))
    return real_reader(path, *args, **kwargs)
  monkeypatch.setattr(bucket_records.array_record_module, 'ArrayRecordReader', watched_reader)

  remote = tfds_builders.TfdsSource('synthetic', 'train', url)
  local = tfds_builders.TfdsSource('synthetic', 'train', data_dir)
  assert (remote.num_videos, remote.category_ids, remote.num_instances) == (
      local.num_videos, local.category_ids, local.num_instances) and remote.num_videos == 8
  records = array_record_module.ArrayRecordReader(os.path.join(builder.data_dir, shards[0]))
  assert max(len(r) for r in records.read_all()) > 2**16   # a record spans a block boundary
  records.close()
  for v in reversed(range(8)):   # random access: the last shard first
    got, want = remote.source[v], local.source[v]
    assert got.keys() == want.keys()
    for key in want:
      for g, w in (zip(got[key].values(), want[key].values()) if key == 'instances'
                   else [(got[key], want[key])]):
        np.testing.assert_array_equal(g, w)
    for t in range(remote.num_frames(v)):
      for g, w in zip(remote.load(v, t), local.load(v, t)):
        np.testing.assert_array_equal(g, w)
  shard_size = min(paths.getsize(os.path.join(builder.data_dir, f)) for f in shards)
  bound = max(len(s.head) + max(e - b for b, e in zip(s.begins, s.ends)) + len(s.tail)
              for s in {shard for shard, _ in remote.source._ranges})
  assert len(seen) == 16 and max(n for n, _ in seen) == 1   # source[v], then load's (cached)
  assert max(b for _, b in seen) <= bound + 3 * 4096 < shard_size / 2, (seen, bound, shard_size)
  assert list(staging.iterdir()) == []   # each staged record deleted after its read

  # Training batches (four input threads) equal the local ones.
  c = config_lib.load_config(os.path.join(REPO, 'configs', 'tiny.py'))
  c.data.dataset, c.batch_size, c.data.workers, c.model.num_classes = 'synthetic', 4, 4, 4
  streams = []
  for tfds_dir in (url, data_dir):
    c.data.tfds_dir = tfds_dir
    stream = input_pipeline.train_iterator(c, 0)
    streams.append([next(stream) for _ in range(2)])
  for got, want in zip(*streams):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert max(n for n, _ in seen) <= 4 and list(staging.iterdir()) == []


def test_a_bucket_shard_that_is_not_array_record_is_one_line(tmp_path, gcs_bucket):
  from minvis_jax import paths
  from minvis_jax.data import bucket_records
  url = f'{gcs_bucket}/x.array_record-00000-of-00001'
  paths.write_atomic(url, b'\0' * 100)
  with pytest.raises(ValueError, match=rf'^{url}: not an array_record shard this reader can '
                     r'stream \(size 100 is not a whole number of 64 KiB blocks\)$'):
    bucket_records._Shard(url)
