"""Two real JAX processes over loopback, for the multi-process tests of tests/test_checkpoint.py and
tests/test_distributed.py: a worker script started once per process with the JAX_* coordinates that
`pipo_jax.distributed.initialize_distributed` reads (gloo collectives on CPU, 2 devices a process)."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_two_processes(worker_source: str, tmp_path, *args: str, timeout: float) -> list[str]:
  """Writes `worker_source` to tmp_path/worker.py, runs it as processes 0 and 1 of 2 (with `args` on the command
  line), asserts both exit 0 and returns their outputs (stdout and stderr together)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(worker_source)
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      PYTHONPATH=ROOT,
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  return outs


def result_lines(outs: list[str]) -> list[str]:
  """The workers' `RESULT ...` lines, sorted."""
  return sorted(l for o in outs for l in o.splitlines() if l.startswith("RESULT"))
