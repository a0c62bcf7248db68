r"""Compile time and forward throughput of the Qwen35 backbone (default: the `qwen3_5_4b_narrow` preset,
the 4B layer structure at reduced width) on whatever JAX backend is present.

  python experiments/bench_backbone.py [--preset=qwen3_5_4b_narrow] [--batch_size=1] [--seq_len=256]
      [--iters=3] [--dtype=float32] [--scan_layers=true] [--decode_steps=8]

Prints: param count, compile time of the prefill forward (to post-norm hidden states and logits), its
median wall time and tokens/s, and the same for a single-token cached decode step.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pipo_jax.config import ModelConfig, resolve_model_config
from pipo_jax.models import qwen3_5

flags.DEFINE_string("preset", "qwen3_5_4b_narrow", "ModelConfig preset.")
flags.DEFINE_integer("batch_size", 1, "Sequences per forward.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("iters", 3, "Timed iterations (after the compiling one).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_bool("scan_layers", True, "Scan over layer groups (False: unrolled).")
flags.DEFINE_integer("decode_steps", 8, "Timed single-token decode steps (0 to skip).")
FLAGS = flags.FLAGS


def _timed(fn, *args, iters):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, first, float(np.median(times))


def main(argv):
  del argv
  cfg = resolve_model_config(ModelConfig(preset=FLAGS.preset, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers))
  model = qwen3_5.Qwen35(cfg)
  B, T = FLAGS.batch_size, FLAGS.seq_len
  params = jax.jit(lambda k: qwen3_5.init_params(cfg, k))(jax.random.PRNGKey(0))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  group, repeats = cfg.layer_pattern()
  print(
    f"backend={jax.default_backend()} devices={len(jax.devices())} preset={FLAGS.preset} "
    f"params={n_params / 1e6:.1f}M layers={cfg.num_hidden_layers} (group {len(group)} x {repeats}) "
    f"dtype={cfg.dtype} scan={cfg.scan_layers} B={B} T={T}"
  )

  @jax.jit
  def forward(params, ids, cache):
    v = {"params": params}
    pos = jnp.broadcast_to(cache["index"] + jnp.arange(ids.shape[1]), ids.shape)
    h, cache = model.apply(v, model.apply(v, ids, method=model.embed), pos, None, cache)
    return model.apply(v, h[:, -1:], method=model.logits), cache

  ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)), jnp.int32)
  max_len = T + max(FLAGS.decode_steps, 1)
  cache0 = qwen3_5.init_cache(cfg, B, max_len)
  t0 = time.perf_counter()
  prefill = forward.lower(params, ids, cache0).compile()
  print(f"prefill compile: {time.perf_counter() - t0:.2f} s")
  (_, cache), _, dt = _timed(prefill, params, ids, cache0, iters=FLAGS.iters)
  print(f"prefill forward: {dt * 1e3:.1f} ms median -> {B * T / dt:,.0f} tokens/s")

  if FLAGS.decode_steps:
    tok = ids[:, -1:]
    t0 = time.perf_counter()
    step = forward.lower(params, tok, cache).compile()
    print(f"decode-step compile: {time.perf_counter() - t0:.2f} s")
    times = []
    for _ in range(FLAGS.decode_steps):
      t0 = time.perf_counter()
      _, cache = jax.block_until_ready(step(params, tok, cache))
      times.append(time.perf_counter() - t0)
    dt = float(np.median(times[1:] if len(times) > 1 else times))
    print(f"decode step: {dt * 1e3:.1f} ms median -> {B / dt:,.1f} tokens/s")


if __name__ == "__main__":
  app.run(main)
