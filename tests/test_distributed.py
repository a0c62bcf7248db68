import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pipo_jax import distributed


def test_single_process_is_a_no_op(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
            "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize_distributed() is False
  assert distributed.is_main_process()


def test_partial_coordinates_raise(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:12345")
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="process count and process id together"):
    distributed.initialize_distributed()


def test_batch_helpers_single_process():
  assert distributed.process_local_batch_size(16) == 16
  mesh = Mesh(np.array(jax.devices()), ("data",))
  local = {"ids": np.arange(32).reshape(8, 4), "mask": np.ones((8, 4), bool)}
  g = distributed.make_global_batch(local, NamedSharding(mesh, P("data")))
  assert g["ids"].shape == (8, 4) and g["ids"].sharding.shard_shape((8, 4)) == (1, 4)
  np.testing.assert_array_equal(np.asarray(g["ids"]), local["ids"])


_WORKER = r"""
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pipo_jax import distributed
assert distributed.initialize_distributed()
n, i = jax.process_count(), jax.process_index()
mesh = Mesh(np.array(jax.devices()), ("data",))
local = np.full((distributed.process_local_batch_size(4), 2), i, np.float32)
g = distributed.make_global_batch(local, NamedSharding(mesh, P("data")))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(g)
print("RESULT", n, i, g.shape, float(total), distributed.is_main_process(), flush=True)
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
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  lines = sorted(l for o in outs for l in o.splitlines() if l.startswith("RESULT"))
  # global batch [4, 2]: two rows of 0s from process 0, two rows of 1s from process 1 -> sum 4
  assert lines == ["RESULT 2 0 (4, 2) 4.0 True", "RESULT 2 1 (4, 2) 4.0 False"]
