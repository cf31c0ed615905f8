"""Synthetic VIS videos: determinism, masks vs JSON areas/bboxes/JPEG, motion, occlusion, CLI."""

import filecmp
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minvis_jax import cli
from minvis_jax.data import synthetic, ytvis

H, W = 64, 96


def _read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('syn'))
  path = synthetic.generate(root, 'train', 16, 8, H, W, seed=3)
  return root, path, ytvis.load_ytvis(path, os.path.join(root, 'train', 'JPEGImages'))


def _decoded(ds):
  """(video, instance, [T, H, W] masks) for every annotation."""
  for v in ds.videos:
    for inst in v.instances:
      yield v, inst, np.stack([ytvis.decode_mask(s, v.height, v.width, 'x')
                               for s in inst.segmentations])


def test_same_seed_same_files_other_seed_differs(tmp_path, dataset):
  root, path, _ = dataset
  other = str(tmp_path / 'again')
  path2 = synthetic.generate(other, 'train', 3, 8, H, W, seed=3)
  first = _read_json(path)
  second = _read_json(path2)
  # Video i does not depend on how many videos are written.
  assert second['videos'] == first['videos'][:3]
  assert second['annotations'] == [a for a in first['annotations'] if a['video_id'] <= 3]
  for f in second['videos'][0]['file_names']:
    assert filecmp.cmp(os.path.join(root, 'train/JPEGImages', f),
                       os.path.join(other, 'train/JPEGImages', f), shallow=False)
  path3 = synthetic.generate(str(tmp_path / 'seed4'), 'train', 3, 8, H, W, seed=4)
  assert _read_json(path3)['annotations'] != second['annotations']
  # train and valid of the same seed are different videos.
  path4 = synthetic.generate(str(tmp_path / 'valid'), 'valid', 3, 8, H, W, seed=3)
  assert _read_json(path4)['annotations'] != second['annotations']


def test_json_schema_and_instance_counts(dataset):
  _, path, ds = dataset
  data = _read_json(path)
  assert [c['id'] for c in data['categories']] == [1, 2, 3, 4]
  assert ds.category_names == ('disc', 'square', 'triangle', 'cross')
  assert all(1 <= len(v.instances) <= 4 for v in ds.videos)
  for a in data['annotations']:
    assert a['iscrowd'] == 0 and len(a['segmentations']) == 8
    for s, area, box in zip(a['segmentations'], a['areas'], a['bboxes']):
      assert (s is None) == (area is None) == (box is None)
      assert s is None or isinstance(s['counts'], str)
  # All four categories occur.
  assert {i.category for v in ds.videos for i in v.instances} == {0, 1, 2, 3}


def test_masks_match_areas_bboxes_and_are_disjoint(dataset):
  _, path, ds = dataset
  anns = {a['id']: a for a in _read_json(path)['annotations']}
  union = {}
  for v, inst, masks in _decoded(ds):
    a = anns[inst.id]
    for t, m in enumerate(masks):
      if a['areas'][t] is None:
        assert not m.any()
        continue
      assert m.sum() == a['areas'][t] > 0
      ys, xs = np.nonzero(m)
      np.testing.assert_allclose(a['bboxes'][t], [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                  ys.max() - ys.min() + 1])
    prev = union.get(v.id, np.zeros_like(masks))
    assert not (prev & masks).any(), 'visible masks of one video overlap'
    union[v.id] = prev | masks


def test_masks_agree_with_jpeg_pixels(dataset):
  """Each visible mask shows its own category's colours: masks are after occlusion, not amodal."""
  _, _, ds = dataset
  centroids = synthetic._COLORS.mean(axis=1)  # [4, 3]
  hits = total = 0
  for v, inst, masks in _decoded(ds):
    for t, m in enumerate(masks):
      if m.sum() < 40:
        continue
      image = np.asarray(Image.open(v.frame_paths[t]).convert('RGB')).astype(np.float32)
      mean = image[m.astype(bool)].mean(0)
      hits += int(np.argmin(((centroids - mean) ** 2).sum(1)) == inst.category)
      total += 1
  assert total > 50 and hits >= 0.95 * total, (hits, total)


def test_jpeg_equals_render(dataset):
  _, _, ds = dataset
  sim = synthetic.render_video(synthetic.video_rng(3, 'train', 0), 8, H, W)
  for t, p in enumerate(ds.videos[0].frame_paths):
    buf = io.BytesIO()
    Image.fromarray(sim['frames'][t]).save(buf, format='JPEG', quality=90)
    with open(p, 'rb') as f:
      assert f.read() == buf.getvalue()
  visible = [m for m in sim['visible'] if m.any()]
  masks = [m for _, _, m in _decoded(ytvis.VisDataset(ds.json_path, ds.videos[:1], (), (), True))]
  np.testing.assert_array_equal(np.stack(masks).astype(bool), np.stack(visible))


def test_objects_enter_and_leave(dataset):
  _, _, ds = dataset
  present = [np.array([s is not None for s in i.segmentations])
             for v in ds.videos for i in v.instances]
  entering = [p for p in present if not p[0] and p.any()]
  leaving = [p for p in present if not p[-1] and p.any()]
  assert entering and leaving
  # Present frames of an entering object are contiguous up to the end or a later exit.
  assert any(p[-1] for p in entering)


def test_occlusion_happens_and_front_wins():
  occluded = 0
  for i in range(10):
    sim = synthetic.render_video(synthetic.video_rng(0, 'train', i), 6, H, W)
    vis, amo = sim['visible'], sim['amodal']
    assert not (vis & ~amo).any()
    np.testing.assert_array_equal(vis[0], amo[0])  # the front instance is never occluded
    assert (vis.sum(0) <= 1).all()
    occluded += int(((vis.sum((2, 3)) < amo.sum((2, 3))) & vis.any((2, 3))).sum())
  assert occluded > 0


def test_scale_changes():
  changes = []
  for i in range(8):
    sim = synthetic.render_video(synthetic.video_rng(0, 'train', i), 6, H, W)
    a = sim['amodal'][0].sum((1, 2))  # instance 0 always stays in view
    changes.append(a[-1] / a[0])
  assert min(changes) < 0.8 and max(changes) > 1.25


def test_cli_writes_layout_readable_by_load_ytvis(tmp_path):
  out = str(tmp_path / 'cli')
  subprocess.run([sys.executable, '-m', 'minvis_jax.data.synthetic', '--out', out, '--videos', '3',
                  '--frames', '4', '--valid_videos', '2', '--height', '48', '--width', '80',
                  '--seed', '1'], check=True, capture_output=True)
  assert os.path.isfile(os.path.join(out, 'train/JPEGImages/train_00002/00003.jpg'))
  assert os.path.isfile(os.path.join(out, 'valid/JPEGImages/valid_00001/00000.jpg'))
  for split, n in (('train', 3), ('valid', 2)):
    ds = ytvis.load_split('synthetic', out, split)
    assert len(ds.videos) == n and ds.has_annotations
    assert all(len(v.frame_paths) == 4 for v in ds.videos)
    image, masks, labels = ytvis.FolderSource(ds).load(n - 1, 3)
    assert image.shape == (48, 80, 3) and masks.shape[1:] == (48, 80)
    assert labels.shape == (masks.shape[0],)


def _runs_of_hidden(present):
  """Lengths of the runs of absent frames that have present frames before and after."""
  idx = np.flatnonzero(present)
  return [int(b - a - 1) for a, b in zip(idx[:-1], idx[1:]) if b - a > 1]


def test_occlusion_mode_hides_instances_and_crosses_lookalikes(tmp_path):
  path = synthetic.generate(str(tmp_path), 'valid', 6, 16, H, W, seed=5, occlusion=True)
  data = _read_json(path)
  assert 'occlusion' in data['info']['description']
  for vid in range(1, 7):
    anns = [a for a in data['annotations'] if a['video_id'] == vid]
    gaps = [_runs_of_hidden(np.array([s is not None for s in a['segmentations']])) for a in anns]
    # Some instance is fully hidden (null in the JSON) for >= 3 frames and seen before and after.
    assert max(max(g, default=0) for g in gaps) >= 3, (vid, gaps)
  for i in range(6):
    sim = synthetic.render_video(synthetic.video_rng(5, 'valid', i), 16, H, W, occlusion=True)
    vis, amo, cats = sim['visible'], sim['amodal'], sim['categories']
    assert not (vis & ~amo).any() and (vis.sum(0) <= 1).all()
    # The hider (1) is fully covered by the occluder (0) for 3, 5 or 7 frames in a row.
    behind = amo[1].any((1, 2)) & ~(amo[1] & ~amo[0]).any((1, 2))
    assert max(_runs_of_hidden(~behind), default=0) >= 3
    # The look-alikes (2, 3): same category, overlapping at their crossing.
    assert cats[2] == cats[3] and (amo[2] & amo[3]).any()
    if len(cats) == 5:  # the re-entering object is fully outside the frame for >= 3 frames
      assert max(_runs_of_hidden(amo[4].any((1, 2))), default=0) >= 3
  # Standard mode is unchanged by the option's existence, and occlusion needs 12 frames.
  with pytest.raises(ValueError, match='at least 12 frames'):
    synthetic.render_video(synthetic.video_rng(0, 'valid', 0), 8, H, W, occlusion=True)


def test_cli_occlusion_flag_writes_only_the_requested_split(tmp_path):
  out = str(tmp_path / 'occ')
  assert cli.main(['data', 'synthetic', '--out', out, '--videos', '0', '--valid_videos', '2',
                   '--frames', '12', '--height', '48', '--width', '80', '--occlusion']) == 0
  assert not os.path.exists(os.path.join(out, 'train.json'))
  data = _read_json(os.path.join(out, 'valid.json'))
  assert 'occlusion' in data['info']['description'] and len(data['videos']) == 2
  # Every occlusion video has at least the occluder, the hider and the two look-alikes.
  assert all(sum(a['video_id'] == v['id'] for a in data['annotations']) >= 4
             for v in data['videos'])


def test_cli_split_names_the_split_of_the_videos(tmp_path, capsys):
  out = str(tmp_path / 'split')
  assert cli.main(['data', 'synthetic', '--out', out, '--split', 'valid', '--videos', '2',
                   '--frames', '3', '--height', '48', '--width', '80']) == 0
  assert sorted(os.listdir(out)) == ['valid', 'valid.json']
  assert len(ytvis.load_split('synthetic', out, 'valid').videos) == 2
  assert 'wrote 2 videos x 3 frames' in capsys.readouterr().out
  assert cli.main(['data', 'synthetic', '--out', out, '--split', 'valid', '--videos', '2',
                   '--valid_videos', '1', '--frames', '3']) == 2
  assert capsys.readouterr().err == ('minvis-jax data: error: --split valid with --valid_videos: '
                                     'give the valid videos once\n')
