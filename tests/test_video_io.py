"""video_io: frame folders in name order; missing, empty, corrupt and unequal inputs fail naming the
file (also through `minvis-jax infer`)."""

import os

import numpy as np
import pytest

from support import videos
from minvis_jax import checkpoints
from minvis_jax import cli
from minvis_jax import video_io


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
