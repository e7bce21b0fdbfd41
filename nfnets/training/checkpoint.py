"""A thin orbax wrapper: save, keep the last K, restore with fallback.

Each checkpoint holds two items: `state` (the whole TrainState: params,
optimizer state, EMA, step, RNG) and `data` (the input iterator's position,
JSON). Restores are made against an abstract target from `jax.eval_shape`, so
arrays come back with the mesh's sharding.
"""

import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nfnets import released_weights


class Checkpointer:
  """Periodic (asynchronous) checkpoints of one run in `directory`."""

  def __init__(self, directory: str, max_to_keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    # Steps found unreadable by `restore_latest`: the run trains them again
    # and `save` replaces them.
    self._unreadable = set()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving (asynchronously when enabled) the state at `step`."""
    if step in self.manager.all_steps():
      if step not in self._unreadable:
        return
      logging.warning("replacing the unreadable checkpoint at step %d in %s",
                      step, self.directory)
      self.manager.delete(step)
      self._unreadable.discard(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)), force=True)

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
    """Restores the newest readable checkpoint, or None if there is none.

    A checkpoint that fails to restore (truncated or corrupt files, a crash
    while it was written) is skipped with a warning and the one before it is
    tried, so one bad write never costs more than one save interval; the
    run's next save of that step replaces it. A readable checkpoint of a
    differently shaped state (another model or optimizer) is an error, so
    that a changed config never restarts over, and deletes, another run. A
    checkpoint from before a field of `ADDED_FIELDS` existed restores with
    that field filled from its source field.

    Args:
      abstract_state: the TrainState's shapes, dtypes and shardings.

    Returns:
      (state, data_state) or None.

    Raises:
      ValueError: if a readable checkpoint holds a different state.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        metadata = self.manager.item_metadata(step)["state"]
        added = _added_fields(metadata, abstract_state)
        target = abstract_state
        if added:
          target = {k: v for k, v in abstract_state._asdict().items()
                    if k not in added}
        saved = _signature(metadata)
        # (No metadata to compare: the restore below checks the state.)
        difference = (_first_difference(saved, _signature(target)) if saved
                      else None)
        if difference is None:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target),
              data=ocp.args.JsonRestore()))
          state = restored.state
          if added:
            state = _migrate(state, added, type(abstract_state), step)
          return state, dict(restored.data)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s);"
                        " trying the previous one", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:200])
        self._unreadable.add(step)
        continue
      raise ValueError(
          f"the checkpoint at step {step} in {self.directory} holds another "
          f"model or optimizer than this config ({difference}); resume it "
          "with its own config, or train in a new workdir (--config.init_from="
          "this workdir starts from its weights)")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# Fields the TrainState gained after checkpoints were first written, each with
# the field an older checkpoint fills it from: the EMA of the model state
# starts as the model state itself (as it does at initialisation).
ADDED_FIELDS = {"ema_model_state": "model_state"}


def _added_fields(metadata: Any, abstract_state: Any) -> tuple[str, ...]:
  """The `ADDED_FIELDS` of `abstract_state` that a checkpoint predates."""
  metadata = getattr(metadata, "item_metadata", metadata)
  if not hasattr(abstract_state, "_fields") or not hasattr(metadata, "keys"):
    return ()
  saved = set(metadata.keys())
  return tuple(f for f in ADDED_FIELDS
               if f in abstract_state._fields and f not in saved)


def _migrate(restored: dict, added: tuple[str, ...], state_type: type,
             step: int) -> Any:
  """An older checkpoint's fields as a `state_type`, the added ones filled."""
  for field in added:
    source = ADDED_FIELDS[field]
    logging.info("the checkpoint at step %d predates %s; it starts as %s",
                 step, field, source)
    # A copy: the train step donates its state, and one buffer may not be
    # donated twice.
    restored[field] = jax.tree.map(jnp.copy, restored[source])
  return state_type(**restored)


def _signature(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{leaf path: shape} of a state or of a checkpoint's metadata.

  (Dtypes are not compared: a restore casts to the target's dtypes.)
  """
  tree = getattr(tree, "item_metadata", tree)
  signature = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(str(getattr(k, "name", getattr(k, "key", getattr(
        k, "idx", k)))) for k in path)
    signature[names] = tuple(leaf.shape)
  return signature


def _first_difference(saved: dict, expected: dict) -> Optional[str]:
  """The first leaf where two signatures differ, in words; None if equal."""
  for path in sorted(set(saved) | set(expected)):
    name = "/".join(path)
    if path not in expected:
      return f"{name} is in the checkpoint, not in this config's state"
    if path not in saved:
      return f"{name} is in this config's state, not in the checkpoint"
    if saved[path] != expected[path]:
      return (f"{name} has shape {list(saved[path])} in the checkpoint, "
              f"{list(expected[path])} here")
  return None


def load_weights(path: str) -> dict[str, Any]:
  """The weights and model state (raw and EMA) of a run or a weights file.

  Args:
    path: a run's workdir, checkpoints folder or step folder (see
      `read_params`), or a file: DeepMind's released weights or a safe
      `.npz` (see `nfnets.released_weights`), whose params serve as both
      and which hold no model state.

  Returns:
    {'params', 'ema_params', 'model_state', 'ema_model_state'}: trees of
    numpy arrays (the model states, e.g. batch-norm statistics, may be
    empty).
  """
  if os.path.isfile(path):
    params = released_weights.load(path)
    return {"params": params, "ema_params": params, "model_state": {},
            "ema_model_state": {}}
  return read_params(path)


def read_params(path: str) -> dict[str, Any]:
  """Reads the weights and model state (raw and EMA) of a checkpoint.

  Args:
    path: a run's workdir, its `checkpoints` folder (the latest step is
      used) or one step's folder.

  Returns:
    {'params', 'ema_params', 'model_state', 'ema_model_state'}: trees of
    numpy arrays.

  Raises:
    ValueError: if no checkpoint is found at `path`.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise ValueError(f"init_from: {path} does not exist")
  candidates = [path, os.path.join(path, "checkpoints")]
  for folder in candidates:
    if os.path.isdir(os.path.join(folder, "state")):
      return _read_state_params(os.path.join(folder, "state"))
    steps = [s for s in (os.listdir(folder) if os.path.isdir(folder) else [])
             if s.isdigit() and os.path.isdir(os.path.join(folder, s, "state"))]
    if steps:
      latest = max(steps, key=int)
      return _read_state_params(os.path.join(folder, latest, "state"))
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
