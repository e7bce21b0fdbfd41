"""Device mesh, batch sharding and multi-host start-up.

The training step is written per device, pmap-style, over a named `'data'`
axis and mapped with `jax.shard_map` over a mesh of every device of every
process. Each process feeds its own slice of the global batch.
"""

import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
  """Starts `jax.distributed` when asked (multi-host TPU pods and GPUs).

  On Cloud TPU and under SLURM or Open MPI the coordinator is found
  automatically; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID (read here) for each process.

  Args:
    enabled: whether to initialize.
  """
  if not enabled:
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  """A 1-D mesh named 'data' over all devices of all processes."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises a clear error when a global batch does not split over devices."""
  if global_batch_size % mesh.size:
    raise ValueError(
        f"{what} {global_batch_size} is not divisible by the {mesh.size} "
        f"devices; use a multiple of {mesh.size}")


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of arrays held whole on every device (the train state)."""
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host or device tree on every device of the mesh."""
  return jax.device_put(tree, replicated_sharding(mesh))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Any:
  """Assembles each process's local batch into global arrays split on 'data'.

  Args:
    batch: this process's slice of the global batch (leading axis).
    mesh: the data mesh.

  Returns:
    Global jax.Arrays whose leading axis is sharded over the mesh.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_same_across_processes(value: int, what: str) -> None:
  """Raises ValueError unless every process passes the same `value`.

  A collective: every process must call it at the same point.

  Args:
    value: an integer this process computed (e.g. a dataset's size).
    what: what the value is, for the message.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  values = multihost_utils.process_allgather(np.asarray(value, np.int64))
  values = [int(v) for v in np.ravel(values)]
  if len(set(values)) > 1:
    raise ValueError(f"processes disagree on {what}: {values} (by process)")
