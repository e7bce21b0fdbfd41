"""Scalar metrics to `metrics.jsonl` (always) and TensorBoard (if installed).

Only process 0 writes; the others' writers do nothing.
"""

import json
import os
from typing import Mapping

from absl import logging
import jax


class MetricWriter:
  """Appends one JSON object per (step, group of scalars) to metrics.jsonl."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      logging.info("tensorboardX not installed: metrics go to metrics.jsonl "
                   "only")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
