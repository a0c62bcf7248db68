"""A tiny training run in its own process, for the fault-injection tests (tests/test_faults.py).

  python tests/fault_child.py DATA_DIR WORKDIR '{"steps": 6, ...}'

Builds the same config as `tiny_config` (imported by the tests for their in-process runs) and runs the real
`Trainer`. Options in the JSON: `steps`, `every_steps`, `async_save`, `save_frozen`, and `hold_finalize_at`
(a step whose async save is held before orbax commits it: the process prints `FINALIZING <step>` and sleeps,
so the test can kill -9 it in the middle of that save). Every finished step prints `STEP <n>`.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tiny_sft import tiny_sft_config

from pipo_jax.config import CheckpointConfig, Config


def tiny_config(
  data_dir: str,
  workdir: str,
  steps: int = 6,
  every_steps: int = 2,
  async_save: bool = True,
  save_frozen: str = "auto",
  **train_kw,
) -> Config:
  """tests/tiny_sft.py's tiny SFT run (full fine-tune, embeddings frozen, 1 device) with sequences of up to 64
  tokens, saving every `every_steps` steps."""
  return tiny_sft_config(
    data_dir,
    workdir,
    steps=steps,
    max_length=64,
    checkpoint=CheckpointConfig(every_steps=every_steps, keep=10, async_save=async_save, save_frozen=save_frozen),
    **train_kw,
  )


def _say(line: str) -> None:
  """One line in one write: print() writes the text and the newline separately, and absl's log lines from
  other threads (stderr, merged into the same pipe by the test) can land in between, hiding the marker."""
  sys.stdout.write(line + "\n")
  sys.stdout.flush()


def main():
  import json

  import jax

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py: bitwise-equal runs
  import orbax.checkpoint as ocp
  from absl import logging

  from pipo_jax import metrics
  from pipo_jax.trainer import Trainer

  data_dir, workdir, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  hold = opts.pop("hold_finalize_at", None)
  if hold is not None:
    original = ocp.CheckpointManager._finalize

    def held(self, step, *a, **k):
      if step == hold:
        _say(f"FINALIZING {step}")
        import time

        time.sleep(600)
      return original(self, step, *a, **k)

    ocp.CheckpointManager._finalize = held
  log_progress = metrics.MetricsWriter.log_progress

  def announce(self, step, *a, **k):
    out = log_progress(self, step, *a, **k)
    _say(f"STEP {step}")
    return out

  metrics.MetricsWriter.log_progress = announce
  logging.set_verbosity(logging.INFO)
  Trainer(tiny_config(data_dir, workdir, **opts)).train()
  _say("DONE")


if __name__ == "__main__":
  main()
