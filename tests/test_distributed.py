import jax
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
  import os
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
    )
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  lines = sorted(l for o in outs for l in o.splitlines() if l.startswith("RESULT"))
  # global batch [4, 2]: two rows of 0s from process 0, two rows of 1s from process 1 -> sum 4
  assert lines == ["RESULT 2 0 (4, 2) 4.0 True", "RESULT 2 1 (4, 2) 4.0 False"]
