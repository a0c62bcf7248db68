"""Teacher rollouts -> the student's SFT data and graded OPD prompts.

    python -m pipo_jax.rollout --checkpoint=runs/demo/teacher --tokenizer=runs/demo/data/tokenizer \\
        --prompts=runs/demo/data/opd.jsonl --n=4 --output_sft=runs/demo/rollout/sft.jsonl \\
        --output_opd=runs/demo/rollout/opd.jsonl --min_pass_rate=0.25

Samples n responses per prompt with regular (ar) decoding, grades each by rule (pipo_jax.evaluation.grading) against the
prompt's answer, and writes
  * output_sft: every correct response, reference `messages` schema
    {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "<think>\\n..."}]};
  * output_opd: the prompts with pass_rate = correct / n >= min_pass_rate, OPD prompt schema
    {"messages": [user], "source", "source_index", "answer", "pass_rate"}.
Prompt files: OPD prompt rows ({"messages", "answer"}) or benchmark rows ({"question", "answer", "type"}).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from pipo_jax import cli


def define_flags() -> None:
  """Defined only when run as a program, so the module can be imported next to other CLIs."""
  global _CKPT, _TOK, _PROMPTS, _N, _OUT_SFT, _OUT_OPD, _RHO, _MAX_PROMPTS, _MAX_NEW, _TEMP, _TOP_K, _TOP_P
  global _BATCH, _SEED
  _CKPT = flags.DEFINE_string("checkpoint", None, "teacher: orbax workdir / step dir, or HF directory", required=True)
  _TOK = flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the checkpoint directory)")
  _PROMPTS = flags.DEFINE_string("prompts", None, "prompt JSONL with answers", required=True)
  _N = flags.DEFINE_integer("n", 4, "responses per prompt")
  _OUT_SFT = flags.DEFINE_string("output_sft", None, "SFT JSONL of the correct responses", required=True)
  _OUT_OPD = flags.DEFINE_string("output_opd", "", "OPD prompt JSONL with pass rates ('' = do not write)")
  _RHO = flags.DEFINE_float("min_pass_rate", 0.0, "keep OPD prompts with pass_rate >= this")
  _MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 0, "use only the first N prompts (0 = all)")
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "generated tokens per response")
  _TEMP, _TOP_K, _TOP_P = cli.define_sampling_flags()
  _BATCH = flags.DEFINE_integer("batch_size", 64, "sequences per generate call")
  _SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def read_prompts(path: str) -> list[dict]:
  """Rows with `messages` (user turn) and `answer`, from either accepted schema."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      r = json.loads(line)
      if "question" in r:
        r = {
          "messages": [{"role": "user", "content": r["question"]}],
          "answer": r["answer"],
          "type": r.get("type", "math"),
          "source_index": i - 1,
        }
      if "messages" not in r or "answer" not in r:
        raise ValueError(f"{path}:{i}: a prompt row needs 'messages' (or 'question') and 'answer'")
      rows.append(r)
  return rows


def _write_jsonl(path: str, rows) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def run(
  checkpoint,
  tokenizer,
  prompts_path,
  n,
  output_sft,
  output_opd,
  min_pass_rate,
  max_prompts=0,
  max_new_tokens=96,
  temperature=None,
  top_k=None,
  top_p=None,
  batch_size=64,
  seed=0,
) -> dict:
  """Sample, grade and write; returns a summary dict (printed by the CLI, saved as rollout_summary.json)."""
  from pipo_jax.evaluation import batch_sampling, grading
  from pipo_jax.inference import sampling

  t0 = time.perf_counter()
  rows = read_prompts(prompts_path)
  if max_prompts:
    rows = rows[:max_prompts]
  model = batch_sampling.load(checkpoint, tokenizer)
  user_turns = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
  generation = model.generation or {}
  sp = sampling.resolve(generation, sampling.SAMPLED, temperature=temperature, top_k=top_k, top_p=top_p)
  print(f"[rollout] {sampling.describe(sp, generation)}", flush=True)
  out = batch_sampling.sample(
    model, user_turns, n, "ar", sp, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
  )
  texts = [[s.text for s in per_q] for per_q in out.samples]
  correct = grading.grade_samples(texts, [str(r["answer"]) for r in rows], [r.get("type", "math") for r in rows])
  sft, opd = [], []
  for q, r in enumerate(rows):
    for i in range(n):
      if correct[q, i]:
        sft.append({"messages": user_turns[q] + [{"role": "assistant", "content": texts[q][i]}]})
    rate = float(correct[q].mean())
    if rate >= min_pass_rate:
      opd.append(
        {
          "messages": user_turns[q],
          "source": r.get("source", os.path.basename(prompts_path)),
          "source_index": r.get("source_index", q),
          "answer": str(r["answer"]),
          "pass_rate": rate,
        }
      )
  _write_jsonl(output_sft, sft)
  if output_opd:
    _write_jsonl(output_opd, opd)
  summary = {
    "prompts": len(rows),
    "samples": len(rows) * n,
    "teacher_accuracy": float(correct.mean()),
    "sft_rows": len(sft),
    "opd_prompts": len(opd),
    "min_pass_rate": min_pass_rate,
    "decode_s": round(out.decode_s, 2),
    "compile_s": round(out.compile_s, 2),
    "total_s": round(time.perf_counter() - t0, 2),
  }
  # Next to the SFT file, so the report can say what the student was trained on.
  with open(os.path.join(os.path.dirname(os.path.abspath(output_sft)), "rollout_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv):
  del argv
  summary = run(
    _CKPT.value,
    _TOK.value,
    _PROMPTS.value,
    _N.value,
    _OUT_SFT.value,
    _OUT_OPD.value,
    _RHO.value,
    _MAX_PROMPTS.value,
    _MAX_NEW.value,
    _TEMP.value,
    _TOP_K.value,
    _TOP_P.value,
    _BATCH.value,
    _SEED.value,
  )
  print("[rollout] " + json.dumps(summary))


if __name__ == "__main__":
  cli.run(main, define_flags)
