"""SFT train-step time of model-config variants of one preset, measured in alternating rounds (CPU).

    JAX_PLATFORMS=cpu python experiments/sft_step_time.py --preset=demo_teacher --batch=16 --length=128 \\
        --variant=base: --variant=noscan:scan_layers=False --variant=gdn16:gdn_chunk_size=16

Each variant is the sft loss (mlp_residual compressor, full fine-tune, AdamW) jitted once; every round times
`--iters` steps of each variant in turn, so drifts of a shared machine hit all variants alike. Printed: the
median step time per variant per round, and its ratio to the first variant's in the same round; each round
also times this machine's fp32 2048^2 matmul peak (metrics.measure_matmul_peak), and every variant's model
FLOPs per step (flop_model.sft_loss, what MFU counts) are printed as a share of that round's peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# The two reference configurations (model overrides, batch, length). M is 3:1 hybrid like the real
# models; S is the demo teacher at its training shape.
CONFIGS = {
  "S": (dict(preset="demo_teacher"), 16, 128),
  "M": (
    dict(
      preset="demo_teacher",
      vocab_size=4096,
      hidden_size=256,
      intermediate_size=768,
      layer_types=("linear_attention",) * 3 + ("full_attention",),
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=64,
      linear_num_key_heads=2,
      linear_num_value_heads=4,
      linear_key_head_dim=64,
      linear_value_head_dim=64,
    ),
    4,
    1024,
  ),
}


def parse_variant(text: str) -> tuple[str, dict]:
  name, _, rest = text.partition(":")
  kw = {}
  for item in filter(None, rest.split(",")):
    k, v = item.split("=")
    kw[k] = {"True": True, "False": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)
  return name, kw


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", choices=sorted(CONFIGS), default="S", help="model, batch and length (CONFIGS)")
  ap.add_argument("--preset", help="another preset instead of --config's model")
  ap.add_argument("--batch", type=int, help="overrides --config's batch")
  ap.add_argument("--length", type=int, help="overrides --config's length")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--variant", action="append", default=[])
  a = ap.parse_args()
  import jax
  import numpy as np

  from pipo_jax import flop_model, metrics, objectives, optim
  from pipo_jax.config import LoraConfig, LossConfig, ModelConfig, OptimConfig, resolve_model_config
  from pipo_jax.models.pipo import init_pipo_params

  model_kw, batch_size, length = CONFIGS[a.config]
  if a.preset:
    model_kw = dict(preset=a.preset)
  a.batch, a.length = a.batch or batch_size, a.length or length
  variants = [parse_variant(v) for v in (a.variant or ["base:"])]
  print(f"config {a.config}: {model_kw}, batch {a.batch} x {a.length}", flush=True)
  rng = np.random.default_rng(0)
  steps = {}
  for name, kw in variants:
    mc = resolve_model_config(dataclasses.replace(ModelConfig(compressor_type="mlp_residual", **model_kw), **kw))
    ids = rng.integers(4, mc.vocab_size, (a.batch, a.length)).astype(np.int32)
    batch = {"input_ids": ids, "labels": ids.copy()}
    params = init_pipo_params(mc, jax.random.PRNGKey(0))
    mask = jax.tree_util.tree_map(lambda _: True, params)
    tx = optim.make_optimizer(OptimConfig(learning_rate=1e-3), 1000)
    state = optim.TrainState.create(params, mask, tx, jax.random.PRNGKey(1))
    step = jax.jit(
      optim.make_train_step(objectives.make_sft_loss(mc, LossConfig(logits_chunk=1024), LoraConfig())), donate_argnums=0
    )
    state, m = step(state, batch)
    jax.block_until_ready(m)
    trained = flop_model.trained_modules(state.trainable)
    flops = flop_model.sft_loss(mc, a.batch, a.length, trained, logits_chunk=1024).total
    steps[name] = [step, state, batch, flops]
  for r in range(a.rounds):
    med = {}
    peak = metrics.measure_matmul_peak()
    for name, _ in variants:
      step, state, batch, _ = steps[name]
      times = []
      for _ in range(a.iters):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
      steps[name][1] = state
      med[name] = float(np.median(times))
    base = med[variants[0][0]]
    print(
      f"round {r + 1} (matmul peak {peak / 1e9:.1f} GFLOP/s): "
      + ", ".join(
        f"{n} {1e3 * t:.1f} ms ({t / base:.2f}x, {100 * steps[n][3] / t / peak:.1f} % of peak)" for n, t in med.items()
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
