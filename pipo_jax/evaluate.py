"""Benchmark a checkpoint: k samples per question, rule grading, accuracy, lengths and speed -> report rows.

    python -m pipo_jax.evaluate --checkpoint=runs/demo/opd --tokenizer=runs/demo/data/tokenizer \\
        --benchmark=runs/demo/data/test.jsonl --decode=pipo --conf_threshold=0.95 --k=4 \\
        --method=PIPO+OPD --output=runs/demo/eval/opd.json [--random_pad_control]

Benchmarks are local JSONL files of {"question", "answer", "type"} (type "math" | "multiple_choice"), named by
their file stem. `--decode` and `--conf_threshold` take comma lists: every (decode, tau) pair is one row (tau
only matters for pipo). Each row holds avg@k, unbiased pass@k (per benchmark and overall), tokens / slots /
PADs per answer, the PAD ratio and effective tokens/s; `pipo_jax.make_report` turns row files into the report.

Definitions (also in the report):
  * tokens: real output ids (stop token included, PAD never); slots: decode steps (one pair per PIPO step);
  * PAD ratio (pipo): PAD slots / second-token slots written, i.e. the share of token2 decisions that came out
    PAD. tau < 0 gives 0 (PAD is never sampled); tau >= 1 gives exactly 1; 0 for the other decode modes;
  * effective tokens/s: real tokens / timed generation seconds (compilation excluded, prefill included).
Random-PAD control (`--random_pad_control`): for every pipo tau whose PAD ratio r is strictly between 0 and 1,
one more row decoded with token2 replaced by PAD by a coin flip with probability r (same model, same sampling,
`control="random_pad"`); at r = 0 or 1 the control is the gated decode itself. `--random_pad_ratio=r` runs one
control row at a given r instead.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

from pipo_jax import cli


def define_flags() -> None:
  """Defined only when run as a program, so the module can be imported next to other CLIs."""
  global _CKPT, _TOK, _BENCH, _DECODE, _TAU, _K, _METHOD, _OUT, _CONTROL, _RPAD, _MAX_Q, _MAX_NEW, _TEMP
  global _TOP_K, _TOP_P, _BATCH, _SEED
  _CKPT = flags.DEFINE_string("checkpoint", None, "orbax workdir / step dir or HF directory", required=True)
  _TOK = flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the checkpoint directory)")
  _BENCH = flags.DEFINE_list("benchmark", None, "benchmark JSONL file(s)", required=True)
  _DECODE = flags.DEFINE_list("decode", ["ar"], "decode mode(s): ar | mtp | mtp_spec | pipo")
  _TAU = flags.DEFINE_list("conf_threshold", ["0.95"], "pipo confidence threshold(s)")
  _K = flags.DEFINE_integer("k", 4, "samples per question")
  _METHOD = flags.DEFINE_list("method", [], "row label per decode mode (default: Regular / MTP / MTP-spec / PIPO)")
  _OUT = flags.DEFINE_string("output", None, "rows JSON file to write", required=True)
  _CONTROL = flags.DEFINE_boolean("random_pad_control", False, "add a random-PAD row at each pipo tau's PAD ratio")
  _RPAD = flags.DEFINE_float("random_pad_ratio", None, "pipo: run only the random-PAD control at this ratio")
  _MAX_Q = flags.DEFINE_integer("max_questions", 0, "first N questions per benchmark (0 = all)")
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "generated tokens per answer")
  _TEMP, _TOP_K, _TOP_P = cli.define_sampling_flags()
  _BATCH = flags.DEFINE_integer("batch_size", 100, "sequences per generate call")
  _SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


DEFAULT_METHOD = {"ar": "Regular", "mtp": "MTP", "mtp_spec": "MTP-spec", "pipo": "PIPO"}
TOKENS_PER_SLOT = {"ar": 1, "mtp": 2, "mtp_spec": 2, "pipo": 2}


def read_benchmark(path: str, max_questions: int = 0) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        r = json.loads(line)
        if "question" not in r or "answer" not in r:
          raise ValueError(f"{path}:{i}: a benchmark row needs 'question' and 'answer'")
        rows.append({"question": r["question"], "answer": str(r["answer"]), "type": r.get("type", "math")})
  return rows[:max_questions] if max_questions else rows


def benchmark_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def evaluate_one(
  model,
  benchmarks: dict,
  mode: str,
  k: int,
  sampling,
  tau: float | None,
  method: str,
  max_new_tokens: int,
  batch_size: int,
  seed: int,
  random_pad_ratio: float | None = None,
) -> dict:
  """One report row: every benchmark's questions x k samples in one sampling run (one timing)."""
  from pipo_jax.evaluation import batch_sampling, eval_metrics, grading

  names = list(benchmarks)
  questions = [q for n in names for q in benchmarks[n]]
  prompts = [[{"role": "user", "content": q["question"]}] for q in questions]
  t0 = time.perf_counter()
  run = batch_sampling.sample(
    model,
    prompts,
    k,
    mode,
    sampling,
    conf_threshold=-1.0 if tau is None else tau,
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
    seed=seed,
    random_pad_ratio=random_pad_ratio,
  )
  texts = [[s.text for s in per_q] for per_q in run.samples]
  correct = grading.grade_samples(texts, [q["answer"] for q in questions], [q["type"] for q in questions])
  by_bench, start = {}, 0
  for n in names:
    by_bench[n] = correct[start : start + len(benchmarks[n])]
    start += len(benchmarks[n])
  flat = [s for per_q in run.samples for s in per_q]
  lengths = [
    eval_metrics.LengthStats(
      n_tokens=len(s.tokens), n_pad=s.n_pad, n_slots=s.steps, tokens_per_slot=TOKENS_PER_SLOT[mode]
    )
    for s in flat
  ]
  token2 = sum(s.token2_slots for s in flat)
  pad_ratio = (sum(s.n_pad for s in flat) / token2 if token2 else 0.0) if mode == "pipo" else 0.0
  control = "random_pad" if random_pad_ratio is not None else None
  slots_by_bench, start = {}, 0
  for n in names:
    slots_by_bench[n] = [[s.steps for s in per_q] for per_q in run.samples[start : start + len(benchmarks[n])]]
    start += len(benchmarks[n])
  return eval_metrics.run_row(
    method,
    by_bench,
    lengths,
    wall_time_s=run.decode_s,
    conf_threshold=tau if mode == "pipo" else None,
    control=control,
    k=k,
    decode=mode,
    pad_ratio=pad_ratio,
    random_pad_ratio=random_pad_ratio,
    decode_s=run.decode_s,
    compile_s=run.compile_s,
    eval_s=time.perf_counter() - t0,
    max_new_tokens=max_new_tokens,
    truncated_rate=sum(len(s.tokens) >= max_new_tokens for s in flat) / len(flat),
    budget_curve=slot_budget_curve(by_bench, slots_by_bench, max_new_tokens, k),
    per_question_avg={n: np.asarray(c, float).mean(axis=1).tolist() for n, c in by_bench.items()},
    sampling={"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p},
  )


def slot_budget_curve(correct_by_bench: dict, slots_by_bench: dict, max_slots: int, k: int) -> dict:
  """{str(budget): {"avg_at_k", "pass_at_k"}} for slot budgets 1..max_slots: an answer counts only when it is
  correct and finished within the budget (the paper's Fig. 2; a PIPO slot holds one or two tokens). The overall
  value is the unweighted mean over benchmarks, as in the main table. Keys are strings so that a row equals
  itself after its JSON round trip."""
  from pipo_jax.evaluation import eval_metrics

  per = {
    n: eval_metrics.budget_metrics(correct_by_bench[n], slots_by_bench[n], range(1, max_slots + 1), k)
    for n in correct_by_bench
  }
  return {
    str(b): {key: float(np.mean([per[n][b][key] for n in per])) for key in ("avg_at_k", "pass_at_k")}
    for b in range(1, max_slots + 1)
  }


def run(
  checkpoint: str,
  tokenizer: str,
  benchmark_paths: Sequence[str],
  decodes: Sequence[str],
  taus: Sequence[float],
  k: int,
  output: str,
  methods: Sequence[str] = (),
  random_pad_control: bool = False,
  random_pad_ratio: float | None = None,
  max_questions: int = 0,
  max_new_tokens: int = 96,
  temperature: float | None = None,
  top_k: int | None = None,
  top_p: float | None = None,
  batch_size: int = 100,
  seed: int = 0,
  log=print,
) -> list[dict]:
  """Evaluate every (decode, tau) configuration; writes and returns the rows. Sampling settings left None come
  from the checkpoint's generation_config.json, else temperature 1 (avg@k needs samples)."""
  from pipo_jax.evaluation import batch_sampling
  from pipo_jax.inference import sampling

  if methods and len(methods) != len(decodes):
    raise ValueError(f"--method has {len(methods)} labels for {len(decodes)} decode modes")
  benchmarks = {benchmark_name(p): read_benchmark(p, max_questions) for p in benchmark_paths}
  model = batch_sampling.load(checkpoint, tokenizer)
  generation = model.generation or {}
  sp = sampling.resolve(generation, sampling.SAMPLED, temperature=temperature, top_k=top_k, top_p=top_p)
  log(f"[evaluate] {sampling.describe(sp, generation)}")
  kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
  rows = []
  for j, mode in enumerate(decodes):
    method = methods[j] if methods else DEFAULT_METHOD[mode]
    for tau in taus if mode == "pipo" else [None]:
      if random_pad_ratio is not None and mode == "pipo":
        configs = [(tau, random_pad_ratio)]
      else:
        configs = [(tau, None)]
      for t, rp in configs:
        row = evaluate_one(model, benchmarks, mode, k, sp, t, method, random_pad_ratio=rp, **kw)
        rows.append(row)
        log(_summary(row))
        r = row["pad_ratio"]
        if random_pad_control and mode == "pipo" and rp is None and 0.0 < r < 1.0:
          ctl = evaluate_one(model, benchmarks, mode, k, sp, t, method, random_pad_ratio=r, **kw)
          rows.append(ctl)
          log(_summary(ctl))
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(rows, f, indent=2, default=str)
  return rows


def _summary(row: dict) -> str:
  tag = f"{row['method']}" + (f" tau={row['conf_threshold']:g}" if row.get("conf_threshold") is not None else "")
  if row.get("control"):
    tag += f" (random PAD {row['random_pad_ratio']:.3f})"
  return (
    f"[evaluate] {tag}: avg@{row['k']}={100 * row['avg_at_k']:.1f}% pass@{row['k']}="
    f"{100 * row['pass_at_k']:.1f}% pad_ratio={row['pad_ratio']:.3f} tokens/answer="
    f"{row['tokens_per_answer']:.1f} slots/answer={row['slots_per_answer']:.1f} "
    f"eff_tok/s={row['effective_tokens_per_s']:.1f} ({row['decode_s']:.1f}s timed, {row['compile_s']:.1f}s "
    f"compile)"
  )


def main(argv):
  del argv
  run(
    _CKPT.value,
    _TOK.value,
    _BENCH.value,
    _DECODE.value,
    [float(t) for t in _TAU.value],
    _K.value,
    _OUT.value,
    _METHOD.value,
    _CONTROL.value,
    _RPAD.value,
    _MAX_Q.value,
    _MAX_NEW.value,
    _TEMP.value,
    _TOP_K.value,
    _TOP_P.value,
    _BATCH.value,
    _SEED.value,
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
