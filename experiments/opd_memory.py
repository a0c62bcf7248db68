"""Per-device memory of one OPD train step (4B student + LoRA r64, 9B teacher, bf16, remat) on 8 devices.

    python experiments/opd_memory.py                       # 32K tokens per rollout, fsdp=8
    python experiments/opd_memory.py --lengths 8192,16384,32768 --mesh data=1,fsdp=8

Each measurement runs in a fresh subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (8 simulated
CPU devices) and AOT-compiles the step from abstract shapes (`pipo_jax.opd.memory.opd_step_memory`): no weights
exist. Measured: the teacher scoring and the train step on an already rolled-out batch (teacher forward; student
forward, chunked OPD losses,
backward, AdamW update); the rollout's generation memory is NOT included. One rollout per device
(global batch = device count) of `length` tokens. Prints one JSON line per length and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(
  length: int, mesh: dict, student: str, teacher: str, rollouts_per_device: int, chunk: int, all_linear: bool = False
) -> dict:
  import jax

  from pipo_jax import sharding
  from pipo_jax.config import (
    Config,
    LoraConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OPDConfig,
    TrainConfig,
    resolve_model_config,
  )
  from pipo_jax.opd import memory as opd_memory

  cfg = Config(
    mode="opd",
    lora=LoraConfig(rank=64, alpha=128.0, dropout=0.05),
    loss=LossConfig(logits_chunk=chunk),
    opd=OPDConfig(divergence="topk", topk=32),
    train=TrainConfig(
      trainable=(
        "compressor",
        "confidence_head",
        "mtp/fc",
        "mtp/pre_fc_norm_embedding",
        "mtp/pre_fc_norm_hidden",
        "mtp/norm",
      )
    ),
  )
  s = opd_memory.with_dtype(resolve_model_config(ModelConfig(preset=student)))
  t = opd_memory.with_dtype(resolve_model_config(ModelConfig(preset=teacher)))
  if all_linear:  # diagnostic: every backbone layer GDN, i.e. no O(T^2) score buffers in the backbones
    import dataclasses

    from pipo_jax.config import LINEAR

    s = dataclasses.replace(s, layer_types=(LINEAR,) * s.num_hidden_layers)
    t = dataclasses.replace(t, layer_types=(LINEAR,) * t.num_hidden_layers)
  m = sharding.make_mesh(MeshConfig(**mesh))
  n = jax.device_count()
  t0 = time.time()
  out = opd_memory.opd_step_memory(cfg, s, t, m, batch_size=rollouts_per_device * n, length=length)
  out.update(
    length=length,
    mesh=dict(m.shape),
    devices=n,
    compile_s=round(time.time() - t0, 1),
    student=student,
    teacher=teacher,
    rollouts_per_device=rollouts_per_device,
    chunk=chunk,
    all_linear=all_linear,
  )
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--lengths", default="32768")
  ap.add_argument("--mesh", default="data=1,fsdp=8,tensor=1")
  ap.add_argument("--student", default="qwen3_5_4b")
  ap.add_argument("--teacher", default="qwen3_5_9b")
  ap.add_argument("--rollouts_per_device", type=int, default=1)
  ap.add_argument("--chunk", type=int, default=4096, help="tokens per LM-head chunk (the reference's 4096)")
  ap.add_argument(
    "--all_linear",
    action="store_true",
    help="diagnostic: make every backbone layer GDN (the MTP layer keeps its attention), to separate "
    "the O(T^2) attention-score buffers from the rest",
  )
  ap.add_argument("--one", action="store_true", help="(internal) measure in this process")
  a = ap.parse_args()
  mesh = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))}
  if a.one:
    print(
      "RESULT "
      + json.dumps(measure(int(a.lengths), mesh, a.student, a.teacher, a.rollouts_per_device, a.chunk, a.all_linear)),
      flush=True,
    )
    return
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  rows = []
  for length in [int(x) for x in a.lengths.split(",")]:
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--one",
      "--lengths",
      str(length),
      "--mesh",
      a.mesh,
      "--student",
      a.student,
      "--teacher",
      a.teacher,
      "--rollouts_per_device",
      str(a.rollouts_per_device),
      "--chunk",
      str(a.chunk),
    ] + (["--all_linear"] if a.all_linear else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
      print(p.stdout[-3000:], p.stderr[-5000:], file=sys.stderr)
      raise SystemExit(f"length {length}: measurement failed (rc {p.returncode})")
    r = json.loads(lines[-1][len("RESULT ") :])
    rows.append(r)
    print(json.dumps(r), flush=True)
  gib = 2.0**30
  print(f"\n{'tokens':>7} {'args GiB':>9} {'temp GiB':>9} {'total GiB':>10} {'compile s':>9}")
  for r in rows:
    print(
      f"{r['length']:>7} {r['argument'] / gib:>9.2f} {r['temp'] / gib:>9.2f} {r['total'] / gib:>10.2f} "
      f"{r['compile_s']:>9}"
    )


if __name__ == "__main__":
  main()
