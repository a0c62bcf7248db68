"""Multi-process start-up and the coordination barrier.

Where the coordinates come from, first match wins:
  1. explicit arguments (CLI flags);
  2. env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (and optional
     JAX_LOCAL_DEVICE_IDS, comma separated), e.g. from launch/local_multiprocess.sh;
  3. JAX's own cluster detection, by calling `jax.distributed.initialize()` without arguments:
     SLURM (srun), Cloud TPU pods (metadata server), Open MPI, ...
Single-process runs (none of the above) skip initialisation.

CPU multi-process needs a cross-process collectives backend: gloo is selected before initialising.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
from absl import logging

_ENV_ADDR, _ENV_N, _ENV_ID, _ENV_DEV = (
  "JAX_COORDINATOR_ADDRESS",
  "JAX_NUM_PROCESSES",
  "JAX_PROCESS_ID",
  "JAX_LOCAL_DEVICE_IDS",
)


def _auto_cluster_detected() -> bool:
  """Environments where `jax.distributed.initialize()` finds its own coordinates."""
  if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if "OMPI_COMM_WORLD_SIZE" in os.environ and int(os.environ["OMPI_COMM_WORLD_SIZE"]) > 1:
    return True
  # Multi-host Cloud TPU: the TPU runtime advertises its worker list.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def _platform() -> str:
  plats = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  return plats.split(",")[0].strip().lower()


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
) -> bool:
  """Start JAX's multi-controller runtime if this is a multi-process job. Returns True if started.

  Must run before anything touches devices (`jax.devices()`, any computation).
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV_ADDR) or None
  if num_processes is None and os.environ.get(_ENV_N):
    num_processes = int(os.environ[_ENV_N])
  if process_id is None and os.environ.get(_ENV_ID):
    process_id = int(os.environ[_ENV_ID])
  if local_device_ids is None and os.environ.get(_ENV_DEV):
    local_device_ids = [int(x) for x in os.environ[_ENV_DEV].split(",") if x]

  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if not explicit and not _auto_cluster_detected():
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError(
      "multi-process run needs coordinator address, process count and process id together: got "
      f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, process_id={process_id} "
      f"(flags or env {_ENV_ADDR}/{_ENV_N}/{_ENV_ID})"
    )
  if _platform() == "cpu":
    # The default CPU client has no cross-process collectives; gloo works over TCP.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
    )
  else:
    jax.distributed.initialize()
  logging.info(
    "distributed: process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Block until every process reaches `barrier(name)`; a no-op in a single-process run.

  Uses the coordination service (the coordinator's key-value store), not a device collective, so it can
  line processes up *before* a program's first collective: e.g. after compiling, which finishes at different
  times per process, while gloo (CPU) gives a peer only 30 s to join a new communicator.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed

  client = jax_distributed.global_state.client
  if client is None:  # the runtime was started by someone else without a client we can reach
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))


def compile_and_meet(jitted, *args, name: str, **static):
  """`jitted` compiled ahead of time for these arguments; in a multi-process run every process then waits at
  `barrier(name)` before the program's first run (processes finish compiling at different times, and gloo
  gives a peer only 30 s to join a collective). Returns the executable: call it with the dynamic arguments."""
  compiled = jitted.lower(*args, **static).compile()
  barrier(name)
  return compiled


def wait_until_ready(tree, poll_s: float = 0.0005):
  """Wait until every jax.Array of `tree` is computed, by polling `is_ready()`; returns `tree`.

  Used instead of `jax.block_until_ready` where OPD waits (each rollout, teacher scoring, train step): on a
  2-core CPU host loaded ~15x, a blocking wait was seen never to return (py-spy: main thread in
  `BlockUntilReadyWithCancel`; gdb: both XLA pool threads idle in `WaitForWork`) until a debugger attach woke
  it, i.e. a lost wake-up; polling does not depend on that wake-up. Costs < 1 ms per wait.
  """
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]
  while not all(x.is_ready() for x in leaves):
    time.sleep(poll_s)
  return tree
