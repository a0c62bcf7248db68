"""The one training entry point: `python -m pipo_jax.train --flagfile=experiments/X.flags`.

Modes (`--config.mode`):
  ar   plain next-token training of the backbone (+ optional native-MTP auxiliary loss)
  sft  PIPO supervised fine-tuning (compressed forward, two CE streams, confidence BCE)
  opd  on-policy distillation from a teacher (pipo_jax/opd/)

Phases of `run(cfg)`: resolve the model config -> mesh -> params (loaded from `checkpoint.init_from` or
initialised, born sharded) -> LoRA adapters -> trainable/frozen partition + optimizer -> resume from the
workdir's latest checkpoint (state and data iterator) -> jitted step loop with metrics and checkpoints.

Everything a run writes goes into `--config.workdir`: checkpoints/ (orbax), TensorBoard events and
metrics.jsonl.
"""

from __future__ import annotations

from ml_collections import config_flags

from pipo_jax import cli
from pipo_jax.config import Config

_CONFIG = None


def define_flags():
  """The CLI's flags (defined by `cli.run`, only when this module is the program): `--config` would clash
  with memory_plan's if defined at import."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_dataclass("config", Config(), "Run configuration (pipo_jax/config.py).")


def main(argv):
  del argv
  from pipo_jax import distributed

  distributed.initialize_distributed()
  run(_CONFIG.value)


def run(cfg: Config) -> dict | None:
  """Train as configured; returns the last logged metrics (process 0) or None."""
  # Imported here so `--help` and flag parsing do not pay for jax initialisation.
  if cfg.mode == "opd":
    from pipo_jax.opd import trainer as opd_trainer

    return opd_trainer.OPDTrainer(cfg).train()
  from pipo_jax import trainer

  return trainer.Trainer(cfg).train()


if __name__ == "__main__":
  cli.run(main, define_flags)
