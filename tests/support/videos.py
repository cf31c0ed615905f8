"""Small generated videos for the infer and video_io tests."""

import os

import numpy as np
from PIL import Image


def moving_square_frames(n: int, h: int = 64, w: int = 96) -> list[np.ndarray]:
  """n uint8 frames [h, w, 3]: noise with a red square moving right and down."""
  rng = np.random.default_rng(3)
  frames = []
  for t in range(n):
    f = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    f[10 + 2 * t:34 + 2 * t, 8 + 5 * t:40 + 5 * t] = (220, 60, 30)
    frames.append(f)
  return frames


def write_folder(folder, frames, ext: str = 'png') -> str:
  """Writes `frames` as folder/00000.ext, ...; returns the folder."""
  os.makedirs(folder, exist_ok=True)
  for t, f in enumerate(frames):
    Image.fromarray(f).save(os.path.join(folder, f'{t:05d}.{ext}'))
  return str(folder)
