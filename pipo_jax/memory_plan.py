"""Per-device memory of a run's train step, from abstract shapes only: `python -m pipo_jax.memory_plan`.

    python -m pipo_jax.memory_plan --flagfile=experiments/qwen3_5_4b_sft_v5p.flags \
        [--num_devices=64] [--accelerator=v5p|v6e|H100|H200] [--output=plan.json] [--config.x=...]

It builds what the trainer would build for the flagfile (model config, mesh, params + LoRA adapters, trainable /
frozen partition, AdamW state, the micro-batch stack of grad accumulation) as `jax.ShapeDtypeStruct`s carrying
their NamedShardings (no weight is created or read), then AOT-compiles exactly the step the trainer jits
(`optim.make_train_step` over the mode's loss, TrainState donated) on N simulated CPU devices and reads XLA's
`compiled.memory_analysis()`. Per device:

  params_bytes     trainable + frozen params (LoRA adapters included) held by one device
  optimizer_bytes  the optimizer state (AdamW moments, counts) held by one device
  temp_bytes       XLA temporaries of the step: activations saved for backward, attention scores, logits
                   chunks, gradients, collective buffers
  total_bytes      argument + output - aliased + temp (the donated state is updated in place)
  fits             total_bytes <= the HBM of --accelerator (v5p 95 GiB, v6e 32 GiB, H100 80 GiB, H200 141 GiB)

Mode opd plans `pipo_jax.opd_memory.opd_step_memory` (student + frozen 9B teacher, one rolled-out batch of
`opd_rollout.rollout_length` tokens); the rollout's own generation memory (KV cache) is not part of that step.

Caveats. The figures are the CPU backend's buffer assignment for the same SPMD-partitioned program; TPU and
GPU compilers fuse differently (typically fewer, smaller temporaries), so treat them as an estimate with
some headroom, not a guarantee. checkpoint.init_from is read only for its config.json, and only if it
exists: placeholder paths in the recipes fall back to model.preset.

Simulated devices: the host platform's device count is fixed when jax starts its backend, so the CLI sets
XLA_FLAGS=--xla_force_host_platform_device_count=N (and JAX_PLATFORMS=cpu) before jax initialises, and
re-executes itself in a fresh subprocess when the backend is already up with another device count.
Only one process (no jax.distributed): it is a planning tool, run on any machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from pipo_jax.config import Config

# Per-device HBM in GiB (vendor figures: TPU v5p 95 GiB, v6e 32 GiB, H100 SXM 80 GB-class, H200 141 GB-class).
HBM_GIB = {"v5p": 95, "v6e": 32, "H100": 80, "H200": 141}

_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ----------------------------------------------------------------------------------------------
# Simulated devices
# ----------------------------------------------------------------------------------------------


def _xla_flags_with_count(n: int) -> str:
  """The caller's XLA_FLAGS with our device count replacing any inherited one."""
  rest = re.sub(_COUNT_FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", "")).split()
  return " ".join(rest + [f"{_COUNT_FLAG}={n}"])


def ensure_host_devices(n: int, argv: Optional[list] = None) -> None:
  """Make jax see exactly n CPU devices: set the env before jax's backend starts, else re-exec.

  When the backend is already initialised with another device count (or another platform) the current
  process cannot change it, so the same command line runs again in a child with the env set, and this
  process exits with the child's return code.
  """
  backend_up = False
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    backend_up = xla_bridge.backends_are_initialized()
  if backend_up:
    import jax
    if jax.default_backend() == "cpu" and jax.device_count() == n:
      return
    env = dict(os.environ, XLA_FLAGS=_xla_flags_with_count(n), JAX_PLATFORMS="cpu")
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.info("jax already runs with %d %s devices: re-executing with %d simulated CPU devices",
                 jax.device_count(), jax.default_backend(), n)
    sys.exit(subprocess.call([sys.executable, "-m", "pipo_jax.memory_plan", *argv], env=env))
  os.environ["XLA_FLAGS"] = _xla_flags_with_count(n)
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported but not started: jax read JAX_PLATFORMS at import, so tell it directly
    import jax
    jax.config.update("jax_platforms", "cpu")


def default_num_devices(cfg: Config) -> int:
  sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  return 8 if -1 in sizes else math.prod(sizes)


# ----------------------------------------------------------------------------------------------
# Abstract state and the compiled step
# ----------------------------------------------------------------------------------------------


def per_device_bytes(tree) -> int:
  """Bytes one device holds of an abstract (or concrete) tree: its shard of every leaf, replicas counted fully."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return int(total)


def _abstract(tree, shardings):
  import jax
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _planning_trainer(cfg: Config, model_cfg, mesh):
  """A Trainer for its pure methods (trainable_mask, loss_fn) without its side effects (workdir, data)."""
  from pipo_jax.trainer import Trainer
  tr = Trainer.__new__(Trainer)
  tr.cfg, tr.model_cfg, tr.mesh = cfg, model_cfg, mesh
  return tr


def abstract_train_state(cfg: Config, model_cfg, mesh):
  """(state, state_shardings): the trainer's TrainState as ShapeDtypeStructs on `mesh`, never materialised.

  Mirrors Trainer.init_params / add_lora / trainable_mask / build_state, with the trainer's state shardings
  (`trainer.train_state_shardings`: optimizer slots sharded like their params).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from pipo_jax import optim, sharding
  from pipo_jax.models import lora as lora_lib
  from pipo_jax.trainer import axes_to_shardings, boxed_params, logical_axes, train_state_shardings

  boxed = boxed_params(model_cfg, cfg.mode)
  params = _abstract(nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh))
  if cfg.lora.rank > 0:
    adapters = jax.eval_shape(lambda p: lora_lib.init_lora(p, cfg.lora, jax.random.PRNGKey(0)), params)
    axes = lora_lib.lora_logical_axes(logical_axes(boxed), adapters)
    params = dict(params, **{lora_lib.LORA_KEY: _abstract(adapters, axes_to_shardings(axes, mesh))})
  mask = _planning_trainer(cfg, model_cfg, mesh).trainable_mask(params)
  tx = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
  state_shardings = train_state_shardings(params, shardings, mask, tx, mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  state = jax.eval_shape(lambda p, r: optim.TrainState.create(p, mask, tx, r), params, key)
  return _abstract(state, state_shardings), state_shardings


def abstract_batch(cfg: Config, mesh) -> dict:
  """The step's batch: {input_ids, labels} int32 [B, T], or [k, B, T] with k = optim.grad_accum_steps."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from pipo_jax import sharding
  B, T, k = cfg.data.batch_size, cfg.data.max_length, cfg.optim.grad_accum_steps
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if B % shards:
    raise ValueError(f"data.batch_size={B} is not divisible by data*fsdp={shards} on mesh {dict(mesh.shape)}: "
                     f"set --config.data.batch_size to a multiple of {shards}")
  if k == 1:
    shape, s = (B, T), sharding.batch_sharding(mesh, 2)
  else:  # Trainer.global_batch stacks k micro-batches on a leading, unsharded axis
    shape, s = (k, B, T), NamedSharding(mesh, P(None, ("data", "fsdp"), None))
  return {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for name in ("input_ids", "labels")}


def _analysis_dict(ma) -> dict:
  out = {"argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
         "alias_bytes": int(ma.alias_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes),
         "generated_code_bytes": int(ma.generated_code_size_in_bytes)}
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def _plan_sft(cfg: Config, model_cfg, mesh) -> dict:
  """ar / sft: the trainer's jitted step on the abstract state and batch."""
  import jax
  from pipo_jax import optim, sharding
  state, state_shardings = abstract_train_state(cfg, model_cfg, mesh)
  batch = abstract_batch(cfg, mesh)
  loss_fn = _planning_trainer(cfg, model_cfg, mesh).loss_fn()
  step_fn = optim.make_train_step(loss_fn, cfg.optim.grad_accum_steps,
                                  optim.make_schedule(cfg.optim, cfg.train.num_steps))
  t0 = time.time()
  with sharding.use_rules(mesh):
    lowered = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, None)).lower(state, batch)
    t1 = time.time()
    compiled = lowered.compile()
  t2 = time.time()
  out = _analysis_dict(compiled.memory_analysis())
  out.update(params_bytes=per_device_bytes((state.trainable, state.frozen)),
             optimizer_bytes=per_device_bytes(state.opt_state), batch_bytes=per_device_bytes(batch),
             lower_seconds=round(t1 - t0, 2), compile_seconds=round(t2 - t1, 2),
             length=cfg.data.max_length, batch_size=cfg.data.batch_size)
  return out


def teacher_config_of(cfg: Config):
  """The OPD teacher's resolved config: opd.teacher_checkpoint's config.json when it exists, else opd.teacher."""
  from pipo_jax import loading
  from pipo_jax.config import load_hf_model_config, resolve_model_config
  path = cfg.opd.teacher_checkpoint
  if path and loading.is_hf_dir(path):
    return load_hf_model_config(path, cfg.opd.teacher)
  if path and loading.is_orbax_checkpoint(path):
    from pipo_jax import checkpoint as ckpt_lib
    return loading.config_from_saved(ckpt_lib.read_config(path), cfg.opd.teacher)[0]
  if cfg.opd.teacher.preset is None:
    raise ValueError("mode=opd: set opd.teacher.preset (e.g. qwen3_5_9b) or an existing opd.teacher_checkpoint")
  return resolve_model_config(cfg.opd.teacher)


def _plan_opd(cfg: Config, model_cfg, mesh) -> dict:
  """opd: delegated to the OPD module's own planner (the step it jits takes the teacher as an argument).

  Hook: `pipo_jax.opd_memory.opd_step_memory(cfg, student_cfg, teacher_cfg, mesh, batch_size, length)` ->
  {argument, output, alias, temp, student_params, teacher_params, optimizer_state, ...}; if the OPD modules
  change shape, this is the one place to adapt.
  """
  try:
    from pipo_jax import opd_memory, opd_rollout
  except ImportError as e:
    raise NotImplementedError(f"mode=opd needs pipo_jax.opd_memory / opd_rollout ({e}); plan sft or ar") from e
  teacher_cfg = teacher_config_of(cfg)
  length = opd_rollout.rollout_length(cfg.opd)
  t0 = time.time()
  m = opd_memory.opd_step_memory(cfg, model_cfg, teacher_cfg, mesh, cfg.data.batch_size, length)
  out = {"argument_bytes": m["argument"], "output_bytes": m["output"], "alias_bytes": m["alias"],
         "temp_bytes": m["temp"], "generated_code_bytes": m.get("generated_code", 0)}
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  out.update(params_bytes=m["student_params"] + m["teacher_params"], student_params_bytes=m["student_params"],
             teacher_params_bytes=m["teacher_params"], optimizer_bytes=m["optimizer_state"],
             compile_seconds=round(time.time() - t0, 2), length=length, batch_size=cfg.data.batch_size,
             teacher=teacher_cfg.preset or cfg.opd.teacher_checkpoint)
  return out


def plan(cfg: Config, accelerator: Optional[str] = None) -> dict:
  """The memory plan of `cfg` on all of jax's current devices (see the module docstring for the fields)."""
  import jax
  from pipo_jax import loading, sharding
  if cfg.data.max_length % 2:
    raise ValueError(f"data.max_length={cfg.data.max_length} must be even")
  model_cfg = loading.model_config_of(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  if cfg.mode in ("ar", "sft"):
    out = _plan_sft(cfg, model_cfg, mesh)
  elif cfg.mode == "opd":
    out = _plan_opd(cfg, model_cfg, mesh)
  else:
    raise ValueError(f"mode={cfg.mode!r}: expected ar | sft | opd")
  out.update(mode=cfg.mode, model=cfg.model.preset or cfg.checkpoint.init_from, num_devices=jax.device_count(),
             mesh=dict(mesh.shape), grad_accum_steps=cfg.optim.grad_accum_steps, dtype=model_cfg.dtype,
             param_dtype=model_cfg.param_dtype, remat=model_cfg.remat, lora_rank=cfg.lora.rank,
             backend=jax.default_backend())
  if accelerator:
    hbm = HBM_GIB[accelerator] * 2**30
    out.update(accelerator=accelerator, hbm_bytes=hbm, fits=bool(out["total_bytes"] <= hbm),
               hbm_fraction=round(out["total_bytes"] / hbm, 4))
  else:
    out.update(accelerator=None, hbm_bytes=None, fits=None)
  return out


def format_plan(p: dict) -> str:
  gib = lambda b: f"{b / 2**30:10.3f} GiB"
  lines = [f"memory plan: mode={p['mode']} model={p['model']} devices={p['num_devices']} mesh={p['mesh']} "
           f"batch={p['batch_size']}x{p['length']} accum={p['grad_accum_steps']} dtype={p['dtype']} "
           f"remat={p['remat']} lora_rank={p['lora_rank']} (compile {p.get('compile_seconds', 0):.0f}s)",
           f"  params     {gib(p['params_bytes'])} per device",
           f"  optimizer  {gib(p['optimizer_bytes'])} per device",
           f"  temp       {gib(p['temp_bytes'])} per device",
           f"  total      {gib(p['total_bytes'])} per device (argument + output - aliased + temp)"]
  if p.get("accelerator"):
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"  {verdict} in {p['accelerator']} HBM ({HBM_GIB[p['accelerator']]} GiB): "
                 f"{100 * p['hbm_fraction']:.1f}% used")
  return "\n".join(lines)


def define_flags() -> dict:
  """The CLI's flags. Defined only when run as a program: `--config` would clash with pipo_jax.train's in a
  process (e.g. a test session) that imports both modules."""
  return {
      "config": config_flags.DEFINE_config_dataclass("config", Config(), "Run configuration (pipo_jax/config.py)."),
      "num_devices": flags.DEFINE_integer("num_devices", None, "Simulated devices (default: the mesh's product, "
                                          "or 8 when an axis is -1)."),
      "accelerator": flags.DEFINE_enum("accelerator", None, list(HBM_GIB), "Accelerator whose HBM decides `fits`."),
      "output": flags.DEFINE_string("output", "", "Write the plan as JSON here."),
  }


def main(argv, fl: dict):
  del argv
  cfg = fl["config"].value
  n = fl["num_devices"].value or default_num_devices(cfg)
  ensure_host_devices(n)
  result = plan(cfg, fl["accelerator"].value)
  print(format_plan(result), flush=True)
  out = fl["output"].value
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
    logging.info("wrote %s", out)


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
