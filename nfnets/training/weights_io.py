"""Reading weights for init_from, evaluation and export: runs and files.

A run's orbax checkpoints (`read_params`, checksums checked first, the newest
good step of a workdir), DeepMind's released weights and timm's files
(`load_weights`), all as trees of host (numpy) arrays, whatever device
layout wrote them.
"""

import os
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets import released_weights
from nfnets import timm_weights
from nfnets.training import checkpoint


def load_weights(path: str, model: Optional[str] = None) -> dict[str, Any]:
  """The weights and model state (raw and EMA) of a run or a weights file.

  Args:
    path: a run's workdir, checkpoints folder or step folder (see
      `read_params`), or a file: DeepMind's released weights, a safe `.npz`
      (see `nfnets.released_weights`) or timm's `.safetensors` / `.pth`
      (`nfnets.timm_weights`; told apart by their content), whose params
      serve as both and which hold no model state.
    model: the registered model the weights are for; a timm file is then
      checked against it (an error names the first tensor that differs and
      the model the file is for). Without it, a timm file's tree is
      inferred from its keys.

  Returns:
    {'params', 'ema_params', 'model_state', 'ema_model_state'}: trees of
    numpy arrays (the model states, e.g. batch-norm statistics, may be
    empty).
  """
  if os.path.isfile(path):
    if timm_weights.detect_format(path) in timm_weights.TIMM_FORMATS:
      params = timm_weights.load(path, model)
    else:
      params = released_weights.load(path)
    return {"params": params, "ema_params": params, "model_state": {},
            "ema_model_state": {}}
  return read_params(path)


def read_params(path: str) -> dict[str, Any]:
  """Reads the weights and model state (raw and EMA) of a checkpoint.

  The checkpoint's checksums are checked first. For a workdir or its
  `checkpoints` folder, a checkpoint that fails them is skipped with a
  warning for the one before it; a step folder that fails them is an error.

  Args:
    path: a run's workdir, its `checkpoints` folder (the newest good step is
      used) or one step's folder.

  Returns:
    {'params', 'ema_params', 'model_state', 'ema_model_state'}: trees of
    numpy arrays.

  Raises:
    ValueError: if no checkpoint, or no good one, is found at `path`.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise ValueError(f"init_from: {path} does not exist")
  if os.path.isdir(os.path.join(path, "state")):
    try:
      checkpoint.verify(path)
    except checkpoint.ChecksumError as e:
      raise ValueError(f"init_from: {path}: {e}") from None
    return _read_state_params(os.path.join(path, "state"))
  for folder in (path, os.path.join(path, "checkpoints")):
    steps = sorted(
        (s for s in (os.listdir(folder) if os.path.isdir(folder) else [])
         if s.isdigit() and os.path.isdir(os.path.join(folder, s, "state"))),
        key=int, reverse=True)
    for step in steps:
      try:
        checkpoint.verify(os.path.join(folder, step))
        return _read_state_params(os.path.join(folder, step, "state"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("init_from: the checkpoint at step %s in %s is "
                        "unreadable (%s: %s); trying the previous one", step,
                        folder, type(e).__name__, str(e).splitlines()[0][:300])
    if steps:
      raise ValueError(f"init_from: no good checkpoint in {folder}: steps "
                       f"{', '.join(steps)} are all unreadable (see the "
                       "warnings)")
  raise ValueError(f"init_from: no checkpoint found in {path} (expected a "
                   "workdir, its checkpoints/ folder or a step folder)")


def _read_state_params(state_dir: str) -> dict[str, Any]:
  with ocp.StandardCheckpointer() as ckptr:
    # Restoring against host (numpy) targets reads a checkpoint written on any
    # device layout; without a target orbax rebuilds the saved sharding and
    # fails on another topology.
    metadata = ckptr.metadata(state_dir)
    metadata = getattr(metadata, "item_metadata", metadata)
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    tree = ckptr.restore(state_dir, target)
  # Restored against numpy targets: a dict of host arrays, the TrainState's
  # fields by name.
  model_state = tree.get("model_state") or {}
  return {"params": tree["params"], "ema_params": tree["ema_params"],
          "model_state": model_state,
          # (Checkpoints from before the EMA of the model state have none.)
          "ema_model_state": tree.get("ema_model_state") or model_state}
