"""Reading a user's video: a frame folder, an mp4 (or anything ffmpeg reads, URLs included), a GIF,
or a stream of PNG frames on stdin."""

import contextlib
import dataclasses
import io
import itertools
import os
import sys
from typing import BinaryIO, Iterable, Iterator

import numpy as np
from PIL import Image
from PIL import ImageSequence

from minvis_jax import visualize
from minvis_jax.data import ytvis


FRAME_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


@dataclasses.dataclass
class VideoInput:
  frames: Iterator[np.ndarray]   # uint8 [H, W, 3] RGB, read lazily
  num_frames: int | None         # for ffmpeg input from its duration x fps; None when unknown
  fps: float | None              # None for a frame folder or when the container does not say
  skipped: tuple[str, ...] = ()  # entries of a frame folder that are not frames (not read)
  decoded: int | None = None     # frames the decoder gave, once the frames are exhausted

  @property
  def ended_early(self) -> bool:
    """ffmpeg input that decoded fewer frames than its container declares (a cut file); one
    frame of slack for the rounding of duration x fps."""
    return (self.decoded is not None and self.num_frames is not None
            and self.decoded < self.num_frames - 1)


@contextlib.contextmanager
def ffmpeg_without_preexec():
  """Starts imageio-ffmpeg's subprocesses without a Python `preexec_fn` while active.

  imageio-ffmpeg puts ffmpeg in its own process group with `preexec_fn=os.setpgrp`; a preexec_fn
  makes subprocess run the at-fork hooks, and JAX's warns that os.fork() in a multithreaded process
  may deadlock (it may: the child runs Python). Without it ffmpeg is spawned without running Python
  in the child; the only change is that Ctrl-C also reaches ffmpeg, which is what we want anyway.
  """
  key = 'IMAGEIO_FFMPEG_NO_PREVENT_SIGINT'
  old = os.environ.get(key)
  os.environ[key] = '1'
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = old


def _ffmpeg_error(path: str, error: Exception) -> ValueError:
  """ffmpeg's last stderr line (not its banner and build configuration) as a ValueError."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[-1] if lines else type(error).__name__
  return ValueError(f'{path}: not a readable video (ffmpeg: {reason})')


def _open_ffmpeg(path: str) -> VideoInput:
  import imageio_ffmpeg  # noqa: PLC0415
  gen = imageio_ffmpeg.read_frames(path, pix_fmt='rgb24', input_params=['-hide_banner'])
  try:
    with ffmpeg_without_preexec():
      meta = next(gen)
  except (OSError, RuntimeError, StopIteration) as e:
    gen.close()
    raise _ffmpeg_error(path, e) from None
  width, height = meta['size']
  fps = float(meta.get('fps') or 0) or None
  # The container's duration x frame rate: a total for the progress bar (the bar is corrected at
  # the end), not a count anything depends on.
  duration = float(meta.get('duration') or 0)
  count = round(duration * fps) if fps and duration > 0 else None
  video = VideoInput(iter(()), count, fps)

  def frames():
    i = 0
    try:
      for data in gen:
        if len(data) != height * width * 3:
          raise ValueError(f'{path}: frame {i} has {len(data)} bytes, expected {height}x{width}x3')
        yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
        i += 1
      video.decoded = i
    except (OSError, RuntimeError) as e:
      raise _ffmpeg_error(path, e) from None
    finally:
      gen.close()
  video.frames = frames()
  return video


PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
  data = b''
  while len(data) < n:
    part = stream.read(n - len(data))
    if not part:
      break
    data += part
  return data


def read_png_stream(stream: BinaryIO, where: str = 'stdin') -> Iterator[np.ndarray]:
  """uint8 [H, W, 3] RGB frames of concatenated PNG files (ffmpeg's `-f image2pipe -c:v png -`),
  each decoded as soon as its last chunk has arrived. A stream that stops inside a frame, or bytes
  that are not a PNG, raise ValueError naming `where` and the frame."""
  for index in itertools.count():
    head = _read_exactly(stream, len(PNG_SIGNATURE))
    if not head:
      return
    if head != PNG_SIGNATURE[:len(head)] or len(head) < len(PNG_SIGNATURE):
      what = 'stopped inside' if head == PNG_SIGNATURE[:len(head)] else 'is not a PNG at'
      raise ValueError(f'{where}: frame {index}: the stream {what} its start ({head[:8]!r}); '
                       'pipe PNG frames, e.g. ffmpeg -i INPUT -f image2pipe -c:v png -')
    data, chunk_type = [head], b''
    while chunk_type != b'IEND':    # chunks: length (4 bytes, big endian), type, data, CRC
      header = _read_exactly(stream, 8)
      length = int.from_bytes(header[:4], 'big') if len(header) == 8 else 0
      body = _read_exactly(stream, length + 4) if len(header) == 8 else b''
      data += [header, body]
      if len(header) < 8 or len(body) < length + 4:
        raise ValueError(f'{where}: frame {index}: the stream stopped mid-frame (after '
                         f'{sum(map(len, data))} bytes of its PNG)')
      chunk_type = header[4:]
    try:
      with Image.open(io.BytesIO(b''.join(data))) as image:
        yield np.asarray(image.convert('RGB'))
    except (OSError, ValueError, SyntaxError) as e:   # Pillow: SyntaxError for a broken PNG
      raise ValueError(f'{where}: frame {index}: unreadable PNG ({e})') from None


def open_video(path: str) -> VideoInput:
  """The frames of a video with their count and frame rate where known; checks the input up front.

  `path` is a folder of frames (its .jpg/.jpeg/.png files in sorted name order), an mp4 (or another
  format ffmpeg reads; needs imageio-ffmpeg; the count is the container's duration x fps, for a
  progress bar) or a GIF; a URL ffmpeg opens (rtsp://, http://, ...); '-': PNG frames on stdin
  (`read_png_stream`). A missing or unreadable input raises FileNotFoundError / ValueError naming
  it.
  """
  if path == '-':
    return VideoInput(read_png_stream(sys.stdin.buffer, 'stdin'), None, None)
  if '://' in path:    # a stream or URL: only ffmpeg can say whether it opens
    if not visualize.mp4_available():
      raise ValueError(f'{path}: reading a URL needs the imageio-ffmpeg package')
    return _open_ffmpeg(path)
  if os.path.isdir(path):
    files, skipped = frame_files(sorted(os.listdir(path)))
    if not files:
      raise FileNotFoundError(f'{path}: no {"/".join(FRAME_EXTENSIONS)} frames in this folder'
                              + (f' (found {_named(skipped)})' if skipped else ''))
    return VideoInput((ytvis.read_frame(os.path.join(path, f)) for f in files), len(files), None,
                      tuple(skipped))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such video file or frame folder')
  if path.lower().endswith('.gif'):
    try:
      with Image.open(path) as im:
        duration = im.info.get('duration') or 0   # ms per frame (of the first; the rest may vary)
        frames = [np.asarray(f.convert('RGB')) for f in ImageSequence.Iterator(im)]
    except (OSError, ValueError) as e:
      raise ValueError(f'{path}: unreadable GIF ({e})') from None
    return VideoInput(iter(frames), len(frames), 1000.0 / duration if duration else None)
  if not visualize.mp4_available():
    raise ValueError(f'{path}: reading video files needs the imageio-ffmpeg package '
                     f'(pip install imageio-ffmpeg); or pass a folder of jpg/png frames')
  return _open_ffmpeg(path)


def frame_files(names: list[str]) -> tuple[list[str], list[str]]:
  """(frames, skipped): the entries of a frame folder read as frames (by extension) and the
  others, in the order given."""
  frames = [n for n in names if n.lower().endswith(FRAME_EXTENSIONS)]
  return frames, [n for n in names if not n.lower().endswith(FRAME_EXTENSIONS)]


def _named(names, limit: int = 5) -> str:
  shown = ', '.join(names[:limit]) + (f', ... ({len(names) - limit} more)' * (len(names) > limit))
  return f'{len(names)} other file{"s" * (len(names) != 1)}: {shown}'


def skipped_text(video: VideoInput) -> str:
  """'skipped N other files: a.txt, ...' for a frame folder's non-frame entries, '' if none."""
  return f'skipped {_named(list(video.skipped))}' if video.skipped else ''


def read_video(path: str) -> Iterator[np.ndarray]:
  """The frames of a video (see `open_video`): uint8 [H, W, 3] RGB, read lazily."""
  return open_video(path).frames


def same_size(frames: Iterable[np.ndarray], size: tuple[int, int], where: str):
  for t, frame in enumerate(frames):
    if frame.shape[:2] != tuple(size):
      raise ValueError(f'{where}: frame {t} is {frame.shape[0]}x{frame.shape[1]}, the video is '
                       f'{size[0]}x{size[1]}')
    yield frame
