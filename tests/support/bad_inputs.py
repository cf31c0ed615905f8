"""Bad input for the trainer's tests: a frame source whose reads fail or hang, and corruptible
checkpoint files."""

import os
import threading

import numpy as np


class FakeSource:
  """Two-frame videos of one square instance; `load` calls `hook(video, frame)` first."""
  origin = 'fake source'
  has_annotations = True
  num_instances = None

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


def first_loads_raise(after):
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


def variables(seed=0):
  rng = np.random.default_rng(seed)
  # Random float32 does not compress: zstd stores it raw, so flipped bytes decode without an error.
  return {'params': {'w': rng.normal(size=(64, 256)).astype(np.float32),
                     'b': {'bias': rng.normal(size=(7,)).astype(np.float32)}},
          'frozen': {'mean': np.arange(5, dtype=np.float32)}}


def largest_array_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names
           if os.path.basename(root) == 'd']
  return max(files, key=os.path.getsize)


def flip_bytes(path):
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0x5A
  open(path, 'wb').write(bytes(data))   # same size
