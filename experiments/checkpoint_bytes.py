"""Bytes per checkpoint save of a recipe, with and without the frozen base, from abstract shapes (no weights):

    PYTHONPATH=. python experiments/checkpoint_bytes.py --flagfile=experiments/qwen3_5_9b_sft_v5p.flags

Builds the trainer's abstract TrainState (params + LoRA adapters, trainable / frozen partition, AdamW state) on a
one-device mesh (global sizes do not depend on the mesh) and prints `checkpoint.save_bytes` of it.
"""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app
from ml_collections import config_flags

from pipo_jax.config import Config, MeshConfig

_CONFIG = config_flags.DEFINE_config_dataclass("config", Config(), "Run configuration (pipo_jax/config.py).")


def main(argv):
  del argv
  import jax

  from pipo_jax import memory_plan, sharding
  from pipo_jax.io import checkpoint, loading

  cfg = dataclasses.replace(_CONFIG.value, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
  model_cfg = loading.model_config_of(cfg)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  state, _ = memory_plan.abstract_train_state(cfg, model_cfg, mesh)
  b = checkpoint.save_bytes(state)
  gb = lambda n: f"{n / 1e9:8.2f} GB"
  for k in ("trainable", "opt_state", "frozen", "step", "rng"):
    print(f"{k:>15}: {gb(b[k])}")
  print(f"{'full save':>15}: {gb(b['full'])}")
  print(f"{'without frozen':>15}: {gb(b['without_frozen'])}  ({b['full'] / b['without_frozen']:.0f}x less)")


if __name__ == "__main__":
  app.run(main)
