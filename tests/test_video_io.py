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


# --- frames that are not 8-bit RGB ---------------------------------------------------------------


def _gradient(dtype=np.uint8, top=255):
  return (np.arange(64 * 96).reshape(64, 96) * top // (64 * 96 - 1)).astype(dtype)


def _frame_cases():
  gray16 = _gradient(np.uint16, 65535)
  gray = _gradient()
  palette = Image.fromarray(gray).quantize(16)
  lut = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)
  rgba = np.dstack([videos.moving_square_frames(1)[0], _gradient()])
  cmyk = np.zeros((64, 96, 4), np.uint8)
  cmyk[..., 3] = _gradient()   # black only: gray 255 - K in any CMYK conversion
  return [
      # (Pillow image, file name, the 8-bit RGB expected (independent of Pillow's conversion)).
      (Image.fromarray(gray16), 'g16.png',
       np.repeat(np.round(gray16 / 257.0).astype(np.uint8)[..., None], 3, -1)),
      (Image.fromarray(gray), 'g8.png', np.repeat(gray[..., None], 3, -1)),
      (palette, 'p.png', lut[np.asarray(palette)]),
      (Image.fromarray(rgba, 'RGBA'), 'rgba.png', rgba[..., :3]),
      (Image.fromarray(cmyk, 'CMYK'), 'cmyk.tif', np.repeat(255 - cmyk[..., 3:], 3, -1)),
      (Image.fromarray(gray), 'g.bmp', np.repeat(gray[..., None], 3, -1)),
  ]


@pytest.mark.parametrize('case', range(6))
def test_frames_that_are_not_8bit_rgb_are_converted(tmp_path, case):
  """16-bit gray (scaled, not clipped to white), gray, palette, RGBA (alpha dropped), CMYK and
  .bmp frames all reach the model as the right 8-bit RGB."""
  image, name, expected = _frame_cases()[case]
  folder = tmp_path / 'f'
  folder.mkdir()
  image.save(folder / name)
  video = video_io.open_video(str(folder))
  (frame,) = list(video.frames)
  assert frame.dtype == np.uint8 and frame.shape == (64, 96, 3)
  np.testing.assert_array_equal(frame, expected)
  assert video.skipped == ()


def test_a_frame_without_an_exact_8bit_form_is_refused_naming_file_and_format(tmp_path):
  folder = tmp_path / 'f'
  folder.mkdir()
  Image.fromarray(np.linspace(0, 1, 64 * 96, dtype=np.float32).reshape(64, 96)).save(
      folder / '00000.tif')
  with pytest.raises(ValueError, match=r'00000\.tif: a TIFF image of pixel format F, which has no '
                     r'exact 8-bit RGB form'):
    list(video_io.read_video(str(folder)))


# --- videos that end early, files the reader skips, extreme aspect ratios ------------------------


def test_files_a_frame_folder_skips_are_counted_and_named(tiny_checkpoint, tmp_path, capsys):
  folder = videos.write_folder(tmp_path / 'f', videos.moving_square_frames(2))
  videos.write_folder(tmp_path / 'f', videos.moving_square_frames(3)[2:], ext='webp')
  (tmp_path / 'f' / 'notes.txt').write_text('x')
  (tmp_path / 'f' / 'clip.mov').write_text('x')
  video = video_io.open_video(folder)
  assert video.num_frames == 3 and video.skipped == ('clip.mov', 'notes.txt')
  assert video_io.skipped_text(video) == 'skipped 2 other files: clip.mov, notes.txt'
  ckpt, _, _ = tiny_checkpoint
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', folder, '--out',
                   str(tmp_path / 'o')]) == 0
  out = capsys.readouterr().out
  assert f'{folder}: skipped 2 other files: clip.mov, notes.txt' in out
  assert f'{folder}: 3 frames of 64x96' in out
  os.makedirs(tmp_path / 'none')
  (tmp_path / 'none' / 'a.gif').write_text('x')
  with pytest.raises(FileNotFoundError, match=r'none: no .* frames in this folder \(found 1 other '
                     r'file: a\.gif\)'):
    video_io.open_video(str(tmp_path / 'none'))


@pytest.mark.skipif(not visualize.mp4_available(), reason='imageio-ffmpeg not installed')
def test_a_video_cut_short_says_where_decoding_stopped(tiny_checkpoint, tmp_path, capsys):
  import imageio.v2 as imageio
  full = str(tmp_path / 'full.mp4')
  with video_io.ffmpeg_without_preexec(), imageio.get_writer(
      full, fps=10, codec='libx264', macro_block_size=1, ffmpeg_log_level='error',
      output_params=['-movflags', '+faststart']) as w:
    for frame in videos.moving_square_frames(30):
      w.append_data(frame)
  data = open(full, 'rb').read()
  cut = tmp_path / 'cut.mp4'
  cut.write_bytes(data[:len(data) // 2])   # the header (moov first) says 30 frames
  video = video_io.open_video(full)
  assert len(list(video.frames)) == 30 and not video.ended_early
  video = video_io.open_video(str(cut))
  decoded = len(list(video.frames))
  assert video.num_frames == 30 and video.decoded == decoded < 29 and video.ended_early
  ckpt, _, _ = tiny_checkpoint
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', str(cut), '--out',
                   str(tmp_path / 'o')]) == 0
  out = capsys.readouterr().out
  assert (f'warning: {cut}: decoding stopped at frame {decoded} of the 30 its container declares'
          in out)
  assert f'{cut}: {decoded} frames of 64x96' in out


def test_an_aspect_ratio_that_resizes_a_side_to_zero_names_size_and_keys(tiny_checkpoint,
                                                                         tmp_path):
  folder = videos.write_folder(tmp_path / 'thin', [np.zeros((1, 2000, 3), np.uint8)])
  ckpt, _, _ = tiny_checkpoint
  with pytest.raises(ValueError, match=r'thin: a 1x2000 frame resizes to 0x224 with '
                     r'data.min_size_test=128 and data.max_size_test=224: its aspect ratio is too '
                     r'extreme'):
    cli.main(['infer', '--debug', '--checkpoint', ckpt, '--video', folder, '--out',
              str(tmp_path / 'o')])


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
