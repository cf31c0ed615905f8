"""video_io: frame folders in name order; missing, empty, corrupt and unequal inputs fail naming the
file (also through `minvis-jax infer`)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from support import videos
from minvis_jax import checkpoints
from minvis_jax import cli
from minvis_jax import video_io
from minvis_jax import visualize


def test_read_video_folder_order_and_bad_inputs(tiny_checkpoint, tmp_path):
  frames = videos.moving_square_frames(3)
  folder = videos.write_folder(tmp_path / 'f', frames)
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
  sizes = videos.write_folder(tmp_path / 'sizes', [frames[0], frames[1][:60]])
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


def _png_bytes(frame) -> bytes:
  out = io.BytesIO()
  Image.fromarray(frame).save(out, format='PNG')
  return out.getvalue()


class _Trickle:
  """A pipe that hands out at most `step` bytes a read, as a pipe may."""

  def __init__(self, data: bytes, step: int = 7):
    self.data, self.pos, self.step = data, 0, step

  def read(self, n):
    out = self.data[self.pos:self.pos + min(n, self.step)]
    self.pos += len(out)
    return out


def test_png_stream_frames_and_cuts():
  frames = videos.moving_square_frames(3) + [np.zeros((20, 30, 3), np.uint8)]
  data = b''.join(_png_bytes(f) for f in frames)
  read = list(video_io.read_png_stream(_Trickle(data), 'pipe'))
  assert len(read) == 4
  for a, b in zip(read, frames):
    np.testing.assert_array_equal(a, b)   # lossless, and each frame keeps its own size
  assert list(video_io.read_png_stream(_Trickle(b''), 'pipe')) == []
  first = len(_png_bytes(frames[0]))
  # Cut inside a chunk, inside a chunk header, inside the signature, right after the signature.
  for cut in (first + 100, first + 8 + 10, first + 3, first + 8):
    stream = video_io.read_png_stream(_Trickle(data[:cut]), 'pipe')
    assert next(stream).shape == (64, 96, 3)     # frame 0 arrives whole
    with pytest.raises(ValueError, match=r'^pipe: frame 1: the stream (stopped mid-frame|stopped '
                       r'inside its start)'):
      next(stream)
  with pytest.raises(ValueError, match=r'^pipe: frame 0: the stream is not a PNG at its start'):
    next(video_io.read_png_stream(_Trickle(b'\xff\xd8\xff\xe0 a JPEG'), 'pipe'))
  # A PNG whose chunks are all there but whose data is damaged.
  bad = bytearray(_png_bytes(frames[0]))
  bad[60:80] = b'\0' * 20
  with pytest.raises(ValueError, match=r'^pipe: frame 0: unreadable PNG'):
    next(video_io.read_png_stream(_Trickle(bytes(bad)), 'pipe'))


@pytest.mark.skipif(not visualize.mp4_available(), reason='imageio-ffmpeg not installed')
def test_a_url_goes_to_ffmpeg_and_fails_naming_it():
  with pytest.raises(ValueError, match=r'^http://127.0.0.1:9/clip.mp4: not a readable video'):
    video_io.open_video('http://127.0.0.1:9/clip.mp4')
