"""What a decode matmul costs at 1, 2 and 4 rows: why a two-position step (mtp, mtp_spec) is not almost free on CPU.

  python experiments/decode_row_cost.py [--preset=demo_teacher] [--rows=1,2,4] [--rounds=7]

Times a compiled loop of chained [rows, D] x [D, F] and [rows, F] x [F, D] products at the preset's hidden and
MLP widths (each product's input depends on the previous output, so nothing is hoisted), in interleaved rounds,
and prints microseconds per product, median (min-max), and the ratio to one row. A decode step at batch b and
T positions runs its weight products at b * T rows: on a memory-bound device a second row is nearly free (the
weights are read once), which is what makes a two-token step pay; where the per-product cost grows with the
rows instead, a step at two positions costs that much more than a step at one.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipo_jax.config import ModelConfig, resolve_model_config

PRODUCTS_PER_ITERATION = 16
ITERATIONS = 200


def chained_products(rows: int, D: int, F: int):
  """jitted fn() running ITERATIONS x PRODUCTS_PER_ITERATION dependent products at `rows` rows."""
  keys = jax.random.split(jax.random.PRNGKey(0), PRODUCTS_PER_ITERATION + 1)
  up_DF = [jax.random.normal(k, (D, F)) * D**-0.5 for k in keys[: PRODUCTS_PER_ITERATION // 2]]
  down_FD = [jax.random.normal(k, (F, D)) * F**-0.5 for k in keys[PRODUCTS_PER_ITERATION // 2 : -1]]
  x_RD = jax.random.normal(keys[-1], (rows, D))

  def body(_, x_RD):
    for up, down in zip(up_DF, down_FD):
      x_RD = jnp.tanh(jnp.tanh(x_RD @ up) @ down)
    return x_RD

  return jax.jit(lambda: jax.lax.fori_loop(0, ITERATIONS, body, x_RD))


def per_product_us(fn, min_window_s: float) -> float:
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < min_window_s:
    jax.block_until_ready(fn())
    n += 1
  return (time.perf_counter() - t0) / n / (ITERATIONS * PRODUCTS_PER_ITERATION) * 1e6


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="demo_teacher")
  ap.add_argument("--rows", default="1,2,4")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--min_window_s", type=float, default=0.3)
  a = ap.parse_args(argv)
  cfg = resolve_model_config(ModelConfig(preset=a.preset))
  D, F = cfg.hidden_size, cfg.intermediate_size
  rows = [int(r) for r in a.rows.split(",")]
  fns = {r: chained_products(r, D, F) for r in rows}
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile + warm-up
  times = {r: [] for r in rows}
  for _ in range(a.rounds):
    for r, fn in fns.items():
      times[r].append(per_product_us(fn, a.min_window_s))
  print(f"{a.preset}: [rows, {D}] x [{D}, {F}] and back, {jax.default_backend()}, {a.rounds} rounds")
  base = np.asarray(times[rows[0]])
  for r in rows:
    t = np.asarray(times[r])
    ratio = t / base  # per-round ratios: the machine's drift cancels within a round
    print(
      f"  rows {r:3d}: {np.median(t):6.2f} us per product ({t.min():.2f}-{t.max():.2f}), "
      f"x{np.median(ratio):.2f} ({ratio.min():.2f}-{ratio.max():.2f}) of rows {rows[0]}"
    )


if __name__ == "__main__":
  main()
