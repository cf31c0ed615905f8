"""Video inference: windows give the same tracks as one pass; results match a direct computation."""

import functools
import gc
import json
import tracemalloc

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from minvis_jax import cli
from minvis_jax import config_lib
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax import video_io
from minvis_jax.models import Mask2Former


def _setup(t=7):
  cfg = config_lib.tiny_model(num_classes=4)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(t, 64, 96, 3)).astype(np.float32)
  images[:, 56:] = 0  # valid image is 56x96 inside the padding
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(0), images[:1])
  return cfg, variables, images


def test_windows_equal_one_pass_and_shapes():
  cfg, variables, images = _setup()
  one_device = jax.devices()[:1]
  one = predictor.VideoPredictor(cfg, variables, window=7, top_k=5, devices=one_device)(
      images, (56, 96), (112, 192))
  win = predictor.VideoPredictor(cfg, variables, window=3, top_k=5, devices=one_device)(
      images, (56, 96), (112, 192))
  assert len(one) == 5
  for a, b in zip(one, win):
    assert a['category'] == b['category'] and abs(a['score'] - b['score']) < 1e-6
    assert len(a['segmentations']) == 7
    for ra, rb in zip(a['segmentations'], b['segmentations']):
      assert ra['size'] == [112, 192]
      np.testing.assert_array_equal(mask_utils.decode(ra), mask_utils.decode(rb))


@functools.lru_cache(maxsize=2)
def _reference_step(cfg_json):
  model = Mask2Former(ml_collections.ConfigDict(json.loads(cfg_json)))

  @jax.jit
  def step(variables, state, batch, valid):
    out = model.apply(variables, batch)
    state, perm = tracking.associate_chunk(state, out['pred_embds'], valid)
    logits = tracking.reorder(out['pred_logits'], perm)
    masks = tracking.reorder(out['pred_masks'], perm)
    s = jnp.sum(jnp.where(valid[:, None, None], logits, 0.0), axis=0)
    return state, s, masks.astype(jnp.float16)
  return step


@functools.lru_cache(maxsize=2)
def _reference_resize(padded_size, valid_size, out_size):
  (hp, wp), (h, w) = padded_size, valid_size

  @jax.jit
  def resize(m):
    m = jax.image.resize(m, (m.shape[0], hp, wp), 'bilinear', antialias=False)[:, :h, :w]
    return jax.image.resize(m, (m.shape[0], *out_size), 'bilinear', antialias=False) > 0
  return resize


def _reference_predict(cfg, variables, images, valid_size, out_size, window, top_k):
  """The predictor before host memory was made flat (kept as the reference): dense float16 mask
  logits of every query for every frame on the host, top-k picked and resized at the end."""
  step = _reference_step(cfg.to_json())
  state = tracking.init_state(cfg.num_queries, cfg.hidden_dim)
  logit_sum, frames = None, []
  for batch, valid in predictor._windows(images, window):
    state, s, masks = step(variables, state, jnp.asarray(batch), jnp.asarray(valid))
    logit_sum = s if logit_sum is None else logit_sum + s
    frames.extend(np.asarray(masks)[valid])
  probs = jax.nn.softmax(logit_sum / len(frames), axis=-1)[:, :-1]
  k = min(top_k, probs.size)
  scores, flat = jax.lax.top_k(probs.reshape(-1), k)
  queries = np.asarray(flat) // probs.shape[1]
  resize = _reference_resize(tuple(np.shape(images[0])[:2]), tuple(valid_size), tuple(out_size))
  segs = [[] for _ in range(k)]
  for frame in frames:
    binary = np.asarray(resize(jnp.asarray(frame[queries], jnp.float32)))
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for i, r in enumerate(rles):
      segs[i].append({'size': r['size'], 'counts': r['counts'].decode()})
  return [{'category': int(c), 'score': float(s), 'segmentations': seg}
          for c, s, seg in zip(np.asarray(flat) % probs.shape[1], np.asarray(scores), segs)]


def assert_same_tracks(a, b):
  """Same tracks (classes, order, videos), scores within 1e-6 and the same RLEs, byte for byte."""
  for key in ('category', 'category_id', 'video_id'):
    assert [t.get(key) for t in a] == [t.get(key) for t in b]
  np.testing.assert_allclose([t['score'] for t in a], [t['score'] for t in b], rtol=0, atol=1e-6)
  for i, (x, y) in enumerate(zip(a, b)):
    assert len(x['segmentations']) == len(y['segmentations'])
    for f, (r, s) in enumerate(zip(x['segmentations'], y['segmentations'])):
      if r != s:   # say how far apart they are
        flipped = np.sum(mask_utils.decode(dict(r, counts=r['counts'].encode())) !=
                         mask_utils.decode(dict(s, counts=s['counts'].encode())))
        raise AssertionError(f'track {i} frame {f}: RLEs differ ({flipped} pixels)')


def test_same_tracks_as_the_dense_logits_reference():
  """Videos of 1, 6 and 14 frames (over three windows): the results of the predictor that kept
  dense logits on the host."""
  cfg = config_lib.tiny_model(num_classes=4)
  rng = np.random.default_rng(5)
  size, valid_size, out_size = (64, 96), (56, 96), (100, 150)
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(5),
                                             np.zeros((1, *size, 3), np.float32))
  one_device = predictor.VideoPredictor(cfg, variables, window=4, top_k=6,
                                        devices=jax.devices()[:1])
  for t in (1, 6, 14):
    images = rng.normal(size=(t, *size, 3)).astype(np.float32)
    images[:, valid_size[0]:] = 0
    ours = one_device(images, valid_size, out_size)
    ref = _reference_predict(cfg, variables, images, valid_size, out_size, 4, 6)
    assert len(ours) == 6 and all(len(x['segmentations']) == t for x in ours)
    assert_same_tracks(ours, ref)
    # Non-trivial masks: some track covers part of some frame, not all or nothing everywhere.
    areas = [mask_utils.area(dict(s, counts=s['counts'].encode())) for x in ours
             for s in x['segmentations']]
    assert any(0 < a < out_size[0] * out_size[1] for a in areas)


def test_scores_and_masks_match_a_direct_computation():
  cfg, variables, images = _setup()
  tracks = predictor.VideoPredictor(cfg, variables, window=4, top_k=3,
                                    devices=jax.devices()[:1])(images, (56, 96), (56, 96))
  out = jax.tree.map(np.asarray, Mask2Former(cfg).apply(variables, images))
  e = out['pred_embds'] / np.linalg.norm(out['pred_embds'], axis=-1, keepdims=True)
  perm = [np.arange(e.shape[1])]
  prev = e[0]
  for t in range(1, len(e)):
    _, cols = linear_sum_assignment(1 - prev @ e[t].T)
    perm.append(cols)
    prev = e[t][cols]
  logits = np.stack([out['pred_logits'][t][p] for t, p in enumerate(perm)]).mean(0)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True))[:, :-1]
  best = np.argsort(-probs.reshape(-1), kind='stable')[:3]
  np.testing.assert_allclose([t['score'] for t in tracks], probs.reshape(-1)[best], rtol=1e-5)
  assert [t['category'] for t in tracks] == list(best % 4)
  # Frame 0's mask of the best track: upsample x4 (to the padded size), crop, threshold.
  q = best[0] // 4
  logits0 = out['pred_masks'][0][perm[0][q]].astype(np.float16).astype(np.float32)
  up = np.asarray(jax.image.resize(logits0, (64, 96), 'bilinear', antialias=False))[:56] > 0
  np.testing.assert_array_equal(mask_utils.decode(tracks[0]['segmentations'][0]), up)


@pytest.mark.parametrize('padded,valid,out', [
    ((384, 640), (360, 640), (720, 1280)),   # YouTube-VIS 720p: x4 then x2
    ((288, 640), (272, 640), (272, 640)),    # test size = original size
    ((384, 512), (360, 480), (480, 640)),    # non-integer scale
    ((96, 160), (90, 150), (61, 77)),        # downsampling, odd sizes
])
def test_mask_logits_equal_torch_interpolate_twice(padded, valid, out):
  """The composed per-axis products equal SPEC 1's resize, crop, resize as the original code does
  it (torch interpolate, bilinear, align_corners=False), values and thresholded masks."""
  torch = pytest.importorskip('torch')
  low = (padded[0] // 4, padded[1] // 4)
  rng = np.random.default_rng(sum(out))
  m = rng.normal(size=(3, low[0] // 6 + 2, low[1] // 6 + 2)).astype(np.float32) * 8
  m = np.asarray(jax.image.resize(m, (3, *low), 'cubic')).astype(np.float16)  # smooth, like masks
  got = np.asarray(predictor._mask_logits_t(jnp.asarray(m), padded, valid, out))
  up = torch.nn.functional.interpolate(torch.from_numpy(m.astype(np.float32))[None], size=padded,
                                       mode='bilinear', align_corners=False)
  want = torch.nn.functional.interpolate(up[:, :, :valid[0], :valid[1]], size=out,
                                         mode='bilinear', align_corners=False)[0].numpy()
  assert got.shape == (3, out[1], out[0])
  np.testing.assert_allclose(got.transpose(0, 2, 1), want, rtol=0, atol=1e-4)
  near_zero = np.abs(want) < 1e-4
  assert np.all(((got.transpose(0, 2, 1) > 0) == (want > 0)) | near_zero)


def test_full_temporary_disk_is_a_clear_error(monkeypatch):
  import errno

  class FullDisk:
    def write(self, data):
      raise OSError(errno.ENOSPC, 'No space left on device')

    def close(self):
      pass

  cfg, variables, images = _setup(t=2)
  monkeypatch.setattr(predictor.tempfile, 'TemporaryFile', FullDisk)
  with pytest.raises(OSError, match=r'frame 0 .*No space left on device.*MiB .*TMPDIR'):
    predictor.VideoPredictor(cfg, variables, window=2)(images, (56, 96), (56, 96))


def test_results_for_video_uses_dataset_category_ids():
  tracks = [{'category': 1, 'score': 0.5, 'segmentations': [None]}]
  res = predictor.results_for_video(tracks, 'v7', [10, 20, 30])
  assert res == [{'video_id': 'v7', 'category_id': 20, 'score': 0.5, 'segmentations': [None]}]


def test_2000_frames_with_flat_device_and_host_memory(monkeypatch):
  cfg = config_lib.tiny_model(num_classes=4)
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(0),
                                             np.zeros((1, 64, 64, 3), np.float32))
  live, host = [], []
  windows = predictor._windows

  def recording(images, window):
    for item in windows(images, window):
      live.append(sum(x.nbytes for x in jax.live_arrays()))
      # Live memory, not the cyclic collector's timing (a window's input can wait for it).
      gc.collect()
      host.append(tracemalloc.get_traced_memory()[0])
      yield item

  monkeypatch.setattr(predictor, '_windows', recording)
  frames = (np.full((64, 64, 3), np.sin(t / 50.0), np.float32) for t in range(2000))
  tracemalloc.start()
  try:
    tracks = predictor.VideoPredictor(cfg, variables, window=100, top_k=2,
                                      devices=jax.devices()[:1])(frames, (64, 64), (64, 64))
  finally:
    tracemalloc.stop()
  assert len(tracks) == 2 and all(len(t['segmentations']) == 2000 for t in tracks)
  assert len(live) == 20
  # Device memory after the first windows stays the same however many frames have passed.
  assert max(live[2:]) - min(live[2:]) == 0, live
  # Host memory over the last 1,300+ frames grows by the RLE offsets only (< 0.6 KB a frame; the
  # minima skip transient buffers); the dense float16 logits the predictor used to keep were
  # 20 queries x 16 x 16 x 2 B = 10 KB a frame.
  assert min(host[-5:]) - min(host[2:7]) < 1300 * 600, host


# ------------------------------------------------------------------------------------------------
# `minvis-jax infer` / `evaluate` with a random tiny model saved as a checkpoint.

import os  # noqa: E402

from PIL import Image  # noqa: E402

from minvis_jax import checkpoints  # noqa: E402
from minvis_jax import visualize  # noqa: E402
from minvis_jax.data import transforms  # noqa: E402
from minvis_jax.ytvis_eval import evaluate  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _random_variables(model_config, seed=0):
  """Random variables of the model's structure without running its (slow, eager) init: kernels
  ~ N(0, 1/fan_in), norms at identity, frozen BatchNorm statistics mean 0 / variance 1."""
  shapes = jax.eval_shape(Mask2Former(model_config).init, jax.random.PRNGKey(0),
                          np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  """(directory, config, variables): random tiny model (configs/tiny.py) with its config.json."""
  config = config_lib.load_config(os.path.join(CONFIGS, 'tiny.py'))
  assert config.inference.window == 'auto'  # a frame per device on CPU: fast CPU tests
  variables = _random_variables(config.model, seed=1)
  path = str(tmp_path_factory.mktemp('ckpt') / 'model')
  checkpoints.save_variables(path, variables)
  checkpoints.save_config(path, config)
  return path, config, variables


def _moving_square_frames(n, h=64, w=96):
  rng = np.random.default_rng(3)
  frames = []
  for t in range(n):
    f = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    f[10 + 2 * t:34 + 2 * t, 8 + 5 * t:40 + 5 * t] = (220, 60, 30)
    frames.append(f)
  return frames


def _write_folder(folder, frames, ext='png'):
  os.makedirs(folder, exist_ok=True)
  for t, f in enumerate(frames):
    Image.fromarray(f).save(os.path.join(folder, f'{t:05d}.{ext}'))
  return str(folder)


def _check_results(path, num_frames, size, top_k, num_classes=4):
  results = json.load(open(path))
  assert len(results) == top_k
  assert [r['score'] for r in results] == sorted((r['score'] for r in results), reverse=True)
  for r in results:
    assert r['video_id'] == 1 and 1 <= r['category_id'] <= num_classes and 0 < r['score'] <= 1
    assert len(r['segmentations']) == num_frames
    for seg in r['segmentations']:
      assert seg['size'] == list(size) and isinstance(seg['counts'], str)
      assert mask_utils.decode(dict(seg, counts=seg['counts'].encode())).shape == size
  return results


def _frame_count(path):
  if path.endswith('.gif'):
    with Image.open(path) as im:
      return im.n_frames, im.size[::-1]
  import imageio.v2 as imageio
  with imageio.get_reader(path) as reader:
    frames = [f for f in reader]
  return len(frames), frames[0].shape[:2]


def test_infer_on_frame_folder(tiny_checkpoint, tmp_path, capsys):
  ckpt, config, variables = tiny_checkpoint
  frames = _moving_square_frames(5)
  folder = _write_folder(tmp_path / 'frames', frames)
  out = tmp_path / 'out'
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', folder,
                               '--out', str(out), '--top_k', '3', '--score_threshold', '0']) == 0
  results = _check_results(out / 'results.json', 5, (64, 96), 3)
  # The same tracks as the predictor run directly on the test-time input (SPEC 1 geometry), at
  # infer's per-device batch ('auto': one frame a device on CPU): XLA:CPU's GroupNorm reductions
  # round differently for another batch size (~1e-6), which can flip a pixel at the threshold.
  inputs = [transforms.test_frame(f, 128, 224, config.data.mean, config.data.std)[0]
            for f in frames]
  assert inputs[0].shape == (128, 192, 3)
  direct = predictor.VideoPredictor(config.model, variables, 1, 3, jax.devices()[:1])(
      inputs, (128, 192), (64, 96))
  assert_same_tracks(results, predictor.results_for_video(direct, 1, [1, 2, 3, 4]))
  # A results file the evaluator accepts for a 5-frame 64x96 video.
  gt = dict(videos=[dict(id=1, height=64, width=96, length=5)],
            categories=[dict(id=c, name=f'c{c}') for c in range(1, 5)],
            annotations=[dict(id=1, video_id=1, category_id=results[0]['category_id'], iscrowd=0,
                              segmentations=results[0]['segmentations'], areas=None)])
  (tmp_path / 'gt.json').write_text(json.dumps(gt))
  metrics = evaluate(str(tmp_path / 'gt.json'), str(out / 'results.json'))
  top = [dict(s, counts=s['counts'].encode()) for s in results[0]['segmentations']]
  if any(mask_utils.area(top)):
    assert metrics['AP'] == pytest.approx(1.0)  # the top track is its own ground truth
  overlay = [f for f in os.listdir(out) if f.startswith('overlay.')]
  assert overlay == ['overlay.mp4' if visualize.mp4_available() else 'overlay.gif']
  assert _frame_count(str(out / overlay[0])) == (5, (64, 96))
  assert 'wrote' in capsys.readouterr().out


@pytest.mark.skipif(not visualize.mp4_available(), reason='imageio-ffmpeg not installed')
def test_infer_on_mp4(tiny_checkpoint, tmp_path):
  ckpt, _, _ = tiny_checkpoint
  video = visualize.write_video(str(tmp_path / 'in.mp4'), _moving_square_frames(4), fps=5)
  frames = list(video_io.read_video(video))
  assert len(frames) == 4 and frames[0].shape == (64, 96, 3) and frames[0].dtype == np.uint8
  # Lossy, but close to what was written.
  assert np.abs(frames[2].astype(int) - _moving_square_frames(4)[2]).mean() < 12
  out = tmp_path / 'out'
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', video,
                               '--out', str(out), '--top_k', '2']) == 0
  _check_results(out / 'results.json', 4, (64, 96), 2)
  assert _frame_count(str(out / 'overlay.mp4')) == (4, (64, 96))


def test_read_video_folder_order_and_bad_inputs(tiny_checkpoint, tmp_path):
  frames = _moving_square_frames(3)
  folder = _write_folder(tmp_path / 'f', frames)
  (tmp_path / 'f' / 'notes.txt').write_text('ignored')
  read = list(video_io.read_video(folder))
  assert len(read) == 3
  for a, b in zip(read, frames):
    np.testing.assert_array_equal(a, b)  # png: lossless, sorted by name
  with pytest.raises(FileNotFoundError, match='missing.mp4: no such video'):
    video_io.read_video(str(tmp_path / 'missing.mp4'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='empty: no .jpg'):
    video_io.read_video(str(tmp_path / 'empty'))
  (tmp_path / 'bad.mp4').write_text('this is not a video')
  with pytest.raises(ValueError, match='bad.mp4'):
    list(video_io.read_video(str(tmp_path / 'bad.mp4')))
  (tmp_path / 'f' / '00001.png').write_bytes(b'corrupt')
  with pytest.raises(ValueError, match='00001.png: corrupt or unreadable'):
    list(video_io.read_video(folder))
  ckpt, _, _ = tiny_checkpoint
  sizes = _write_folder(tmp_path / 'sizes', [frames[0], frames[1][:60]])
  with pytest.raises(ValueError, match='sizes: frame 1 is 60x96, the video is 64x96'):
    cli.main(['infer', '--debug', '--checkpoint', ckpt, '--video', sizes,
                          '--out', str(tmp_path / 'o')])
  bare = str(tmp_path / 'bare')
  checkpoints.save_variables(bare, {'params': {'w': np.zeros(2)}})
  with pytest.raises(ValueError, match='bare: the checkpoint has no config.json; pass --config'):
    cli.main(['infer', '--debug', '--checkpoint', bare, '--video', folder, '--out', bare])
  with pytest.raises(FileNotFoundError, match='nockpt: no such checkpoint'):
    cli.main(['infer', '--debug', '--checkpoint', str(tmp_path / 'nockpt'), '--video', folder,
                          '--out', bare])


def test_evaluate_on_generated_videos(tiny_checkpoint, tmp_path, capsys):
  synthetic = pytest.importorskip('minvis_jax.data.synthetic')
  ckpt, _, _ = tiny_checkpoint
  data = tmp_path / 'data'
  synthetic.generate(str(data), 'valid', num_videos=2, num_frames=3, height=64, width=96, seed=0)
  out = tmp_path / 'eval'
  assert cli.main(['evaluate',
                                  '--config', os.path.join(CONFIGS, 'tiny.py'),
                                  '--checkpoint', ckpt, '--manual_dir', str(data),
                                  '--out', str(out), '--top_k', '5', '--window', '1']) == 0
  gt = json.load(open(data / 'valid.json'))
  results = json.load(open(out / 'results.json'))
  assert sorted({r['video_id'] for r in results}) == sorted(v['id'] for v in gt['videos'])
  assert len(results) == 2 * 5
  for r in results:
    assert len(r['segmentations']) == 3 and r['segmentations'][0]['size'] == [64, 96]
  metrics = json.load(open(out / 'metrics.json'))
  assert set(metrics) >= {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10'}
  assert metrics == evaluate(str(data / 'valid.json'), str(out / 'results.json'))
  printed = capsys.readouterr().out
  assert 'AP50' in printed and 'results.json' in printed
  # Default output: the checkpoint directory's config and location; only the first video.
  assert cli.main(['evaluate', '--checkpoint', ckpt, '--manual_dir', str(data),
                                  '--max_videos', '1', '--out', str(tmp_path / 'one')]) == 0
  one = json.load(open(tmp_path / 'one' / 'results.json'))
  assert {r['video_id'] for r in one} == {gt['videos'][0]['id']} and len(one) == 10
  assert set(json.load(open(tmp_path / 'one' / 'metrics.json'))) >= {'AP', 'AR10'}
