import jax
import loopback
import pytest

from pipo_jax import distributed


def test_single_process_is_a_no_op(monkeypatch):
  for k in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
  ):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize_distributed() is False
  assert jax.process_index() == 0


def test_partial_coordinates_raise(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:12345")
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="process count and process id together"):
    distributed.initialize_distributed()


_WORKER = r"""
import sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from pipo_jax import distributed, sharding
from pipo_jax.config import MeshConfig
from pipo_jax.data.pipeline import local_batch_size
assert distributed.initialize_distributed()
n, i = jax.process_count(), jax.process_index()
mesh = sharding.make_mesh(MeshConfig(data=-1))
local = np.full((local_batch_size(4, n), 2), i, np.float32)
g = sharding.shard_batch(local, mesh)  # what the trainer does with each process's rows
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(g)
print("RESULT", n, i, g.shape, float(total), jax.process_index() == 0, flush=True)
"""


@pytest.mark.slow
def test_two_cpu_processes_over_loopback(tmp_path):
  """Two real processes, gloo collectives, coordinates from the JAX_* env variables."""
  lines = loopback.result_lines(loopback.run_two_processes(_WORKER, tmp_path, timeout=120))
  # global batch [4, 2]: two rows of 0s from process 0, two rows of 1s from process 1 -> sum 4
  assert lines == ["RESULT 2 0 (4, 2) 4.0 True", "RESULT 2 1 (4, 2) 4.0 False"]
