"""Compiled per-device memory of one OPD step, from abstract shapes only (no weights are created).

`opd_step_memory(...)` lowers and compiles exactly the two programs the trainer jits for an already
rolled-out batch: the teacher scoring (`loss.make_teacher_fn`: teacher forward on the PAD-compacted sequence,
states aligned per stream) and the train step (`optim.make_train_step` over `loss.make_opd_loss`: student
compressed forward + LoRA, both chunked OPD streams, confidence BCE, backward, AdamW update with the
TrainState donated, the teacher states and head as inputs), and returns XLA's `memory_analysis()` per
device. While one program runs the other's resident inputs stay in memory (the student's TrainState during
the teacher scoring, the teacher's params during the step): `total` is the larger of the two sums. The
rollout (generation with its KV cache) is NOT included: it runs before both and its buffers are freed first.

Every array is a `jax.ShapeDtypeStruct` carrying its NamedSharding on the given mesh, so the numbers are
those of the sharded program on one device (the CPU backend's buffer assignment; a GPU/TPU compile of the
same program differs mainly in fusion temporaries).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipo_jax import optim, sharding
from pipo_jax.config import Config, ModelConfig
from pipo_jax.models import lora as lora_lib
from pipo_jax.opd import loss as opd_lib
from pipo_jax.trainer import Trainer, axes_to_shardings, boxed_params, logical_axes, train_state_shardings


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _unbox(tree):
  import flax.linen as nn

  return nn.meta.unbox(tree)


def opd_step_memory(
  cfg: Config, student_cfg: ModelConfig, teacher_cfg: ModelConfig, mesh, batch_size: int, length: int
) -> dict:
  """Per-device bytes of the compiled OPD step: {"argument", "output", "alias", "temp" (train step),
  "teacher_temp", "teacher_total" (teacher scoring, with the resident TrainState), "total", ...}.

  cfg: the run config (lora, loss, opd, optim, train sections are used); student_cfg / teacher_cfg: resolved
  model configs; batch_size rollouts of `length` tokens (global; sharded over data * fsdp).
  Train step: argument + output - alias + temp (the donated TrainState is aliased into the output) + the
  resident teacher params; total = max of that and the teacher scoring's.
  """
  boxed = boxed_params(student_cfg, "opd")
  p_shard = sharding.param_shardings(boxed, mesh)
  params = _abstract(_unbox(boxed), p_shard)
  if cfg.lora.rank > 0:
    adapters = jax.eval_shape(lambda p: lora_lib.init_lora(p, cfg.lora, jax.random.PRNGKey(0)), params)
    axes = lora_lib.lora_logical_axes(logical_axes(boxed), adapters)
    l_shard = axes_to_shardings(axes, mesh)
    params = dict(params, **{lora_lib.LORA_KEY: _abstract(adapters, l_shard)})
    p_shard = dict(p_shard, **{lora_lib.LORA_KEY: l_shard})
  mask = _trainable_mask(cfg, params)
  tx = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  # The trainer's own state shardings (optimizer slots sharded like their params).
  state_shardings = train_state_shardings(params, p_shard, mask, tx, mesh)
  state = _abstract(jax.eval_shape(lambda p, r: optim.TrainState.create(p, mask, tx, r), params, key), state_shardings)

  tboxed = boxed_params(teacher_cfg, "ar")["backbone"]
  teacher = {"backbone": _abstract(_unbox(tboxed), sharding.param_shardings(tboxed, mesh))}
  bs = sharding.batch_sharding(mesh, 2)
  rollout = {
    k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32 if k in ("input_ids", "labels") else jnp.bool_, sharding=bs)
    for k in opd_lib.ROLLOUT_KEYS
  }
  n_dev = int(np.prod(list(mesh.shape.values())))
  with sharding.use_rules(mesh):
    teacher_c = jax.jit(opd_lib.make_teacher_fn(teacher_cfg)).lower(teacher, rollout).compile()
    scored = jax.eval_shape(opd_lib.make_teacher_fn(teacher_cfg), teacher, rollout)
    states_sh = sharding.batch_sharding(mesh, 3)
    batch = dict(rollout, **{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=states_sh) for k, v in scored.items()})
    w_t = jax.eval_shape(lambda t: opd_lib.teacher_head(teacher_cfg, t), teacher)
    w_t = jax.ShapeDtypeStruct(w_t.shape, w_t.dtype, sharding=NamedSharding(mesh, P()))
    loss_fn = opd_lib.make_opd_loss(student_cfg, teacher_cfg, cfg.opd, cfg.loss, cfg.lora)
    step = optim.make_train_step(loss_fn, 1, optim.make_schedule(cfg.optim, cfg.train.num_steps))
    compiled = jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None)).lower(state, batch, w_t).compile()
  ma, ta = compiled.memory_analysis(), teacher_c.memory_analysis()
  out = {
    "argument": int(ma.argument_size_in_bytes),
    "output": int(ma.output_size_in_bytes),
    "alias": int(ma.alias_size_in_bytes),
    "temp": int(ma.temp_size_in_bytes),
    "generated_code": int(ma.generated_code_size_in_bytes),
    "teacher_temp": int(ta.temp_size_in_bytes),
  }
  out["student_params"] = _bytes(params) // n_dev
  out["teacher_params"] = _bytes(teacher) // n_dev
  out["optimizer_state"] = _bytes(state.opt_state) // n_dev
  state_bytes = _bytes(state) // n_dev
  out["step_total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["teacher_params"]
  out["teacher_total"] = (
    int(ta.argument_size_in_bytes) + int(ta.output_size_in_bytes) + out["teacher_temp"] + state_bytes
  )
  out["total"] = max(out["step_total"], out["teacher_total"])
  return out


def _bytes(tree) -> int:
  """Global bytes of an abstract tree (divide by the device count for a fully sharded tree)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def _trainable_mask(cfg: Config, params):
  """The trainer's mask (same rules), computed without building a Trainer (which would make a mesh)."""
  tr = Trainer.__new__(Trainer)
  tr.cfg = cfg
  return tr.trainable_mask(params)


def with_dtype(mc: ModelConfig, dtype: str = "bfloat16", remat: str = "full") -> ModelConfig:
  return dataclasses.replace(mc, dtype=dtype, param_dtype=dtype, remat=remat, scan_layers=True)
