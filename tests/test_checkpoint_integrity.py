"""Checkpoint checksums and failing saves, on a small stand-in state.

Every kind of damage (a flipped byte, a truncated, deleted or changed file)
must be caught before the state is used, and the previous checkpoint used
instead; a save that cannot be written must stop with one error naming the
step and the folder, leaving the earlier checkpoints restorable.
"""

import json
import os
import resource
import signal
from typing import NamedTuple

import jax
import numpy as np
import pytest

from nfnets.training import checkpoint
from nfnets.training import integrity
from nfnets.training import weights_io


class State(NamedTuple):
  step: jax.Array
  params: dict
  ema_params: dict


def _state(k: int) -> State:
  params = {"linear": {"w": jax.random.normal(jax.random.PRNGKey(k),
                                              (48, 40))}}
  return State(step=jax.numpy.asarray(k), params=params,
               ema_params=jax.tree.map(lambda x: x * 0.5, params))


ABSTRACT = jax.eval_shape(lambda: _state(0))


def _save(directory, steps, async_save=True):
  ckpt = checkpoint.Checkpointer(str(directory), 5, async_save)
  for k in steps:
    ckpt.save(k, _state(k), {"batch": k})
  ckpt.close()


def _restore(directory):
  ckpt = checkpoint.Checkpointer(str(directory), 5, async_save=False)
  try:
    return ckpt.restore_latest(ABSTRACT)
  finally:
    ckpt.close()


def _largest_data_file(step_dir):
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  return max((os.path.join(data, f) for f in os.listdir(data)),
             key=os.path.getsize)


def _flip(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = bytearray(f.read(64))
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 10)


def _change_metadata(step_dir):
  path = os.path.join(step_dir, "state", "_METADATA")
  with open(path) as f:
    metadata = json.load(f)
  metadata["custom_metadata"] = {"edited": True}
  with open(path, "w") as f:
    json.dump(metadata, f)
  return path


@pytest.mark.parametrize("async_save", [True, False])
def test_every_save_commits_with_checksums_of_its_files(tmp_path, async_save):
  _save(tmp_path, [1, 2], async_save)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  for step in ("1", "2"):
    step_dir = tmp_path / step
    with open(step_dir / integrity.MANIFEST) as f:
      files = json.load(f)["files"]
    assert any(name.startswith("state/ocdbt.process_0/d/") for name in files)
    assert "state/_METADATA" in files and "data/metadata" in files
    for name, entry in files.items():
      assert integrity.file_sha256(step_dir / name) == entry["sha256"]
    assert integrity.first_mismatch(str(step_dir)) is None
  state, data_state = _restore(tmp_path)
  assert int(state.step) == 2 and data_state == {"batch": 2}
  np.testing.assert_array_equal(state.params["linear"]["w"],
                                _state(2).params["linear"]["w"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "metadata"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog,
                                                             damage):
  _save(tmp_path, [1, 2])
  step_dir = str(tmp_path / "2")
  bad = _largest_data_file(step_dir)
  if damage == "flip":
    _flip(bad)
  elif damage == "truncate":
    _truncate(bad)
  elif damage == "delete":
    os.remove(bad)
  else:
    bad = _change_metadata(step_dir)
  with caplog.at_level("WARNING"):
    state, data_state = _restore(tmp_path)
  assert int(state.step) == 1 and data_state == {"batch": 1}
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "step 2" in r.getMessage()]
  assert len(warnings) == 1, caplog.text
  assert os.path.relpath(bad, step_dir) in warnings[0]
  # The resumed run's save of step 2 replaces the damaged checkpoint.
  ckpt = checkpoint.Checkpointer(str(tmp_path), 5, async_save=True)
  assert int(ckpt.restore_latest(ABSTRACT)[0].step) == 1
  ckpt.save(2, _state(2), {"batch": 2})
  ckpt.close()
  assert integrity.first_mismatch(step_dir) is None
  assert int(_restore(tmp_path)[0].step) == 2


def test_no_good_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  _save(tmp_path, [1, 2])
  for step in ("1", "2"):
    _flip(_largest_data_file(str(tmp_path / step)))
  with pytest.raises(ValueError, match=r"no good checkpoint .*steps 2, 1"):
    _restore(tmp_path)
  assert _restore(tmp_path / "empty") is None


def test_a_checkpoint_without_checksums_is_read_with_a_warning(tmp_path,
                                                              caplog):
  _save(tmp_path, [1])
  os.remove(tmp_path / "1" / integrity.MANIFEST)
  with caplog.at_level("WARNING"):
    assert int(_restore(tmp_path)[0].step) == 1
  assert "read unverified" in caplog.text


def test_init_from_verifies_and_falls_back(tmp_path, caplog):
  _save(tmp_path / "checkpoints", [1, 2])
  _flip(_largest_data_file(str(tmp_path / "checkpoints" / "2")))
  with caplog.at_level("WARNING"):
    weights = weights_io.read_params(str(tmp_path))
  np.testing.assert_array_equal(weights["params"]["linear"]["w"],
                                _state(1).params["linear"]["w"])
  assert "step 2" in caplog.text and "SHA-256" in caplog.text
  with pytest.raises(ValueError, match="different SHA-256"):
    weights_io.read_params(str(tmp_path / "checkpoints" / "2"))
  _flip(_largest_data_file(str(tmp_path / "checkpoints" / "1")))
  with pytest.raises(ValueError, match="no good checkpoint"):
    weights_io.read_params(str(tmp_path))


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failing_save_is_one_error_and_keeps_the_earlier_ones(tmp_path,
                                                                async_save):
  ckpt = checkpoint.Checkpointer(str(tmp_path), 5, async_save)
  ckpt.save(1, _state(1), {"batch": 1})
  ckpt.wait()
  # A file system that refuses any file over 1000 bytes: the data files of
  # step 2 (7.5 KiB of random floats) cannot be written.
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
  try:
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
      ckpt.save(2, _state(2), {"batch": 2})
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  ckpt.close()  # the failure is reported once
  message = str(error.value)
  assert "\n" not in message
  assert f"step 2 in {tmp_path} failed" in message
  assert "File too large" in message and "(steps 1) are intact" in message
  state, data_state = _restore(tmp_path)
  assert int(state.step) == 1 and data_state == {"batch": 1}
  # A restarted run saves step 2 over the failed attempt.
  _save(tmp_path, [2])
  assert int(_restore(tmp_path)[0].step) == 2


def test_a_save_error_keeps_the_os_reason_and_drops_tensorstore_s_spec():
  # The shape of the error TensorStore raised in one failing save: the
  # cause mid-text, then kilobytes of spec; the reason must survive.
  spec = "{" + ", ".join(f'"key{i}": {{"a": [{i}]}}' for i in range(200)) + "}"
  error = ValueError(
      'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "step/.zarray"'
      ' in OCDBT database at local file "/tmp/run/2.orbax-checkpoint-tmp/": '
      'Failed writing: "/tmp/run/d/ce38": Failed to write 6403 bytes to file'
      f" 20: File too large [tensorstore_spec='{spec}'] [os_error_code='27']")
  message = checkpoint._save_error_message(2, "/tmp/run", error, [1])
  assert "\n" not in message and "tensorstore_spec" not in message
  assert "Failed to write 6403 bytes to file 20: File too large" in message
  assert len(message) < 700
  # An OSError in the chain gives its reason even when the text is cut.
  try:
    try:
      raise OSError(28, "No space left on device")
    except OSError as cause:
      raise RuntimeError("x" * 1000) from cause
  except RuntimeError as chained:
    assert "No space left on device" in checkpoint._save_error_message(
        2, "/tmp/run", chained, [1])


def test_only_arrays_of_large_slices_are_written_replica_parallel(
    tmp_path, monkeypatch):
  # orbax cuts each replicated array into one slice per replica, each cut a
  # program compiled per shape and device: for arrays whose slices are under
  # checkpoint._MIN_REPLICA_SLICE_BYTES, one replica writes them whole.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  large_rows = checkpoint._MIN_REPLICA_SLICE_BYTES // 4 // 64 * 8
  state = {"small": jax.device_put(np.ones((48, 40), np.float32), replicated),
           "large": jax.device_put(
               np.arange(large_rows * 64, dtype=np.float32).reshape(
                   large_rows, 64), replicated)}
  sliced = []
  slice_in_dim = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda x, *a, **k: (
      sliced.append(x.shape), slice_in_dim(x, *a, **k))[1])
  ckpt = checkpoint.Checkpointer(str(tmp_path), 2, async_save=False)
  ckpt.save(1, state, {})
  restored, _ = ckpt.restore_latest(jax.eval_shape(lambda: state))
  ckpt.close()
  assert sliced == [(large_rows, 64)] * jax.device_count()
  for key in state:
    np.testing.assert_array_equal(restored[key], state[key])
