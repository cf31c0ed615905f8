"""data/input_pipeline.py on an unannotated split: an error when the training source is built (not
when the split is read for evaluation)."""

import json
import os

import pytest

from minvis_jax import config_lib
from minvis_jax.data import input_pipeline, synthetic, ytvis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(manual_dir: str):
  c = config_lib.load_config(os.path.join(REPO, 'configs', 'tiny.py'))
  c.data.manual_dir = manual_dir
  c.batch_size = 2
  return c


def test_training_on_an_unannotated_split(tmp_path):
  synthetic.generate(str(tmp_path), 'train', num_videos=2, num_frames=2, height=32, width=32,
                     seed=0)
  json_path = ytvis.split_paths('synthetic', str(tmp_path), 'train')[0]
  with open(json_path) as f:
    data = json.load(f)
  c = _config(str(tmp_path))
  input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c), input_pipeline.make_source(c.data, 'train'))  # annotated: fine
  data['annotations'] = []
  with open(json_path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=f'{json_path}: no instance to train on'):
    input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c), input_pipeline.make_source(c.data, 'train'))
  del data['annotations']  # e.g. YouTube-VIS valid.json given as training data
  with open(json_path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=f'{json_path}: has no "annotations", so it cannot be '
                                       'trained on'):
    input_pipeline.train_iterator(c, 0)
  # Reading it for evaluation stays fine: its results go to the evaluation server.
  assert not ytvis.load_split('synthetic', str(tmp_path), 'train').has_annotations
