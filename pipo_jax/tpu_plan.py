"""Ahead-of-time compilation for a TPU topology on a machine without a TPU (libtpu's compiler, no chip).

`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")` gives compile-only
TPU devices; a Mesh over them plus `jax.ShapeDtypeStruct`s carrying NamedShardings make `jax.jit(f).lower(...)
.compile()` run XLA:TPU itself, so `memory_analysis()` is the TPU buffer assignment and the optimized HLO is the
program a pod would run. This is how memory_plan's `--target=tpu` works.

libtpu is found, in this order, at $TPU_LIBRARY_PATH (jax's own variable: the path of libtpu.so), under
$PIPO_TPU_SITE (a `pip install --target` directory holding the `libtpu` package, so that libtpu is NOT
importable by every jax process on the machine: an importable libtpu makes jax probe for a TPU backend), or as an
importable `libtpu` package. requirements-tpu.txt pins the version jax[tpu] asks for.
"""

from __future__ import annotations

import importlib.util
import os

# Per-chip figures (public): peak dense bf16 FLOP/s, HBM bytes, HBM bandwidth bytes/s, ICI bandwidth bytes/s.
# v5p: cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s, ICI 4,800 Gbps);
# v6e: cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM, 1,640 GB/s, ICI 3,584 Gbps);
# v5e: cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s, ICI 1,600 Gbps);
# v4:  cloud.google.com/tpu/docs/v4  (275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s, ICI 2,400 Gbps).
CHIPS = {
  "v5p": {"peak_flops": 459e12, "hbm_bytes": 95 * 2**30, "hbm_bw": 2765e9, "ici_bw": 4800e9 / 8},
  "v6e": {"peak_flops": 918e12, "hbm_bytes": 32 * 2**30, "hbm_bw": 1640e9, "ici_bw": 3584e9 / 8},
  "v5e": {"peak_flops": 197e12, "hbm_bytes": 16 * 2**30, "hbm_bw": 819e9, "ici_bw": 1600e9 / 8},
  "v4": {"peak_flops": 275e12, "hbm_bytes": 32 * 2**30, "hbm_bw": 1200e9, "ici_bw": 2400e9 / 8},
}
# jax's topology names use these chip prefixes ("v5p:2x2x2", "v6e:2x4", "v5e:2x2", "v4:2x2x1").
_ALIASES = {"v5litepod": "v5e", "v6e": "v6e", "v5p": "v5p", "v5e": "v5e", "v4": "v4"}


class LibTPUMissing(RuntimeError):
  pass


def libtpu_path() -> str:
  """The libtpu.so to load, or LibTPUMissing with how to install it."""
  env = os.environ.get("TPU_LIBRARY_PATH")
  if env:
    if os.path.isfile(env):
      return env
    raise LibTPUMissing(f"TPU_LIBRARY_PATH={env} does not exist")
  site = os.environ.get("PIPO_TPU_SITE")
  if site:
    p = os.path.join(site, "libtpu", "libtpu.so")
    if os.path.isfile(p):
      return p
    raise LibTPUMissing(
      f"PIPO_TPU_SITE={site} holds no libtpu/libtpu.so: pip install --target {site} -r requirements-tpu.txt"
    )
  spec = importlib.util.find_spec("libtpu")
  if spec is not None and spec.submodule_search_locations:
    p = os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so")
    if os.path.isfile(p):
      return p
  raise LibTPUMissing(
    "libtpu is not installed: pip install --target DIR -r requirements-tpu.txt, then set "
    "PIPO_TPU_SITE=DIR (or TPU_LIBRARY_PATH=DIR/libtpu/libtpu.so)"
  )


def chip_of(topology: str) -> str:
  """'v5p:2x2x2' -> 'v5p'; one clear line for a name we have no chip figures for."""
  prefix = topology.split(":", 1)[0].lower()
  if ":" not in topology or prefix not in _ALIASES:
    raise ValueError(
      f"topology {topology!r}: expected CHIP:SHAPE with CHIP one of {sorted(CHIPS)}, "
      f"e.g. v5p:2x2x2 (8 chips) or v6e:2x4 (8 chips)"
    )
  return _ALIASES[prefix]


def topology_devices(topology: str) -> list:
  """Compile-only TPU devices of `topology` (one per chip), loading libtpu's compiler on first use."""
  chip_of(topology)
  os.environ["TPU_LIBRARY_PATH"] = libtpu_path()
  # Only the compiler is used: keep jax from starting a TPU *backend* with this library.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # libtpu takes /tmp/libtpu_lockfile, one process per TPU host; compiling needs no chip, so several planning
  # processes (pytest workers, a plan beside a test) may hold it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # libtpu's error for a bad shape is several lines; one is enough here
    raise ValueError(f"libtpu cannot make topology {topology!r}: {str(e).splitlines()[0][:200]}") from e
  return list(desc.devices)


def roofline(
  flops: float, hbm_bytes: float, collective_bytes: float, chip: str, model_flops: float | None = None
) -> dict:
  """Step-time estimate max(flops / peak, bytes / HBM bandwidth) per chip, and the utilisation it implies.

  flops / bytes are per chip and per step (trip-count corrected). The collectives' time over ICI is reported
  beside it, not added: XLA overlaps them with compute when it can, so it bounds, rather than adds to, the step.
  mfu uses model_flops (the useful work, without remat recompute) when given, else the compiled FLOPs (then
  it is a hardware-FLOPs utilisation).
  """
  c = CHIPS[chip]
  t_compute, t_memory = flops / c["peak_flops"], hbm_bytes / c["hbm_bw"]
  t = max(t_compute, t_memory)
  useful = flops if model_flops is None else model_flops
  return {
    "chip": chip,
    "peak_flops": c["peak_flops"],
    "hbm_bandwidth": c["hbm_bw"],
    "ici_bandwidth": c["ici_bw"],
    "compute_seconds": t_compute,
    "memory_seconds": t_memory,
    "step_seconds": t,
    "bound": "compute" if t_compute >= t_memory else "memory",
    "collective_seconds": collective_bytes / c["ici_bw"],
    "mfu": useful / (t * c["peak_flops"]) if t > 0 else 0.0,
  }


# ----------------------------------------------------------------------------------------------
# Inference: prefill and one decode step of the generation engine (pipo_jax.inference.api)
# ----------------------------------------------------------------------------------------------


def plan_inference(
  preset: str, mode: str, batch: int, context: int, topology: str, max_new: int = 128, dtype: str = "bfloat16"
) -> dict:
  """Per-chip memory, FLOPs, bytes and roofline of `api.prefill_fn` and of one step of `api.decode_fn`.

  The prompt is `context - 2 * max_new` tokens (pipo emits up to two tokens per step, so the caches, sized
  prompt + max_new steps, cover `context` tokens), left-padded, one bucket. Params (full PIPO tree for pipo,
  the AR subset for ar) are bf16, sharded by the training rules on a mesh of all chips on 'tensor' (the 4B/9B
  presets have 4 KV heads: up to 4 chips). The decode loop's trip count is data-dependent, so the decode
  figures are those of one iteration of its body (layer scans inside it multiplied out).
  """
  import dataclasses

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from pipo_jax import hlo_stats, memory_plan, sharding
  from pipo_jax.config import MeshConfig, ModelConfig, resolve_model_config
  from pipo_jax.inference import api
  from pipo_jax.inference.sampling import SamplingParams
  from pipo_jax.trainer import boxed_params

  chip = chip_of(topology)
  devices = topology_devices(topology)
  mc = dataclasses.replace(
    resolve_model_config(ModelConfig(preset=preset)), dtype=dtype, param_dtype=dtype, remat="none", scan_layers=True
  )
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=-1), devices)
  boxed = boxed_params(mc, "ar" if mode == "ar" else "sft")
  params = memory_plan._abstract(nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh))
  T = context - 2 * max_new
  if T <= 0 or T % 2:
    raise ValueError(f"context={context} must exceed 2 * max_new={2 * max_new} by an even prompt length")
  rep = NamedSharding(mesh, P())
  ids = jax.ShapeDtypeStruct((batch, T), jnp.int32, sharding=rep)
  valid = jax.ShapeDtypeStruct((batch, T), jnp.bool_, sharding=rep)
  stop = api.stop_id_array(mc, mode, None)
  stop = jax.ShapeDtypeStruct(stop.shape, stop.dtype, sharding=rep)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
  tau = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  static = dict(config=api._Static(mc), mode=mode, sp=SamplingParams(), max_new=max_new)
  c_chip = CHIPS[chip]
  out = {
    "preset": preset,
    "mode": mode,
    "batch": batch,
    "context": context,
    "prompt": T,
    "max_new": max_new,
    "topology": topology,
    "mesh": dict(mesh.shape),
    "dtype": dtype,
    "params_bytes": memory_plan.per_device_bytes(params),
    "hbm_bytes": c_chip["hbm_bytes"],
    "produced_by": f"XLA:TPU (libtpu) AOT compile for {topology}",
  }
  with sharding.use_rules(mesh):
    prefill = api.prefill_fn.lower(params, ids, valid, stop, key, tau, **static).compile()
    state_sh = prefill.output_shardings
    state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(lambda *a: api.prefill_fn(*a, **static), params, ids, valid, stop, key, tau),
      state_sh,
    )
    decode = api.decode_fn.lower(params, state, stop, tau, **static).compile()
  caches = {k: v for k, v in state.items() if k in ("cache", "mcache")}
  out["cache_bytes"] = memory_plan.per_device_bytes(caches)
  for name, compiled, tokens in (("prefill", prefill, batch * T), ("decode_step", decode, batch)):
    m = memory_plan._analysis_dict(compiled.memory_analysis())
    s = hlo_stats.analyze(compiled.as_text())
    coll = sum(c["bytes"] for c in s["collectives"].values())
    r = roofline(s["flops"], s["bytes"], coll, chip)
    m.update(
      flops=s["flops"],
      bytes_accessed=s["bytes"],
      collectives=s["collectives"],
      roofline=r,
      fits=bool(m["total_bytes"] <= c_chip["hbm_bytes"]),
      # tokens per second of the whole mesh at the roofline step time (decode: pipo emits 1-2 per row)
      tokens_per_second=tokens / r["step_seconds"] if r["step_seconds"] else None,
    )
    out[name] = m
  return out


def main(argv=None):
  import argparse
  import json

  ap = argparse.ArgumentParser(description="TPU AOT plan of generation: prefill + one decode step, per chip.")
  ap.add_argument("--preset", default="qwen3_5_4b")
  ap.add_argument("--mode", choices=("ar", "pipo"), default="pipo")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--context", type=int, default=32768)
  ap.add_argument("--max_new", type=int, default=128)
  ap.add_argument("--topology", default="v5p:2x2x1")
  ap.add_argument("--output", default="")
  a = ap.parse_args(argv)
  os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    p = plan_inference(a.preset, a.mode, a.batch, a.context, a.topology, a.max_new)
  except (ValueError, RuntimeError) as e:
    raise SystemExit(f"tpu_plan: {str(e).splitlines()[0]}") from None
  gib = 2**30
  print(
    f"{a.preset} {a.mode} batch {a.batch} context {a.context} on {a.topology} mesh {p['mesh']}: "
    f"params {p['params_bytes'] / gib:.2f} GiB + caches {p['cache_bytes'] / gib:.2f} GiB per chip"
  )
  for k in ("prefill", "decode_step"):
    m = p[k]
    print(
      f"  {k:11s} total {m['total_bytes'] / gib:7.2f} GiB per chip ({'fits' if m['fits'] else 'DOES NOT FIT'}), "
      f"{m['flops'] / 1e12:8.3f} TFLOP, {m['bytes_accessed'] / gib:7.2f} GiB accessed, roofline "
      f"{m['roofline']['step_seconds'] * 1e3:8.2f} ms ({m['roofline']['bound']}), "
      f"{m['tokens_per_second']:.0f} tok/s"
    )
  if a.output:
    with open(a.output, "w") as f:
      json.dump(p, f, indent=2)


if __name__ == "__main__":
  main()
