"""Per-device memory of a run's train step, from abstract shapes only: `python -m pipo_jax.memory_plan`.

    python -m pipo_jax.memory_plan --flagfile=experiments/qwen3_5_4b_sft_v5p.flags \
        [--num_devices=64] [--accelerator=v5p|v6e|H100|H200] [--output=plan.json] [--config.x=...]
    python -m pipo_jax.memory_plan --flagfile=... --target=tpu --topology=v5p:2x2x2 [--dump_hlo=step.hlo.gz]

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

Mode opd plans the two programs OPDTrainer jits for one optimizer step on a rolled-out batch of
`opd.rollout.rollout_length` tokens (k micro-batches stacked with accumulation): the teacher scoring
(`opd.loss.make_teacher_fn`, frozen teacher, with the TrainState resident) and the train step on the scored batch
(`optim.make_train_step` over `opd.loss.make_opd_loss`, the teacher's LM head as extra argument, with the teacher
resident). total_bytes is the larger (`larger_program`; both under `train_step` / `teacher_scoring`), as
`pipo_jax.opd.memory` reports it; the rollout's own generation memory (KV cache) is freed before both.

--target=tpu compiles the same step with the TPU compiler (libtpu, see pipo_jax.tpu_plan; no TPU needed) for
the chips of --topology, so the memory figures are XLA:TPU's own buffer assignment, and adds, per chip and step:
flops / bytes_accessed (read from the optimized HLO with every while-loop body multiplied by its trip count:
pipo_jax.hlo_stats; compiler_cost_analysis keeps XLA's once-per-body figures beside them), model_flops (the
step's matmul FLOPs without remat, pipo_jax.flop_model), collectives by kind with their bytes and the
largest ones, a roofline (step time = max(flops / peak, bytes / HBM bandwidth), MFU = model_flops / (time *
peak)), the costliest ops, sharding_mismatches (compiled input shards that differ from the rules') and
whole_param_gathers (all-gathers that rebuild a whole tensor-sharded parameter).

Caveats (target cpu). The figures are the CPU backend's buffer assignment for the same SPMD-partitioned program; TPU and
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

from absl import flags, logging
from ml_collections import config_flags

from pipo_jax.config import Config

# Per-device HBM in GiB (vendor figures: TPU v5p 95 GiB, v6e 32 GiB, H100 SXM 80 GB-class, H200 141 GB-class).
HBM_GIB = {"v5p": 95, "v6e": 32, "v5e": 16, "v4": 32, "H100": 80, "H200": 141}

_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ----------------------------------------------------------------------------------------------
# Simulated devices
# ----------------------------------------------------------------------------------------------


def _xla_flags_with_count(n: int) -> str:
  """The caller's XLA_FLAGS with our device count replacing any inherited one."""
  rest = re.sub(_COUNT_FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", "")).split()
  return " ".join(rest + [f"{_COUNT_FLAG}={n}"])


def ensure_host_devices(n: int, argv: list | None = None) -> None:
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
    logging.info(
      "jax already runs with %d %s devices: re-executing with %d simulated CPU devices",
      jax.device_count(),
      jax.default_backend(),
      n,
    )
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
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

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


def abstract_batch(cfg: Config, mesh, length: int | None = None, keys=("input_ids", "labels")) -> dict:
  """The step's batch rows: int32 (bool for OPD's masks) [B, T], or [k, B, T] with k = optim.grad_accum_steps.

  length defaults to data.max_length; keys other than input_ids / labels are bool (OPD's rollout masks)."""
  import jax
  import jax.numpy as jnp

  B, T, k = cfg.data.batch_size, length or cfg.data.max_length, cfg.optim.grad_accum_steps
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if B % shards:
    raise ValueError(
      f"data.batch_size={B} is not divisible by data*fsdp={shards} on mesh {dict(mesh.shape)}: "
      f"set --config.data.batch_size to a multiple of {shards}"
    )
  shape = (B, T) if k == 1 else (k, B, T)  # Trainer.global_batch stacks k micro-batches on a leading axis
  s = _rows_sharding(mesh, len(shape), k)
  return {
    name: jax.ShapeDtypeStruct(shape, jnp.int32 if name in ("input_ids", "labels") else jnp.bool_, sharding=s)
    for name in keys
  }


def _rows_sharding(mesh, ndim: int, k: int):
  """Rows over data*fsdp (Trainer.global_batch): axis 0, or axis 1 behind the unsharded micro-batch axis."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  lead = () if k == 1 else (None,)
  return NamedSharding(mesh, P(*lead, ("data", "fsdp"), *([None] * (ndim - len(lead) - 1))))


def _analysis_dict(ma) -> dict:
  out = {
    "argument_bytes": int(ma.argument_size_in_bytes),
    "output_bytes": int(ma.output_size_in_bytes),
    "alias_bytes": int(ma.alias_size_in_bytes),
    "temp_bytes": int(ma.temp_size_in_bytes),
    "generated_code_bytes": int(ma.generated_code_size_in_bytes),
  }
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def build_step(cfg: Config, model_cfg, mesh) -> dict:
  """The programs the trainer jits, with abstract arguments: {fn, args, params, optimizer, batch, teacher, ...}.

  ar / sft: `optim.make_train_step` over the mode's loss (Trainer.train). opd (OPDTrainer): the same train
  step over `opd.loss.make_opd_loss` on one scored batch of `opd.rollout.rollout_length` tokens (rollout rows
  plus the teacher states) with the teacher's LM head as the extra argument, and under "scoring" the
  teacher-scoring program (`opd.loss.make_teacher_fn` on input_ids / keep, plus the kept-token count, as
  OPDTrainer._teacher_scores jits it) with its abstract arguments. The TrainState is donated and carries the
  trainer's state shardings; the frozen teacher (never in the TrainState) is "teacher".
  """
  import jax

  from pipo_jax import optim

  state, state_shardings = abstract_train_state(cfg, model_cfg, mesh)
  schedule = optim.make_schedule(cfg.optim, cfg.train.num_steps)
  k = cfg.optim.grad_accum_steps
  out = {
    "state": state,
    "params": (state.trainable, state.frozen),
    "optimizer": state.opt_state,
    "teacher": None,
    "scoring": None,
  }
  if cfg.mode in ("ar", "sft"):
    batch = abstract_batch(cfg, mesh)
    loss_fn = _planning_trainer(cfg, model_cfg, mesh).loss_fn()
    args = (state, batch)
    out.update(length=cfg.data.max_length)
  else:
    import flax.linen as nn
    import jax.numpy as jnp

    from pipo_jax import sharding
    from pipo_jax.opd import loss as opd_loss
    from pipo_jax.opd import rollout as rollout_lib
    from pipo_jax.trainer import boxed_params

    teacher_cfg = teacher_config_of(cfg)
    length = rollout_lib.rollout_length(cfg.opd)
    tboxed = boxed_params(teacher_cfg, "ar")["backbone"]
    teacher = {"backbone": _abstract(nn.meta.unbox(tboxed), sharding.param_shardings(tboxed, mesh))}
    batch = abstract_batch(cfg, mesh, length, opd_loss.ROLLOUT_KEYS)
    score = opd_loss.make_teacher_fn(teacher_cfg)

    def score_fn(teacher_params, b):  # OPDTrainer._teacher_scores: the states and the kept-token count
      return score(teacher_params, b), jnp.sum(b["keep"])

    inputs = {key: batch[key] for key in ("input_ids", "keep")}
    with sharding.use_rules(mesh):
      scored = jax.eval_shape(score, teacher, inputs)
      head = jax.jit(lambda t: opd_loss.teacher_head(teacher_cfg, t)).lower(teacher).compile()
    # The teacher states enter the step as rows of the batch (sharded like them); compile_step replaces this
    # sharding by the one the compiled scoring program really outputs. W_t keeps the sharding of the jitted
    # teacher_head that OPDTrainer.step_inputs runs.
    batch.update(
      {
        key: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_rows_sharding(mesh, v.ndim, k))
        for key, v in scored.items()
      }
    )
    w_t = jax.ShapeDtypeStruct(head.out_info.shape, head.out_info.dtype, sharding=head.output_shardings)
    loss_fn = opd_loss.make_opd_loss(model_cfg, teacher_cfg, cfg.opd, cfg.loss, cfg.lora)
    args = (state, batch, w_t)
    out.update(
      length=length,
      teacher=teacher,
      teacher_cfg=teacher_cfg,
      scoring={"fn": jax.jit(score_fn), "args": (teacher, inputs)},
    )
  step_fn = optim.make_train_step(loss_fn, k, schedule)
  out.update(
    fn=jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, None)),
    args=args,
    batch=batch,
    state_shardings=state_shardings,
  )
  return out


def compile_step(built: dict, mesh):
  """(compiled, lower_seconds, compile_seconds) of build_step's jitted train step under the sharding rules.

  opd: the teacher-scoring program is compiled first (into built["scoring_compiled"], its seconds counted
  too), and the step's teacher-state inputs take the shardings that program outputs.
  """
  import jax

  from pipo_jax import cli, sharding

  t_lower = t_compile = 0.0
  with sharding.use_rules(mesh):
    if built["scoring"] is not None:
      t0 = time.time()
      with cli.stage("lower the teacher-scoring program"):
        lowered = built["scoring"]["fn"].lower(*built["scoring"]["args"])
      t1 = time.time()
      with cli.stage("compile the teacher-scoring program"):
        built["scoring_compiled"] = lowered.compile()
      t_lower, t_compile = t1 - t0, time.time() - t1
      states = built["scoring_compiled"].output_shardings[0]
      batch = dict(
        built["batch"],
        **{
          key: jax.ShapeDtypeStruct(built["batch"][key].shape, built["batch"][key].dtype, sharding=s)
          for key, s in states.items()
        },
      )
      built["batch"] = batch
      built["args"] = (built["args"][0], batch, *built["args"][2:])
    t0 = time.time()
    with cli.stage("lower the train step"):
      lowered = built["fn"].lower(*built["args"])
    t1 = time.time()
    with cli.stage("compile the train step (minutes for a multi-billion model)"):
      compiled = lowered.compile()
  return compiled, round(t_lower + t1 - t0, 2), round(t_compile + time.time() - t1, 2)


def opd_program_memory(built: dict, compiled) -> dict:
  """The plan's memory fields for mode opd: the larger of the two programs, each with what stays resident.

  train_step: the step's argument + output - aliased + temp, plus the frozen teacher's params (not a step
  argument, but held); teacher_scoring: its argument + output + temp, plus the TrainState and the rollout
  rows it does not read (held while it runs). total_bytes is the larger (as `pipo_jax.opd.memory` reports
  it); argument / output / alias / temp_bytes are the train step's. The rollout's own generation memory
  (KV cache) is freed before both and not part of either.
  """
  step = _analysis_dict(compiled.memory_analysis())
  teacher_bytes = per_device_bytes(built["teacher"])
  step["total_bytes"] += teacher_bytes
  scoring = _analysis_dict(built["scoring_compiled"].memory_analysis())
  inputs = built["scoring"]["args"][1]
  rest = {key: v for key, v in built["batch"].items() if key not in inputs and not key.startswith("teacher_")}
  scoring["total_bytes"] = (
    scoring["argument_bytes"]
    + scoring["output_bytes"]
    + scoring["temp_bytes"]
    + per_device_bytes(built["state"])
    + per_device_bytes(rest)
  )
  out = {
    key: step[key] for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes")
  }
  larger = "train_step" if step["total_bytes"] >= scoring["total_bytes"] else "teacher_scoring"
  out.update(
    total_bytes=max(step["total_bytes"], scoring["total_bytes"]),
    larger_program=larger,
    train_step=step,
    teacher_scoring=scoring,
    student_params_bytes=per_device_bytes(built["params"]),
    teacher_params_bytes=teacher_bytes,
  )
  return out


def _plan_cpu(cfg: Config, model_cfg, mesh) -> dict:
  """Any mode: the trainer's jitted programs on the abstract state and batch (opd: see opd_program_memory)."""
  built = build_step(cfg, model_cfg, mesh)
  compiled, t_lower, t_compile = compile_step(built, mesh)
  if built["teacher"] is None:
    out = _analysis_dict(compiled.memory_analysis())
    out.update(params_bytes=per_device_bytes(built["params"]))
  else:
    out = opd_program_memory(built, compiled)
    out.update(
      params_bytes=out["student_params_bytes"] + out["teacher_params_bytes"],
      teacher=built["teacher_cfg"].preset or cfg.opd.teacher_checkpoint,
    )
  out.update(
    optimizer_bytes=per_device_bytes(built["optimizer"]),
    batch_bytes=per_device_bytes(built["batch"]),
    lower_seconds=t_lower,
    compile_seconds=t_compile,
    length=built["length"],
    batch_size=cfg.data.batch_size,
  )
  return out


def model_flops_per_step(cfg: Config, model_cfg, built: dict) -> float:
  """Useful FLOPs of one optimizer step, all chips: `flop_model.train_step(...).total` (the matmuls of the
  compressed PIPO forward, its gradients for what the state trains, OPD's teacher scoring; no remat)."""
  from pipo_jax import flop_model

  trained = flop_model.trained_modules(built["state"].trainable)
  return flop_model.train_step(cfg, model_cfg, trained, built["length"], built.get("teacher_cfg")).total


def sharding_mismatches(compiled, built: dict) -> list:
  """Paths of state / teacher leaves whose compiled input shard shape differs from the rules' shard shape.

  The compiler may pick other input shardings than the ones given (e.g. replicate a parameter the rules
  shard); an empty list means every parameter and optimizer slot is held exactly as planned. built: anything
  with the program's abstract "args" (build_step's dict, or its "scoring" entry).
  """
  import jax

  out = []
  n_args = len(built["args"])
  got = compiled.input_shardings[0][:n_args]
  for i, (arg, shard) in enumerate(zip(built["args"], got)):
    # An argument the program never reads (e.g. the teacher's LM head in its scoring) is pruned by jit: its
    # compiled sharding is None, kept in the flattening so that the leaves stay aligned, and not compared.
    shards = jax.tree_util.tree_leaves(shard, is_leaf=lambda s: s is None)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(arg), shards):
      if s is not None and x.sharding.shard_shape(x.shape) != s.shard_shape(x.shape):
        out.append(
          f"arg{i}{jax.tree_util.keystr(path)}: planned {x.sharding.shard_shape(x.shape)}, "
          f"compiled {s.shard_shape(x.shape)}"
        )
  return out


def _module_of(path: str) -> str:
  """ "['backbone']['layers']['layer_3']['self_attn']['o_proj']['kernel']" -> "layer_3/self_attn/o_proj": how the
  module appears in the op_name of the ops that consume the param."""
  keys = re.findall(r"\['([^']+)'\]", path)[:-1]
  return "/".join(keys[-3:])


def whole_param_gathers(largest: list, built: dict, mesh) -> list:
  """All-gathers whose result is a whole tensor-sharded parameter (one layer of it or all of it).

  FSDP gathers a parameter's 'fsdp' shards per layer by design (ZeRO-3); a gather that also undoes its
  'tensor' split means the model-parallel sharding the rules asked for is not used where the param is
  consumed. Matched by shape (singleton dims ignored) against the largest collectives of the HLO; where the
  gather's op_name names a module of the model, that module must be the param's (the 9B's GDN in_proj_qkv
  gathered over fsdp alone is [4096, 4096], the whole shape of its o_proj).
  """
  import jax

  from pipo_jax import hlo_stats

  if mesh.shape.get("tensor", 1) == 1:
    return []
  squeeze = lambda dims: tuple(d for d in dims if d != 1)
  whole: dict = {}
  modules = set()
  for path, x in jax.tree_util.tree_leaves_with_path((built["params"], built["teacher"])):
    if "tensor" in jax.tree_util.tree_leaves(tuple(x.sharding.spec)) and len(x.shape) >= 2:
      name = jax.tree_util.keystr(path)
      modules.add(_module_of(name))
      for dims in {squeeze(x.shape), squeeze(x.shape[1:])}:
        whole.setdefault(dims, []).append(name)
  hits = []
  for c in largest:
    if c["kind"] != "all-gather":
      continue
    for _, dims in hlo_stats.array_shapes(c["shape"]):
      names = whole.get(squeeze(dims), [])
      named = [n for n in names if _module_of(n) in c["op_name"]]
      if not named and any(m in c["op_name"] for m in modules):
        names = []  # the gather feeds another module, whose shard merely has this param's whole shape
      if named or names:
        hits.append(dict(c, param=(named or names)[0]))
        break
  return hits


def _plan_tpu(cfg: Config, model_cfg, mesh, chip: str, hlo_out: str | None = None, top: int = 10) -> dict:
  """Any mode on compile-only TPU devices: XLA:TPU's memory, its HLO's FLOPs / bytes / collectives, a roofline.
  A program XLA:TPU cannot fit into HBM is a plan too (out_of_memory_report), not an error."""
  built = build_step(cfg, model_cfg, mesh)
  t0 = time.time()
  try:
    compiled, t_lower, t_compile = compile_step(built, mesh)
  except RuntimeError as e:
    report = out_of_memory_report(str(e), built, cfg)
    if report is None:
      raise
    report.update(compile_seconds=round(time.time() - t0, 2))
    return report
  out = tpu_report(cfg, model_cfg, mesh, built, compiled, chip, hlo_out, top)
  out.update(lower_seconds=t_lower, compile_seconds=t_compile)
  return out


# XLA:TPU's refusal, e.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
# temporaries (530.75G) exceeds available HBM (95.74G)." Its G is GiB (XLA prints byte sizes in binary units).
_TPU_OOM = re.compile(
  r"RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)([KMGT])\)", re.S
)
_BINARY_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory_report(message: str, built: dict, cfg: Config) -> dict | None:
  """The plan of a step XLA:TPU refused for lack of HBM (None for any other error): the temporaries it needed and
  the HBM it had (from its message), params and optimizer bytes from the abstract state (exact), fits False.
  total_bytes = params + optimizer + batch + needed temporaries, the least the program would take."""
  m = _TPU_OOM.search(message)
  if m is None:
    return None
  temp = int(float(m.group(1)) * _BINARY_UNITS[m.group(2)])
  usable = int(float(m.group(3)) * _BINARY_UNITS[m.group(4)])
  program = "train_step"
  if built["scoring"] is not None and built.get("scoring_compiled") is None:
    program = "teacher_scoring"
  params = per_device_bytes(built["params"])
  if built["teacher"] is not None:
    params += per_device_bytes(built["teacher"])
  optimizer, batch = per_device_bytes(built["optimizer"]), per_device_bytes(built["batch"])
  return {
    "out_of_memory": {"program": program, "temp_bytes_needed": temp, "hbm_usable_bytes": usable},
    "compile_error": next(line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line).strip(),
    "params_bytes": params,
    "optimizer_bytes": optimizer,
    "batch_bytes": batch,
    "temp_bytes": temp,
    "total_bytes": params + optimizer + batch + temp,
    "length": built["length"],
    "batch_size": cfg.data.batch_size,
  }


def tpu_report(
  cfg: Config, model_cfg, mesh, built: dict, compiled, chip: str, hlo_out: str | None = None, top: int = 10
) -> dict:
  """The plan's fields from a compiled TPU step (see _plan_tpu; compile_step first).

  opd: memory as opd_program_memory (the larger program); FLOPs, bytes, collectives, loops and ops are the sums
  over both programs (one optimizer step runs the teacher scoring, then the train step). hlo_out gets the train
  step; the teacher scoring goes beside it with `.teacher` before the extension.
  """
  from pipo_jax import hlo_stats, tpu_plan

  programs = [("", compiled)]
  if built["teacher"] is not None:
    programs.append((".teacher", built["scoring_compiled"]))
  texts = [c.as_text() for _, c in programs]
  if hlo_out:
    import gzip

    for (tag, _), text in zip(programs, texts):
      stem, ext = (hlo_out[: -len(".hlo.gz")], ".hlo.gz") if hlo_out.endswith(".hlo.gz") else os.path.splitext(hlo_out)
      with gzip.open(stem + tag + ext if tag else hlo_out, "wt") as f:
        f.write(text)
  stats = _merge_stats([hlo_stats.analyze(text, top=4 * top) for text in texts])
  cas = []
  for _, c in programs:
    ca = c.cost_analysis() or {}
    cas.append(ca[0] if isinstance(ca, (list, tuple)) else ca)
  n = mesh.devices.size
  model_flops = model_flops_per_step(cfg, model_cfg, built) / n
  coll_bytes = sum(c["bytes"] for c in stats["collectives"].values())
  chipc = tpu_plan.CHIPS[chip]
  if built["teacher"] is None:
    out = _analysis_dict(compiled.memory_analysis())
    out.update(params_bytes=per_device_bytes(built["params"]))
    mismatches = sharding_mismatches(compiled, built)
  else:
    out = opd_program_memory(built, compiled)
    out.update(
      params_bytes=out["student_params_bytes"] + out["teacher_params_bytes"],
      teacher=built["teacher_cfg"].preset or cfg.opd.teacher_checkpoint,
    )
    mismatches = sharding_mismatches(compiled, built) + [
      f"teacher_scoring {m}" for m in sharding_mismatches(built["scoring_compiled"], built["scoring"])
    ]
  out.update(
    optimizer_bytes=per_device_bytes(built["optimizer"]),
    batch_bytes=per_device_bytes(built["batch"]),
    length=built["length"],
    batch_size=cfg.data.batch_size,
    flops=stats["flops"],
    dot_flops=stats["dot_flops"],
    bytes_accessed=stats["bytes"],
    model_flops=model_flops,
    compiler_cost_analysis={
      "flops": sum(float(ca.get("flops", 0.0)) for ca in cas),
      "bytes_accessed": sum(float(ca.get("bytes accessed", 0.0)) for ca in cas),
    },
    hlo_counts_once={"flops": stats["flops_once"], "bytes": stats["bytes_once"]},
    loops=stats["loops"],
    unknown_trip_counts=stats["unknown_trip_counts"],
    collectives=stats["collectives"],
    largest_collectives=stats["largest_collectives"][:top],
    roofline=tpu_plan.roofline(stats["flops"], stats["bytes"], coll_bytes, chip, model_flops),
    top_ops=hlo_stats.top_ops(stats["ops"], chipc["peak_flops"], chipc["hbm_bw"], top),
    sharding_mismatches=mismatches,
    whole_param_gathers=whole_param_gathers(stats["largest_collectives"], built, mesh),
  )
  return out


def _merge_stats(stats: list) -> dict:
  """hlo_stats.analyze results of the programs one step runs, as one: totals and collectives summed, lists joined."""
  if len(stats) == 1:
    return stats[0]
  out = {
    key: sum(s[key] for s in stats)
    for key in ("flops", "flops_once", "dot_flops", "bytes", "bytes_once", "unknown_trip_counts")
  }
  out["collectives"] = {}
  for kind in stats[0]["collectives"]:
    cs = [s["collectives"][kind] for s in stats]
    out["collectives"][kind] = {key: sum(c[key] for c in cs) for key in ("count", "bytes", "count_static")}
    out["collectives"][kind]["largest_bytes"] = max(c["largest_bytes"] for c in cs)
  out["largest_collectives"] = sorted((c for s in stats for c in s["largest_collectives"]), key=lambda c: -c["bytes"])
  out["loops"] = [loop for s in stats for loop in s["loops"]]
  out["ops"] = [o for s in stats for o in s["ops"]]
  return out


def teacher_config_of(cfg: Config):
  """The OPD teacher's resolved config: opd.teacher_checkpoint's config.json when it exists, else opd.teacher."""
  from pipo_jax.config import load_hf_model_config, resolve_model_config
  from pipo_jax.io import loading

  path = cfg.opd.teacher_checkpoint
  if path and loading.is_hf_dir(path):
    return load_hf_model_config(path, cfg.opd.teacher)
  if path and loading.is_orbax_checkpoint(path):
    from pipo_jax.io import checkpoint as ckpt_lib

    return loading.config_from_saved(ckpt_lib.read_config(path), cfg.opd.teacher)[0]
  if cfg.opd.teacher.preset is None:
    raise ValueError("mode=opd: set opd.teacher.preset (e.g. qwen3_5_9b) or an existing opd.teacher_checkpoint")
  return resolve_model_config(cfg.opd.teacher)


def plan(
  cfg: Config,
  accelerator: str | None = None,
  target: str = "cpu",
  topology: str | None = None,
  hlo_out: str | None = None,
) -> dict:
  """The memory plan of `cfg` (see the module docstring for the fields).

  target "cpu": on all of jax's current (simulated CPU) devices; "tpu": on the chips of `topology`
  (e.g. "v5p:2x2x2"), compiled by libtpu, with the chip type deciding `fits` (accelerator is ignored).
  """
  import jax

  from pipo_jax import sharding
  from pipo_jax.io import loading

  if cfg.data.max_length % 2:
    raise ValueError(f"data.max_length={cfg.data.max_length} must be even")
  if cfg.mode not in ("ar", "sft", "opd"):
    raise ValueError(f"mode={cfg.mode!r}: expected ar | sft | opd")
  model_cfg = loading.model_config_of(cfg)
  if target == "tpu":
    from pipo_jax import tpu_plan

    if not topology:
      raise ValueError("--target=tpu needs --topology, e.g. v5p:2x2x2 (8 chips) or v6e:2x4")
    accelerator = tpu_plan.chip_of(topology)
    devices = tpu_plan.topology_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    out = _plan_tpu(cfg, model_cfg, mesh, accelerator, hlo_out)
    out.update(
      backend="tpu",
      topology=topology,
      num_devices=len(devices),
      produced_by=f"XLA:TPU (libtpu) AOT compile for {topology}",
    )
  elif target == "cpu":
    mesh = sharding.make_mesh(cfg.mesh)
    out = _plan_cpu(cfg, model_cfg, mesh)
    out.update(
      backend=jax.default_backend(),
      num_devices=jax.device_count(),
      produced_by=f"XLA:CPU on {jax.device_count()} simulated devices (an estimate)",
    )
  else:
    raise ValueError(f"target={target!r}: expected cpu | tpu")
  out.update(
    mode=cfg.mode,
    model=cfg.model.preset or cfg.checkpoint.init_from,
    mesh=dict(mesh.shape),
    grad_accum_steps=cfg.optim.grad_accum_steps,
    dtype=model_cfg.dtype,
    param_dtype=model_cfg.param_dtype,
    remat=model_cfg.remat,
    lora_rank=cfg.lora.rank,
  )
  if accelerator:
    hbm = HBM_GIB[accelerator] * 2**30
    out.update(
      accelerator=accelerator,
      hbm_bytes=hbm,
      fits=bool(out["total_bytes"] <= hbm),
      hbm_fraction=round(out["total_bytes"] / hbm, 4),
      headroom_bytes=hbm - out["total_bytes"],
    )
  else:
    out.update(accelerator=None, hbm_bytes=None, fits=None)
  return out


def format_plan(p: dict) -> str:
  gib = lambda b: f"{b / 2**30:10.3f} GiB"
  temp_note, total_note = "", " (argument + output - aliased + temp)"
  if p.get("out_of_memory"):
    o = p["out_of_memory"]
    temp_note = f": XLA:TPU refused the {o['program']} ({o['hbm_usable_bytes'] / 2**30:.2f} GiB of HBM usable for it)"
    total_note = " at least (params + optimizer + batch + temp)"
  lines = [
    f"memory plan: mode={p['mode']} model={p['model']} devices={p['num_devices']} mesh={p['mesh']} "
    f"batch={p['batch_size']}x{p['length']} accum={p['grad_accum_steps']} dtype={p['dtype']} "
    f"remat={p['remat']} lora_rank={p['lora_rank']} (compile {p.get('compile_seconds', 0):.0f}s)",
    f"  params     {gib(p['params_bytes'])} per device",
    f"  optimizer  {gib(p['optimizer_bytes'])} per device",
    f"  temp       {gib(p['temp_bytes'])} per device{temp_note}",
    f"  total      {gib(p['total_bytes'])} per device{total_note}",
  ]
  if p.get("larger_program"):
    lines[-1] = (
      f"  total      {gib(p['total_bytes'])} per device: the {p['larger_program']} "
      f"(train step {p['train_step']['total_bytes'] / 2**30:.3f} GiB with the teacher resident, "
      f"teacher scoring {p['teacher_scoring']['total_bytes'] / 2**30:.3f} GiB with the TrainState)"
    )
  if p.get("accelerator"):
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(
      f"  {verdict} in {p['accelerator']} HBM ({HBM_GIB[p['accelerator']]} GiB): "
      f"{100 * p['hbm_fraction']:.1f}% used, headroom {p['headroom_bytes'] / 2**30:.2f} GiB"
    )
  if p.get("roofline"):
    r = p["roofline"]
    lines.append(
      f"  compute    {p['flops'] / 1e12:10.2f} TFLOP per chip per step (trip-count corrected; "
      f"model {p['model_flops'] / 1e12:.2f}), {p['bytes_accessed'] / 2**30:.1f} GiB accessed"
    )
    lines.append(
      f"  roofline   {r['step_seconds']:.3f} s per step ({r['bound']}-bound), MFU {100 * r['mfu']:.1f}%, "
      f"collectives {r['collective_seconds']:.3f} s over ICI"
    )
    for kind, c in p["collectives"].items():
      if c["count"]:
        lines.append(
          f"  {kind:18s} {c['count']:7d} per step, {c['bytes'] / 2**30:9.2f} GiB, "
          f"largest {c['largest_bytes'] / 2**20:.1f} MiB"
        )
    for w in p["sharding_mismatches"][:5] + [
      f"whole-parameter all-gather: {g['param']} {g['shape']}" for g in p["whole_param_gathers"][:5]
    ]:
      lines.append(f"  WARNING {w}")
  return "\n".join(lines)


def define_flags() -> dict:
  """The CLI's flags. Defined only when run as a program: `--config` would clash with pipo_jax.train's in a
  process (e.g. a test session) that imports both modules."""
  return {
    "config": config_flags.DEFINE_config_dataclass("config", Config(), "Run configuration (pipo_jax/config.py)."),
    "num_devices": flags.DEFINE_integer(
      "num_devices", None, "Simulated devices (default: the mesh's product, or 8 when an axis is -1)."
    ),
    "accelerator": flags.DEFINE_enum("accelerator", None, list(HBM_GIB), "Accelerator whose HBM decides `fits`."),
    "output": flags.DEFINE_string("output", "", "Write the plan as JSON here."),
    "target": flags.DEFINE_enum(
      "target",
      "cpu",
      ["cpu", "tpu"],
      "cpu: simulated CPU devices (an estimate, for "
      "GPU targets); tpu: compile with libtpu for --topology (exact for TPU).",
    ),
    "topology": flags.DEFINE_string("topology", None, "TPU topology for --target=tpu, e.g. v5p:2x2x2 or v6e:2x4."),
    "dump_hlo": flags.DEFINE_string("dump_hlo", "", "--target=tpu: write the optimized HLO here (gzip)."),
  }


def main(argv, fl: dict):
  del argv
  cfg = fl["config"].value
  target = fl["target"].value
  if target == "tpu":  # the TPU compiler needs no host devices; keep jax from starting any TPU backend
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    ensure_host_devices(fl["num_devices"].value or default_num_devices(cfg))
  try:
    result = plan(cfg, fl["accelerator"].value, target, fl["topology"].value, fl["dump_hlo"].value or None)
  except (ValueError, RuntimeError) as e:  # user mistakes (topology, mesh, libtpu): one line, not a traceback
    sys.exit(f"memory_plan: {str(e).splitlines()[0]}")
  print(format_plan(result), flush=True)
  out = fl["output"].value
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
    logging.info("wrote %s", out)


if __name__ == "__main__":
  _FLAGS = define_flags()
  from pipo_jax import cli

  cli.run(lambda argv: main(argv, _FLAGS))
