"""Bad input to the trainer never hangs and never passes silently: input thread errors, SIGTERM
while waiting for input, corrupt or truncated checkpoints, unreadable files given to `convert`."""

import concurrent.futures
import os
import signal
import threading
import time

import numpy as np
import pytest

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import train
from minvis_jax.data import input_pipeline
from test_train import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeSource:
  """Two-frame videos of one square instance; `load` calls `hook(video, frame)` first."""

  def __init__(self, hook=None, num_videos=4):
    self.num_videos = num_videos
    self.hook = hook

  def num_frames(self, video):
    del video
    return 2

  def load(self, video, frame):
    if self.hook:
      self.hook(video, frame)
    image = np.full((64, 96, 3), 10 * video + frame, np.uint8)
    masks = np.zeros((1, 64, 96), np.uint8)
    masks[0, 8:40, 8:40] = 1
    return image, masks, np.array([video % 4])


def _first_loads_raise(after):
  """A hook that lets `after` loads through, then raises a reader-style error."""
  count = [0]
  lock = threading.Lock()

  def hook(video, frame):
    with lock:
      count[0] += 1
      if count[0] > after:
        raise ValueError(f'videos.json: video {video} frame {frame}: field "segmentations" broken')
  return hook


# --- 1. The input thread: errors reach the loop, no hang, SIGTERM while waiting. -----------------


@pytest.mark.timeout(60)
def test_zero_workers_is_an_error_not_a_hang():
  c = small_config()
  train_input = input_pipeline.TrainInput(c, FakeSource())
  with pytest.raises(ValueError, match=r'data\.workers must be an integer >= 1, got 0'):
    next(input_pipeline.iterate(train_input, 0, workers=0))
  # And at config time, naming the key.
  c.data.workers = 0
  with pytest.raises(ValueError, match=r'data\.workers.*0'):
    config_lib.validate(c)
  c = small_config()
  with pytest.raises(ValueError, match=r'data\.workers'):
    config_lib.apply_overrides(c, ['data.workers=0'])


@pytest.mark.timeout(60)
def test_any_producer_error_reaches_the_consumer(monkeypatch):
  c = small_config()
  # A reader error after the first batch: one good batch, then the reader's own message.
  train_input = input_pipeline.TrainInput(c, FakeSource(_first_loads_raise(c.batch_size)))
  batches = input_pipeline.iterate(train_input, 0, workers=2)
  assert next(batches)['image'].shape == (8, 64, 96, 3)
  with pytest.raises(ValueError, match='videos.json: video .* field "segmentations"'):
    next(batches)
  # The pool itself fails to start (what `workers=0` did before it was rejected): no hang either.
  def broken_pool(*args, **kwargs):
    raise RuntimeError('no threads left')
  monkeypatch.setattr(concurrent.futures, 'ThreadPoolExecutor', broken_pool)
  with pytest.raises(RuntimeError, match='no threads left'):
    next(input_pipeline.iterate(train_input, 0, workers=2))


@pytest.mark.timeout(120)
def test_input_error_ends_the_training_run(tmp_path):
  c = small_config()
  source = FakeSource(_first_loads_raise(0))

  def input_fn(start):
    return input_pipeline.iterate(input_pipeline.TrainInput(c, source), start, workers=2)
  with pytest.raises(ValueError, match='videos.json: video') as info:
    train.train(c, str(tmp_path), input_fn=input_fn, total_steps=3)
  assert 'input batch of step 1' in ''.join(getattr(info.value, '__notes__', []))


@pytest.mark.timeout(300)
def test_sigterm_while_waiting_for_input_saves_and_exits(tmp_path):
  c = small_config()
  c.checkpoint.every_steps = 1000
  release = threading.Event()
  loads = [0]
  lock = threading.Lock()

  def hook(video, frame):
    del video, frame
    with lock:
      loads[0] += 1
      stuck = loads[0] > 2 * c.batch_size
    # From the third batch on the reader never returns (a dead NFS mount); on old code the test
    # fails after 60 s instead of hanging.
    if stuck and not release.wait(60):
      raise TimeoutError('SIGTERM did not interrupt the wait for input')

  train_input = input_pipeline.TrainInput(c, FakeSource(hook))

  def input_fn(start):
    inner = input_pipeline.iterate(train_input, start, workers=2, prefetch=1)
    for i, batch in enumerate(inner):
      yield batch
      if i == 1:   # the loop asks for the third batch: it blocks, and SIGTERM comes meanwhile
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()

  handler = signal.getsignal(signal.SIGTERM)
  try:
    start = time.perf_counter()
    state = train.train(c, str(tmp_path), input_fn=input_fn, total_steps=1000)
    elapsed = time.perf_counter() - start
  finally:
    release.set()
  assert int(state.step) == 2
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert saved == [2]
  assert elapsed < 200
  assert signal.getsignal(signal.SIGTERM) is handler
  _, variables = checkpoints.load_for_inference(str(tmp_path))
  np.testing.assert_array_equal(variables['params']['decoder']['query_feat'],
                                np.asarray(state.params['decoder']['query_feat']))
