"""A thin orbax wrapper: save, keep the last K, verify, restore with fallback.

Each checkpoint holds two items: `state` (the whole TrainState: params,
optimizer state, EMA, step, RNG) and `data` (the input iterator's position,
JSON), and the checksums of its files (`nfnets.training.integrity`), written
before the checkpoint commits and checked before any read. Restores are made
against an abstract target from `jax.eval_shape`, so arrays come back with
the mesh's sharding.
"""

import os
import re
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nfnets.training import integrity

# Where orbax writes a step before committing it by a rename (on file systems
# without renames, such as GCS, it writes the final folder directly).
_TEMPORARY_SUFFIX = ".orbax-checkpoint-tmp"

# orbax writes a replicated array "replica-parallel": each replica writes a
# slice of it, cut on its device by a small program compiled per shape and
# device (at a process's first save of the digits NFNet on 8 CPU devices,
# 232 programs and about 7 s of its 13 s for 6 steps). A slice under 1 MiB
# saves no writing time, so smaller arrays are written whole by one replica
# (in one chunk, where replica-parallel writes one per slice); either reads
# back the same.
_MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_replica_slices_for_large_arrays_only() -> None:
  """Sets `_MIN_REPLICA_SLICE_BYTES` on orbax's registered jax.Array handler.

  orbax keeps its other settings, and its per-platform choice of whether to
  write replica-parallel at all. (Its constructor takes the setting, but
  registering a new handler would drop the registered one's array metadata
  store and log a warning in every process.)
  """
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  handler._min_slice_bytes_for_replica_parallel = _MIN_REPLICA_SLICE_BYTES  # pylint: disable=protected-access


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (no space, no permission, ...)."""


def _save_error_message(step: int, directory: str, error: BaseException,
                        kept: list[int]) -> str:
  """One line: which save failed, why, and that the others are intact."""
  # TensorStore appends the whole spec of what it was writing (kilobytes
  # of JSON) after the cause: cut it, keep the operating system's reason.
  reason = " ".join(str(error).split())
  reason = re.sub(r"\s*\[tensorstore_spec=.*", "", reason)
  if len(reason) > 300:
    reason = f"{reason[:140]} ... {reason[-150:]}"
  os_reason = _os_reason(error)
  if os_reason and os_reason not in reason:
    reason = f"{reason}; {os_reason}"
  return (f"saving the checkpoint of step {step} in {directory} failed "
          f"({type(error).__name__}: {reason}); the run stopped. The earlier "
          f"checkpoints (steps {', '.join(map(str, kept)) or 'none'}) are "
          "intact: free space or fix the folder's permissions, then restart "
          "to resume from the newest")


def _os_reason(error: BaseException) -> str | None:
  """The operating system's reason for `error` ("File too large"), if any.

  From an `OSError` in its chain of causes, else from the `os_error_code`
  that TensorStore's errors carry in their text.
  """
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return seen.strerror
    seen = seen.__cause__ or seen.__context__
  match = re.search(r"os_error_code='?(\d+)", str(error))
  return os.strerror(int(match.group(1))) if match else None


class Checkpointer:
  """Periodic (asynchronous) checkpoints of one run in `directory`.

  Saves are asynchronous unless `async_save=False`: `save` returns once the
  arrays are copied to the host, and the files, their checksums and the
  commit are written by orbax's background thread. A save that fails raises
  `CheckpointSaveError` at the next `save`, `wait` or `close`, naming the
  step and the folder; the checkpoints before it are left as they were.
  """

  def __init__(self, directory: str, max_to_keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    # Steps found unreadable by `restore_latest`: the run trains them again
    # and `save` replaces them.
    self._unreadable = set()
    # The step whose save is in flight (its checksums are written by the
    # callback below), and whether a failed save was already reported.
    self._saving = None
    self._failed = False
    _use_replica_slices_for_large_arrays_only()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # Always orbax's asynchronous checkpointer, whose commit runs
            # `_write_checksums`; `async_save=False` waits for each save.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(
                post_finalization_callback=self._write_checksums)),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def _write_checksums(self) -> None:
    """Checksums the step being saved, before orbax commits it.

    Runs in orbax's background thread on the primary process, once every
    process has written its files.
    """
    final = os.path.join(self.directory, str(self._saving))
    temporary = final + _TEMPORARY_SUFFIX
    integrity.write_manifest(temporary if os.path.isdir(temporary) else final)

  def _save_error(self, step: int, error: Exception) -> CheckpointSaveError:
    self._failed = True
    kept = [s for s in sorted(self.manager.all_steps()) if s != step]
    return CheckpointSaveError(
        _save_error_message(step, self.directory, error, kept))

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving the state at `step` (waits for it if not async).

    Raises:
      CheckpointSaveError: if this save, or the previous asynchronous one,
        fails.
    """
    self.wait()
    if step in self.manager.all_steps():
      if step not in self._unreadable:
        return
      logging.warning("replacing the unreadable checkpoint at step %d in %s",
                      step, self.directory)
      self.manager.delete(step)
      self._unreadable.discard(step)
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if not self.async_save:
      self.wait()

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
    """Restores the newest good checkpoint, or None if there is none.

    A checkpoint whose files fail their checksums (a flipped byte, a
    truncated, deleted or changed file) or that fails to restore is skipped
    with a warning naming the step and the first bad file, and the one
    before it is tried, so one bad write never costs more than one save
    interval; the run's next save of that step replaces it. A checkpoint of
    a differently shaped state (another model or optimizer) is an error, so
    that a changed config never restarts over, and deletes, another run. A
    checkpoint from before a field of `ADDED_FIELDS` existed restores with
    that field filled from its source field.

    Args:
      abstract_state: the TrainState's shapes, dtypes and shardings.

    Returns:
      (state, data_state), or None if the folder holds no checkpoint.

    Raises:
      ValueError: if a readable checkpoint holds a different state, or if
        there are checkpoints and none of them is good.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        verify(os.path.join(self.directory, str(step)))
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
            state = _migrate(state, added, abstract_state, step)
          return state, dict(restored.data)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s);"
                        " trying the previous one", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:300])
        self._unreadable.add(step)
        continue
      raise ValueError(
          f"the checkpoint at step {step} in {self.directory} holds another "
          f"model or optimizer than this config ({difference}); resume it "
          "with its own config, or train in a new workdir (--config.init_from="
          "this workdir starts from its weights)")
    if steps:
      raise ValueError(
          f"no good checkpoint in {self.directory}: steps "
          f"{', '.join(map(str, steps))} are all unreadable (see the "
          "warnings); move the folder away to start the run afresh")
    return None

  def wait(self) -> None:
    """Waits for the save in flight; CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving, e) from e

  def close(self) -> None:
    """Waits for the save in flight (raising its error once) and closes."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise


class ChecksumError(ValueError):
  """A checkpoint's files do not match the checksums written with it."""


def verify(step_dir: str) -> None:
  """Raises ChecksumError unless `step_dir` matches its checksums.

  A checkpoint written before checksums existed is read with a warning.
  """
  if not integrity.has_manifest(step_dir):
    logging.warning("the checkpoint %s has no %s (written before checksums "
                    "were recorded); it is read unverified", step_dir,
                    integrity.MANIFEST)
    return
  mismatch = integrity.first_mismatch(step_dir)
  if mismatch is not None:
    raise ChecksumError(f"{mismatch}; the checkpoint is corrupt")


# Fields the TrainState gained after checkpoints were first written, each with
# the field an older checkpoint fills it from, or None for zeros: the EMA of
# the model state starts as the model state itself and the loss-spike
# guard's average empty (both as at initialisation).
ADDED_FIELDS = {"ema_model_state": "model_state", "loss_average": None}


def _added_fields(metadata: Any, abstract_state: Any) -> tuple[str, ...]:
  """The `ADDED_FIELDS` of `abstract_state` that a checkpoint predates."""
  metadata = getattr(metadata, "item_metadata", metadata)
  if not hasattr(abstract_state, "_fields") or not hasattr(metadata, "keys"):
    return ()
  saved = set(metadata.keys())
  return tuple(f for f in ADDED_FIELDS
               if f in abstract_state._fields and f not in saved)


def _migrate(restored: dict, added: tuple[str, ...], abstract_state: Any,
             step: int) -> Any:
  """An older checkpoint's fields as a state, the added ones filled."""
  for field in added:
    source = ADDED_FIELDS[field]
    logging.info("the checkpoint at step %d predates %s; it starts as %s",
                 step, field, source or "zeros")
    if source is None:
      restored[field] = jax.tree.map(
          lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
          getattr(abstract_state, field))
    else:
      # A copy: the train step donates its state, and one buffer may not be
      # donated twice.
      restored[field] = jax.tree.map(jnp.copy, restored[source])
  return type(abstract_state)(**restored)


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
