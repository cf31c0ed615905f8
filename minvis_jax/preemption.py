"""Preemption of the training loop: SIGTERM saves and exits between two steps, or while the loop
waits for its input."""

import contextlib
import signal
from typing import Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np


class InputInterrupted(Exception):
  """SIGTERM arrived while the loop was blocked waiting for a batch."""


class Preemption:
  """Records SIGTERM so the loop can save and exit cleanly between two steps.

  A loop blocked on its input (a slow or stuck reader) never reaches the check between steps, so
  while it waits (`interruptible_wait`) the handler raises instead of only recording the request.
  Only with one process: with several, one that left on its own would leave the others blocked in
  the next collective, so they all stop together between steps (`agreed`).
  """

  def __init__(self):
    self.requested = False
    self._waiting = False
    self._interruptible = jax.process_count() == 1
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if self._waiting:
      self._waiting = False
      raise InputInterrupted()

  @contextlib.contextmanager
  def interruptible_wait(self):
    if not self._interruptible:
      yield
      return
    if self.requested:
      raise InputInterrupted()
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def agreed(self) -> bool:
    """True on every process once any process got SIGTERM."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


INTERRUPTED = object()


def next_input(batches: Iterator[dict], preemption: Preemption, step: int):
  """The next local batch; INTERRUPTED on SIGTERM while waiting; an input error gets a note."""
  try:
    with preemption.interruptible_wait():
      return next(batches)
  except InputInterrupted:
    return INTERRUPTED
  except Exception as e:
    e.add_note(f'(while reading the input batch of step {step + 1})')
    raise
