"""Reading a user's video: a frame folder, an mp4 (or anything ffmpeg reads) or a GIF."""

import os
from typing import Iterable, Iterator

import numpy as np

from minvis_jax import visualize
from minvis_jax.data import ytvis


FRAME_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def open_video(path: str) -> tuple[int | None, Iterator[np.ndarray]]:
  """(number of frames or None when unknown, iterator of uint8 [H, W, 3]); checks up front."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f'{path}: no {"/".join(FRAME_EXTENSIONS)} frames in this folder')
    return len(files), (ytvis.read_frame(os.path.join(path, f)) for f in files)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such video file or frame folder')
  if path.lower().endswith('.gif'):
    from PIL import Image, ImageSequence  # noqa: PLC0415
    try:
      with Image.open(path) as im:
        frames = [np.asarray(f.convert('RGB')) for f in ImageSequence.Iterator(im)]
    except (OSError, ValueError) as e:
      raise ValueError(f'{path}: unreadable GIF ({e})') from None
    return len(frames), iter(frames)
  if not visualize.mp4_available():
    raise ValueError(f'{path}: reading video files needs the imageio-ffmpeg package '
                     f'(pip install imageio-ffmpeg); or pass a folder of jpg/png frames')
  import imageio.v2 as imageio  # noqa: PLC0415
  try:
    reader = imageio.get_reader(path, format='ffmpeg')
    count = reader.get_meta_data().get('nframes')
  except Exception as e:  # imageio/ffmpeg raise assorted errors on bad files
    raise ValueError(f'{path}: not a readable video ({type(e).__name__}: {e})') from None

  def frames():
    try:
      for i, frame in enumerate(reader):
        if frame.ndim != 3 or frame.shape[2] != 3:
          raise ValueError(f'{path}: frame {i} has shape {frame.shape}, expected [H, W, 3]')
        yield np.asarray(frame, np.uint8)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'{path}: video decoding failed ({e})') from None
    finally:
      reader.close()
  known = isinstance(count, (int, float)) and np.isfinite(count) and count > 0
  return (int(count) if known else None), frames()


def read_video(path: str) -> Iterator[np.ndarray]:
  """The frames of a video: uint8 [H, W, 3] RGB, read lazily.

  `path` is a folder of frames (its .jpg/.jpeg/.png files in sorted name order), an mp4 (or another
  format ffmpeg reads; needs imageio-ffmpeg) or a GIF. A missing or unreadable input raises
  FileNotFoundError / ValueError naming the path, before any frame is read where possible.
  """
  return open_video(path)[1]


def same_size(frames: Iterable[np.ndarray], size: tuple[int, int], where: str):
  for t, frame in enumerate(frames):
    if frame.shape[:2] != tuple(size):
      raise ValueError(f'{where}: frame {t} is {frame.shape[0]}x{frame.shape[1]}, the video is '
                       f'{size[0]}x{size[1]}')
    yield frame


