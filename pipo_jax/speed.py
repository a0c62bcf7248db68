"""Decode speed-ups with their spread: every method timed in turn, several rounds, in one process.

    python -m pipo_jax.speed --tokenizer=runs/demo/data/tokenizer --benchmark=runs/demo/data/test.jsonl \\
        --run=Regular=runs/demo/teacher:ar --run=PIPO+OPD=runs/demo/opd:pipo@0.95 --baseline=Regular \\
        --repeats=5 --output=runs/demo/eval/speed.json

A run's label is LABEL, or LABEL@TAU when it has a τ (`--baseline` names a label).

Each round decodes the same prompts (every benchmark question x k, fixed seed, so every round produces the same
tokens and only the clock differs) once per method, methods back to back; effective tokens/s = real (non-PAD)
tokens / timed seconds (compilation excluded, prefill included, as `evaluate`). The speed-up of a method in a
round is its tokens/s over the baseline's in the same round, so slow drifts of a shared machine cancel; the
report gives the median over rounds and the min-max spread. Rows written: {"method", "decode", "tau",
"effective_tokens_per_s": [per round], "speedup": [per round], "speedup_median", "speedup_min", "speedup_max",
"tokens", "seconds" (totals over all rounds)}. `--min_window_s` repeats a method's decode within a round until its
timed window lasts that long, so that one window's jitter does not set the round's ratio.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from pipo_jax import cli
from pipo_jax.metrics import median_spread


@dataclasses.dataclass(frozen=True)
class RunSpec:
  method: str
  checkpoint: str
  decode: str
  tau: float | None = None

  @staticmethod
  def parse(text: str) -> RunSpec:
    """ "LABEL=CHECKPOINT:DECODE[@TAU]", e.g. "PIPO+OPD=runs/demo/opd:pipo@0.95"."""
    try:
      method, rest = text.split("=", 1)
      checkpoint, decode = rest.rsplit(":", 1)
      tau = None
      if "@" in decode:
        decode, t = decode.split("@", 1)
        tau = float(t)
    except ValueError:
      raise ValueError(f"--run={text!r}: expected LABEL=CHECKPOINT:DECODE[@TAU]") from None
    if decode not in ("ar", "mtp", "mtp_spec", "pipo"):
      raise ValueError(f"--run={text!r}: unknown decode {decode!r}")
    return RunSpec(method, checkpoint, decode, tau)

  @property
  def label(self) -> str:
    """Unique per run: the method, with its τ when it has one (one method may be timed at several τ)."""
    return self.method if self.tau is None else f"{self.method}@{self.tau:g}"


def speedup_stats(tps_by_method: dict, baseline: str) -> dict:
  """Per-round ratios to the baseline -> {method: (ratios, median, min, max)}. tps lists are [rounds]."""
  base = np.asarray(tps_by_method[baseline], float)
  out = {}
  for m, tps in tps_by_method.items():
    r = np.asarray(tps, float) / base
    out[m] = (r.tolist(), *median_spread(r))
  return out


def measure(
  specs: Sequence[RunSpec],
  tokenizer: str,
  prompts: Sequence[list],
  k: int,
  sampling_flags: dict,
  repeats: int,
  max_new_tokens: int,
  batch_size: int,
  baseline: str,
  seed: int = 0,
  log=print,
  min_window_s: float = 0.0,
) -> list[dict]:
  from pipo_jax.evaluation import batch_sampling
  from pipo_jax.inference import sampling as sampling_lib

  specs = list(specs)
  if baseline not in [s.label for s in specs]:
    raise ValueError(f"--baseline={baseline!r} is not one of the runs' labels {[s.label for s in specs]}")
  models = {}
  for s in specs:
    if s.checkpoint not in models:
      models[s.checkpoint] = batch_sampling.load(s.checkpoint, tokenizer)
  # Every run samples alike, with the baseline checkpoint's generation_config.json under the flags.
  generation = models[next(s.checkpoint for s in specs if s.label == baseline)].generation or {}
  sampling = sampling_lib.resolve(generation, sampling_lib.SAMPLED, **sampling_flags)
  log(f"[speed] {sampling_lib.describe(sampling, generation)}")
  tps = {s.label: [] for s in specs}
  totals = {s.label: (0, 0.0) for s in specs}
  for r in range(repeats):
    for s in specs:
      # One timed window: the same decode repeated until it has run min_window_s (at least once). A window of
      # a few seconds carries the machine's jitter straight into the round's ratio.
      n_tok, seconds = 0, 0.0
      while n_tok == 0 or seconds < min_window_s:
        run = batch_sampling.sample(
          models[s.checkpoint],
          prompts,
          k,
          s.decode,
          sampling,
          conf_threshold=-1.0 if s.tau is None else s.tau,
          max_new_tokens=max_new_tokens,
          batch_size=batch_size,
          seed=seed,
        )
        n_tok += sum(len(x.tokens) for per_q in run.samples for x in per_q)
        seconds += run.decode_s
      tps[s.label].append(n_tok / seconds)
      totals[s.label] = (totals[s.label][0] + n_tok, totals[s.label][1] + seconds)
    log(f"[speed] round {r + 1}/{repeats}: " + ", ".join(f"{m} {v[-1]:.0f} tok/s" for m, v in tps.items()))
  stats = speedup_stats(tps, baseline)
  rows = []
  for s in specs:
    ratios, med, lo, hi = stats[s.label]
    rows.append(
      {
        "method": s.method,
        "decode": s.decode,
        "tau": s.tau,
        "checkpoint": s.checkpoint,
        "effective_tokens_per_s": tps[s.label],
        "speedup": ratios,
        "speedup_median": med,
        "speedup_min": lo,
        "speedup_max": hi,
        "tokens": totals[s.label][0],
        "seconds": totals[s.label][1],
        "repeats": repeats,
        "baseline": baseline,
      }
    )
    log(
      f"[speed] {s.label}: {med:.2f}x (min {lo:.2f}, max {hi:.2f}) vs {baseline}, {np.median(tps[s.label]):.0f} tok/s"
    )
  return rows


def define_flags() -> None:
  """Defined only when run as a program, so the module can be imported next to other CLIs."""
  from absl import flags

  global _RUN, _TOK, _BENCH, _BASE, _REPEATS, _K, _OUT, _MAX_NEW, _TEMP, _TOP_K, _TOP_P, _BATCH, _SEED, _MAX_Q, _WINDOW
  _RUN = flags.DEFINE_multi_string("run", None, "LABEL=CHECKPOINT:DECODE[@TAU], repeatable", required=True)
  _TOK = flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: each checkpoint's)")
  _BENCH = flags.DEFINE_list(
    "benchmark", None, "benchmark JSONL file(s) whose questions are the prompts", required=True
  )
  _BASE = flags.DEFINE_string("baseline", "Regular", "label of the run the speed-ups are relative to")
  _REPEATS = flags.DEFINE_integer("repeats", 5, "timed rounds (each decodes every prompt once per method)")
  _WINDOW = flags.DEFINE_float(
    "min_window_s", 0.0, "a method's timed window in a round repeats its decode until it lasts this long"
  )
  _K = flags.DEFINE_integer("k", 4, "samples per question in a round")
  _OUT = flags.DEFINE_string("output", None, "rows JSON file", required=True)
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "generated tokens per answer")
  _TEMP, _TOP_K, _TOP_P = cli.define_sampling_flags()
  _BATCH = flags.DEFINE_integer("batch_size", 100, "sequences per generate call")
  _SEED = flags.DEFINE_integer("seed", 0, "sampling seed (the same in every round)")
  _MAX_Q = flags.DEFINE_integer("max_questions", 0, "first N questions per benchmark (0 = all)")


def main(argv) -> None:
  del argv
  from pipo_jax.evaluate import read_benchmark

  specs = [RunSpec.parse(r) for r in _RUN.value]
  prompts = [
    [{"role": "user", "content": q["question"]}] for p in _BENCH.value for q in read_benchmark(p, _MAX_Q.value)
  ]
  sampling_flags = dict(temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  rows = measure(
    specs,
    _TOK.value,
    prompts,
    _K.value,
    sampling_flags,
    _REPEATS.value,
    _MAX_NEW.value,
    _BATCH.value,
    _BASE.value,
    _SEED.value,
    min_window_s=_WINDOW.value,
  )
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  cli.run(main, define_flags)
