"""The input pipeline's threads: an error of any producer reaches the consumer, nothing hangs."""

import concurrent.futures

import pytest

from minvis_jax import config_lib
from minvis_jax.data import input_pipeline
from support import bad_inputs


@pytest.mark.timeout(60)
def test_zero_workers_is_an_error_not_a_hang(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  train_input = input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c),
                                          bad_inputs.FakeSource())
  # workers=0 reaches the thread pool only past config validation: its own error, no hang.
  with pytest.raises(ValueError, match=r'max_workers must be greater than 0'):
    next(input_pipeline.iterate(train_input, 0, workers=0))
  # And at config time, naming the key.
  c.data.workers = 0
  with pytest.raises(ValueError, match=r'data\.workers.*0'):
    config_lib.validate(c)
  c = tiny_config.copy_and_resolve_references()
  with pytest.raises(ValueError, match=r'data\.workers'):
    config_lib.apply_overrides(c, ['data.workers=0'])


@pytest.mark.timeout(60)
def test_any_producer_error_reaches_the_consumer(monkeypatch, tiny_config):
  c = tiny_config
  # A reader error after the first batch: one good batch, then the reader's own message.
  source = bad_inputs.FakeSource(bad_inputs.first_loads_raise(c.batch_size))
  train_input = input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c), source)
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
