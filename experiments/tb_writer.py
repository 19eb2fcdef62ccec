"""Scalar TensorBoard logging when a writer is installed, and nothing otherwise.

The runners log through :func:`open_writer`, which returns a :class:`ScalarWriter`
if the ``tensorboard`` package is importable (its event-file writer and protobufs
need no TensorFlow), else ``None`` — TensorBoard is an optional extra, never a
reason for a run to fail.
"""

from __future__ import annotations

import os
import time
from typing import Mapping


class ScalarWriter:
  """Writes ``tag → float`` scalars at a step into ``logdir`` (one events file)."""

  def __init__(self, logdir: str | os.PathLike):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventFileWriter(os.fspath(logdir))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = self._summary(value=[
        self._summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
    self._writer.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def available() -> bool:
  try:
    import tensorboard.summary.writer.event_file_writer  # noqa: F401
  except ImportError:
    return False
  return True


def open_writer(logdir: str | os.PathLike, enabled: bool | None = None) -> ScalarWriter | None:
  """A writer into ``logdir``; ``None`` if disabled, or if ``enabled`` is ``None`` (auto)
  and tensorboard is not installed.

  Raises:
    ValueError: ``enabled=True`` but tensorboard is not installed.
  """
  if enabled is False:
    return None
  if not available():
    if enabled:
      raise ValueError("--tensorboard: the tensorboard package is not installed "
                       "(pip install tensorboard), or run without --tensorboard")
    return None
  return ScalarWriter(logdir)
