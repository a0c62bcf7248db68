r"""Decode-speed benchmark: TTFT, time per step and effective (non-PAD) tokens per second of every mode.

  python -m pipo_jax.bench --checkpoint=DIR --prompt_len=512 --batch_size=1 \
      --decode=ar,pipo,mtp,mtp_spec --conf_threshold=0.95 --new_tokens=64 --output=bench.json
  python -m pipo_jax.bench --preset=qwen3_5_4b_narrow ...   (random-initialised model of a preset)

DIR: an orbax workdir / step dir or an HF directory (plain Qwen3.5 or PIPO), loaded as every CLI loads it
(pipo_jax.io.loading.load_for_cli; --pad_token_id when neither config.json nor a tokenizer names PAD).

Prompts are random ids, no stop ids (every row runs the whole budget). Compilation and a warm-up run are
excluded. Timing is in rounds: each round times every mode in turn, back to back, so a slow drift of a shared
machine hits all modes of a round alike; a mode's window in a round repeats its call until it lasts
--min_window_s (the time per call is the window's mean). Every figure is the median over --repeats rounds with
its min-max spread; a speed-up is the median of the per-round ratios to `ar` of the same round. ttft_s times
the jitted prefill (prompt pass and first output step); step_s = (time of the jitted token loop) / (decode
steps). effective_tokens_per_s counts non-PAD tokens emitted by the loop over the whole batch. With random
weights the pipo confidence head is meaningless, so pipo is also measured at tau = -1 (every token2 kept: 2
tokens per step) and tau = 1 (phase 2 skipped: 1 token per step), the two bounds. The matmul-FLOP bound of the
pipo/ar speed-up is printed and stored. A PNG plot is written next to --output.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from pipo_jax import cli
from pipo_jax.inference import flops
from pipo_jax.inference.api import MODES, _check_mode, _Static, decode_fn, params_for_backend, prefill_fn, stop_id_array
from pipo_jax.inference.pipo_decode import PHASE2_LOOPS, phase2_case
from pipo_jax.inference.sampling import SamplingParams
from pipo_jax.io import loading
from pipo_jax.metrics import median_spread

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined by `cli.run`, only when this module is the program)."""
  flags.DEFINE_string("checkpoint", "", "orbax workdir / step dir, or HF directory (plain Qwen3.5 or PIPO)")
  flags.DEFINE_string("preset", "", "without --checkpoint: a preset of pipo_jax.config.PRESETS, random init")
  flags.DEFINE_string(
    "tokenizer", "", "directory with tokenizer.json, for the PAD id (default: found with the checkpoint)"
  )
  flags.DEFINE_integer("pad_token_id", None, "PAD id when neither config.json nor the tokenizer names one")
  flags.DEFINE_integer("prompt_len", 512, "prompt tokens")
  flags.DEFINE_integer("batch_size", 1, "rows")
  flags.DEFINE_list("decode", ["ar", "pipo", "mtp", "mtp_spec"], "modes to measure (ar is always measured)")
  flags.DEFINE_float("conf_threshold", 0.95, "pipo tau")
  flags.DEFINE_integer("new_tokens", 64, "max_new_tokens (non-PAD tokens) per row")
  flags.DEFINE_integer("repeats", 5, "timed rounds (each times every mode once); figures are medians over rounds")
  flags.DEFINE_float("min_window_s", 0.2, "a mode's timed window in a round repeats its call until it lasts this long")
  flags.DEFINE_string("output", "bench.json", "JSON records; the plot goes to the same path with .png")
  flags.DEFINE_integer("seed", 0, "prompt and init seed")


def timed_window(fn, min_window_s: float) -> float:
  """Seconds per call of fn, from one window that repeats the call until it has lasted min_window_s (at least
  one call)."""
  calls, seconds = 0, 0.0
  while calls == 0 or seconds < min_window_s:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    seconds += time.perf_counter() - t0
    calls += 1
  return seconds / calls


def with_spread(rec: dict, per_round: dict) -> dict:
  """rec plus, for each name -> per-round values: the median as `name` and the spread as `name_min` / `name_max`."""
  out = dict(rec)
  for name, values in per_round.items():
    out[name], out[name + "_min"], out[name + "_max"] = median_spread(values)
  return out


def prepare(config, params, mode: str, tau: float, prompt_len: int, batch: int, new_tokens: int, seed: int = 0):
  """Compile and warm up one mode -> (record of its token counts, prefill thunk, decode thunk). Greedy
  decoding with no stop ids emits the same tokens on every call, so the counts hold for every timed run."""
  _check_mode(mode, config)
  params = params_for_backend(config, params)
  ids = jax.random.randint(jax.random.PRNGKey(seed), (batch, prompt_len), 2, config.vocab_size, jnp.int32)
  valid = jnp.ones(ids.shape, bool)
  stop = stop_id_array(config, mode, [])
  kw = dict(config=_Static(config), mode=mode, sp=SamplingParams(), max_new=new_tokens)
  tau_a = jnp.float32(tau)
  rng = jax.random.PRNGKey(seed)

  def prefill():
    return prefill_fn(params, ids, valid, stop, rng, tau_a, **kw)

  state = jax.block_until_ready(prefill())

  def decode():
    return decode_fn(params, state, stop, tau_a, **kw)

  res = jax.block_until_ready(decode())
  steps = np.asarray(res.steps) - 1  # decode steps (the prefill emitted the first token(s))
  loop_tokens = np.asarray(res.tokens_emitted) - np.asarray(state["out"]["count_B"])
  rec = {
    "mode": mode,
    "conf_threshold": tau if mode == "pipo" else None,
    "prompt_len": prompt_len,
    "batch_size": batch,
    "new_tokens": new_tokens,
    "decode_steps": max(int(steps.max()), 1),
    "loop_tokens": int(loop_tokens.sum()),
    "tokens_per_step": float(loop_tokens.sum() / max(steps.sum(), 1)),
    "pad_ratio": float(np.mean(np.asarray(res.pad_ratio))),
    "draft_acceptance": (
      float(np.asarray(res.drafts_kept).sum() / max(np.asarray(res.drafts_proposed).sum(), 1)) if mode != "ar" else None
    ),
    "phase2_runs": int(res.phase2_runs) if mode == "pipo" else None,
  }
  return rec, prefill, decode


def summarize(rec: dict, ttft_rounds, loop_rounds, ar: dict, ar_ttft_rounds, ar_loop_rounds) -> dict:
  """A prepared record with its timing fields, from per-round seconds of its prefill and token loop and of
  ar's (`ar` its prepared record) in the same rounds: each field is the median over rounds, "<field>_min" /
  "<field>_max" its spread. Speed-ups are per-round ratios, so the median ratio is not a ratio of medians."""
  ttft, loop = np.asarray(ttft_rounds, float), np.asarray(loop_rounds, float)
  ar_ttft, ar_loop = np.asarray(ar_ttft_rounds, float), np.asarray(ar_loop_rounds, float)
  per_round = {
    "ttft_s": ttft,
    "step_s": loop / rec["decode_steps"],
    "effective_tokens_per_s": rec["loop_tokens"] / loop,
    "speedup_ttft_vs_ar": ar_ttft / ttft,
    "speedup_step_vs_ar": (ar_loop / ar["decode_steps"]) / (loop / rec["decode_steps"]),
    "speedup_effective_vs_ar": (rec["loop_tokens"] / loop) / (ar["loop_tokens"] / ar_loop),
  }
  return with_spread(dict(rec, rounds=len(loop)), per_round)


def plot(records: list, path: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = [r["mode"] + (f"\ntau={r['conf_threshold']:g}" if r["conf_threshold"] is not None else "") for r in records]
  x = np.arange(len(records))
  fig, ax = plt.subplots(figsize=(1.6 * len(records) + 2, 4))
  for dx, name, label in ((-0.2, "effective", "effective tokens/s vs ar"), (0.2, "ttft", "TTFT speed-up vs ar")):
    med = np.array([r[f"speedup_{name}_vs_ar"] for r in records])
    lo = med - np.array([r[f"speedup_{name}_vs_ar_min"] for r in records])
    hi = np.array([r[f"speedup_{name}_vs_ar_max"] for r in records]) - med
    ax.bar(x + dx, med, 0.4, yerr=np.stack([lo, hi]), capsize=3, label=label + " (median, min-max)")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(x, labels)
  r0 = records[0]
  ax.set_title(f"prompt {r0['prompt_len']}, batch {r0['batch_size']}, {r0['new_tokens']} new tokens")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# flops.per_step's entry for each of pipo_decode.PHASE2_LOOPS, by loop name (not by position, so a reordered
# PHASE2_LOOPS cannot silently pair a loop with another loop's FLOPs).
PIPO_STEP_FLOPS = {"off": "pipo_tau_ge_1", "ungated": "pipo_tau_le_0", "gated": "pipo_tau_lt_1"}


def flop_model_speedup(per_step: dict, rec: dict):
  """Effective pipo/ar speed-up if step time were proportional to matmul FLOPs: the record's measured
  tokens per step over ar's, times FLOPs(ar step) / FLOPs(its step). None for modes the model does not cover."""
  if rec["mode"] == "ar":
    return 1.0
  if rec["mode"] != "pipo":
    return None
  pipo = per_step[PIPO_STEP_FLOPS[PHASE2_LOOPS[int(phase2_case(rec["conf_threshold"]))]]]
  return rec["tokens_per_step"] * per_step["ar"] / pipo


def run(
  config,
  params,
  modes,
  tau,
  prompt_len,
  batch,
  new_tokens,
  repeats,
  random_init: bool,
  seed=0,
  min_window_s: float = 0.0,
  log=logging.info,
) -> dict:
  for m in modes:
    if m not in MODES:
      raise ValueError(f"--decode: unknown mode {m!r}; expected some of {MODES}")
  if repeats < 1:
    raise ValueError(f"--repeats={repeats}: expected >= 1")
  plan = [("ar", None)]
  for m in modes:
    if m == "pipo":
      taus = [tau] + ([-1.0, 1.0] if random_init else [])
      plan += [("pipo", t) for t in dict.fromkeys(taus)]
    elif m != "ar":
      plan.append((m, None))
  params = params_for_backend(config, params)  # once, not per mode (prepare leaves it as it is)
  cases = []
  for m, t in plan:
    log(f"[bench] compiling {m}" + ("" if t is None else f" tau={t:g}"))
    cases.append(prepare(config, params, m, -1.0 if t is None else t, prompt_len, batch, new_tokens, seed))
  ttft = [[] for _ in cases]
  loop = [[] for _ in cases]
  for r in range(repeats):
    for i, (_, prefill, decode) in enumerate(cases):
      ttft[i].append(timed_window(prefill, min_window_s))
      loop[i].append(timed_window(decode, min_window_s))
    log(
      f"[bench] round {r + 1}/{repeats}: step ms "
      + ", ".join(f"{1e3 * lp[-1] / c[0]['decode_steps']:.3f}" for lp, c in zip(loop, cases))
    )
  ar = cases[0][0]
  records = [summarize(c[0], ttft[i], loop[i], ar, ttft[0], loop[0]) for i, c in enumerate(cases)]
  bound = flops.per_step(config, prompt_len + new_tokens // 2)
  for r in records:
    r["flop_model_speedup"] = flop_model_speedup(bound, r)
  return {"records": records, "flops_per_step": bound, "device": str(jax.devices()[0])}


def _with_spread(rec: dict, name: str, fmt: str, scale: float = 1.0) -> str:
  lo, hi = rec[name + "_min"] * scale, rec[name + "_max"] * scale
  return f"{rec[name] * scale:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"


def main(argv):
  del argv
  m = loading.load_for_cli(
    FLAGS.checkpoint,
    FLAGS.tokenizer,
    FLAGS.preset,
    FLAGS.seed,
    pad_token_id=FLAGS.pad_token_id,
    need_pad="pipo" in FLAGS.decode,
  )
  out = run(
    m.config,
    m.params,
    FLAGS.decode,
    FLAGS.conf_threshold,
    FLAGS.prompt_len,
    FLAGS.batch_size,
    FLAGS.new_tokens,
    FLAGS.repeats,
    random_init=not FLAGS.checkpoint,
    seed=FLAGS.seed,
    min_window_s=FLAGS.min_window_s,
  )
  b = out["flops_per_step"]
  print(
    f"matmul-FLOP model of the pipo/ar effective speed-up (what a compute-bound decode would reach; "
    f"small-batch decode is bandwidth-bound, so measured eff_x may exceed it): "
    f"tau>=1: {b['bound_tau_ge_1']:.3f}x, tau<=0 (ungated): {b['bound_tau_le_0']:.3f}x, "
    f"tau<1 all drafts kept: {b['bound_tau_lt_1_all_kept']:.3f}x, "
    f"tau<1 none kept: {b['bound_tau_lt_1_none_kept']:.3f}x"
  )
  print(f"median over {FLAGS.repeats} rounds (min-max over rounds in brackets)")
  for r in out["records"]:
    tau = "" if r["conf_threshold"] is None else f" tau={r['conf_threshold']:g}"
    acc = "" if r["draft_acceptance"] is None else f" acceptance={r['draft_acceptance']:.3f}"
    fm = "" if r["flop_model_speedup"] is None else f" flop_model_x={r['flop_model_speedup']:.2f}"
    print(
      f"{r['mode']:9s}{tau:10s} ttft={_with_spread(r, 'ttft_s', '.2f', 1e3)}ms "
      f"step={_with_spread(r, 'step_s', '.3f', 1e3)}ms tokens/step={r['tokens_per_step']:.2f} "
      f"eff_x={_with_spread(r, 'speedup_effective_vs_ar', '.2f')} step_x={r['speedup_step_vs_ar']:.2f} "
      f"ttft_x={r['speedup_ttft_vs_ar']:.2f}{fm}{acc}"
    )
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w") as f:
    json.dump(out, f, indent=1)
  plot(out["records"], os.path.splitext(FLAGS.output)[0] + ".png")


if __name__ == "__main__":
  cli.run(main, define_flags)
