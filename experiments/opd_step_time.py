"""OPD vs SFT train-step time on the same tiny student (CPU), plus the OPD rollout time.

    JAX_PLATFORMS=cpu python experiments/opd_step_time.py [--batch 8 --prompt_length 32 --max_new_tokens 64]

Both steps are the trainers' jitted steps on one device at the same [B, T] (T = prompt_length +
2 * max_new_tokens, the OPD training length); the OPD step runs two chunked distillation streams on the
teacher's states, which its own program (the teacher scoring, timed apart; a tiny of the same size) computes
first. Times are medians over `--iters` runs after one warm-up (compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt_length", type=int, default=32)
  ap.add_argument("--max_new_tokens", type=int, default=64)
  ap.add_argument("--iters", type=int, default=10)
  a = ap.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pipo_jax import objectives, optim, sharding
  from pipo_jax.config import Config, LossConfig, MeshConfig, ModelConfig, OPDConfig, resolve_model_config
  from pipo_jax.models.pipo import init_pipo_params
  from pipo_jax.opd import loss as opd
  from pipo_jax.opd import rollout as opd_rollout

  mc = resolve_model_config(ModelConfig(preset="tiny", compressor_type="mlp_residual"))
  cfg = Config(
    mode="opd",
    loss=LossConfig(logits_chunk=256),
    opd=OPDConfig(prompt_length=a.prompt_length, max_new_tokens=a.max_new_tokens, conf_threshold=0.5),
  )
  T = opd_rollout.rollout_length(cfg.opd)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  params = init_pipo_params(mc, jax.random.PRNGKey(0))
  teacher = {"backbone": init_pipo_params(mc, jax.random.PRNGKey(1))["backbone"]}
  mask = jax.tree_util.tree_map(lambda _: True, params)
  tx = optim.make_optimizer(cfg.optim, 100)
  rng = np.random.default_rng(0)

  # One real rollout batch (for OPD) and an SFT batch of the same shape.
  P = a.prompt_length
  prompts = {
    "prompt_ids": rng.integers(4, 100, (a.batch, P)).astype(np.int32),
    "prompt_valid": np.ones((a.batch, P), bool),
  }
  roll = opd_rollout.Rollout(mc, cfg, mesh, stop_ids=[3])
  with sharding.use_rules(mesh):
    roll(params, prompts, jax.random.PRNGKey(0))  # compile
    t0 = time.perf_counter()
    host, _ = roll(params, prompts, jax.random.PRNGKey(1))
    t_roll = time.perf_counter() - t0
  opd_batch = {k: jnp.asarray(v) for k, v in host.items()}
  score = jax.jit(opd.make_teacher_fn(mc))
  opd_batch.update(score(teacher, opd_batch))
  w_t = opd.teacher_head(mc, teacher)
  ids = rng.integers(4, 100, (a.batch, T)).astype(np.int32)
  labels = ids.copy()
  labels[:, :P] = -100
  sft_batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}

  def median_s(fn, *args):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(a.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

  def bench(step, *args):
    state = optim.TrainState.create(jax.tree_util.tree_map(jnp.copy, params), mask, tx, jax.random.PRNGKey(2))
    state, m = step(state, *args)
    jax.block_until_ready(m)
    ts = []
    for _ in range(a.iters):
      t0 = time.perf_counter()
      state, m = step(state, *args)
      jax.block_until_ready(m)
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

  with sharding.use_rules(mesh):
    sft = jax.jit(optim.make_train_step(objectives.make_sft_loss(mc, cfg.loss, cfg.lora)), donate_argnums=0)
    opd_step = jax.jit(optim.make_train_step(opd.make_opd_loss(mc, mc, cfg.opd, cfg.loss, cfg.lora)), donate_argnums=0)
    t_sft = bench(sft, sft_batch)
    t_opd = bench(opd_step, opd_batch, w_t)
    t_teacher = median_s(score, teacher, opd_batch)
  print(
    f"tiny student, B={a.batch}, T={T}, {jax.devices()[0].platform}: SFT step {1e3 * t_sft:.1f} ms, "
    f"OPD step {1e3 * t_opd:.1f} ms ({t_opd / t_sft:.2f}x) + teacher scoring {1e3 * t_teacher:.1f} ms, "
    f"OPD rollout {1e3 * t_roll:.1f} ms "
    f"(max_new_tokens={a.max_new_tokens})"
  )


if __name__ == "__main__":
  main()
