r"""Generate completions for a JSONL file of prompts.

  python -m pipo_jax.generate --checkpoint=DIR --prompts=IN.jsonl --output=OUT.jsonl [--tokenizer=DIR] \
      [--decode=pipo --conf_threshold=0.95 --max_new_tokens=256 --batch_size=8 --seed=0] \
      [--temperature=T --top_k=K --top_p=P --presence_penalty=X] [--pad_token_id=N --eos_token_id=N]

DIR is an orbax workdir / step dir of this project or an HF directory (plain Qwen3.5 or PIPO); the tokenizer
is found with the checkpoint (an HF dir's own files, or the run's configured tokenizer) unless --tokenizer
names one. Sampling defaults come from the checkpoint's generation_config.json when it has one, else greedy;
flags override them, and the effective values are logged.
Input lines: {"prompt": str} (user turn; the chat template and the `<think>\n` opener are applied),
{"messages": [{"role", "content"}, ...]}, or {"tokens": [int, ...]} (used as is).
Output lines: {"tokens": [...] (PAD slots removed), "raw": [...] (the raw stream, PAD slots included),
"text": str, "stats": {steps, tokens_emitted, drafts_proposed, drafts_kept, pad_ratio}}, in input order.
`--max_new_tokens` counts emitted non-PAD tokens. Prompts are left-padded to one bucket (the longest prompt
rounded up to --bucket_multiple) and the last batch is filled up, so the whole file compiles once.
Without --checkpoint, `--preset=NAME` runs a random-initialised model (token input only, unless --tokenizer
is given).
"""

from __future__ import annotations

import json
import time

import jax
from absl import flags, logging

from pipo_jax import cli
from pipo_jax.inference import sampling
from pipo_jax.inference.api import MODES, generate, left_pad, params_for_backend, result_rows
from pipo_jax.inference.sampling import SamplingParams
from pipo_jax.io import loading

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined by `cli.run`, only when this module is the program)."""
  flags.DEFINE_string("checkpoint", "", "orbax workdir / step dir, or HF directory (plain Qwen3.5 or PIPO)")
  flags.DEFINE_string("preset", "", "without --checkpoint: a model preset of pipo_jax.config.PRESETS, random init")
  flags.DEFINE_string("tokenizer", "", "directory with tokenizer.json (default: found with the checkpoint)")
  flags.DEFINE_string("prompts", None, "input JSONL")
  flags.DEFINE_string("output", None, "output JSONL")
  flags.DEFINE_enum("decode", "pipo", list(MODES), "decoding mode")
  flags.DEFINE_float("conf_threshold", 0.95, "pipo: keep token2 iff sigmoid(conf) >= tau; <0 keep all, >=1 none")
  flags.DEFINE_integer("max_new_tokens", 256, "emitted non-PAD tokens per prompt")
  flags.DEFINE_float("temperature", None, "0 = greedy (default: generation_config.json, else 0)")
  flags.DEFINE_integer("top_k", None, "0 = off (default: generation_config.json, else 0)")
  flags.DEFINE_float("top_p", None, "1 = off (default: generation_config.json, else 1)")
  flags.DEFINE_float(
    "presence_penalty",
    None,
    "subtracted from the logits of tokens already emitted (default: generation_config.json, else 0)",
  )
  flags.DEFINE_integer("pad_token_id", None, "PAD id when neither config.json nor the tokenizer names one")
  flags.DEFINE_integer("eos_token_id", None, "EOS id when neither config.json nor the tokenizer names one")
  flags.DEFINE_integer("seed", 0, "sampling seed (one key per batch, folded from it)")
  flags.DEFINE_integer("batch_size", 8, "prompts per batch")
  flags.DEFINE_integer("bucket_multiple", 64, "the prompt bucket is the longest prompt rounded up to this")


def encode_record(rec: dict, tok, where: str) -> list:
  """One input line -> prompt token ids (the place to swap the chat template)."""
  if "tokens" in rec:
    return [int(t) for t in rec["tokens"]]
  if tok is None:
    raise ValueError(f"{where}: a text prompt needs a tokenizer (--tokenizer or a checkpoint with tokenizer.json)")
  if "messages" in rec:
    return tok.generation_prompt_ids(rec["messages"]).tolist()
  if "prompt" in rec:
    return tok.generation_prompt_ids([{"role": "user", "content": rec["prompt"]}]).tolist()
  raise ValueError(f"{where}: expected a 'prompt', 'messages' or 'tokens' field, got {sorted(rec)}")


def read_prompts(path: str, tok) -> list:
  """Token-id prompts of a JSONL file; an empty file, a malformed line or an empty prompt is a ValueError
  naming file:line."""
  records = []
  for n, line in cli.read_nonempty_lines(path, "prompts"):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    records.append((rec, f"{path}:{n}"))
  return read_prompts_from_records([r for r, _ in records], tok, [w for _, w in records])


def read_prompts_from_records(records: list, tok, where: list = ()) -> list:
  """Token-id prompts of input records (dicts of the JSONL format)."""
  prompts = []
  for i, rec in enumerate(records):
    w = where[i] if where else f"record {i}"
    if not isinstance(rec, dict):
      raise ValueError(f"{w}: expected a JSON object with 'prompt', 'messages' or 'tokens'")
    ids = encode_record(rec, tok, w)
    if not ids:
      raise ValueError(f"{w}: empty prompt")
    prompts.append(ids)
  return prompts


def run(
  prompts: list,
  config,
  params,
  tok,
  mode: str,
  sp: SamplingParams,
  tau: float,
  max_new: int,
  batch_size: int,
  seed: int,
  bucket_multiple: int = 64,
  stop_ids=None,
) -> list:
  """Generate for token-id prompts; returns one output dict per prompt, in order. `stop_ids`: default the
  tokenizer's (or config.eos_token_id without a tokenizer)."""
  if not prompts:
    raise ValueError("no prompts to generate for")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: expected >= 1")
  m = bucket_multiple
  bucket = -(-max(len(p) for p in prompts) // m) * m
  if stop_ids is None and tok is not None:
    stop_ids = list(tok.special.stop_ids)
  rows = []
  params = params_for_backend(config, params)  # once for every batch
  progress = cli.Progress(len(prompts), "generate", "prompts")
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - n)  # fixed batch shape: fill, then drop the fillers
    ids, valid = left_pad(chunk, bucket, config.pad_token_id or 0)
    t0 = time.time()
    res = generate(
      params,
      config,
      ids,
      valid,
      mode=mode,
      sampling=sp,
      conf_threshold=tau,
      max_new_tokens=max_new,
      rng=jax.random.fold_in(jax.random.PRNGKey(seed), start),
      stop_ids=stop_ids,
    )
    out = result_rows(res)[:n]
    logging.debug("batch %d: %d prompts in %.2fs", start // batch_size, n, time.time() - t0)
    progress.update(n)
    for r in out:
      r["text"] = tok.decode(r["tokens"]) if tok is not None else ""
    rows += out
  return rows


def main(argv):
  del argv
  cli.require("prompts", "output")
  m = loading.load_for_cli(
    FLAGS.checkpoint,
    FLAGS.tokenizer,
    FLAGS.preset,
    FLAGS.seed,
    pad_token_id=FLAGS.pad_token_id,
    eos_token_id=FLAGS.eos_token_id,
    need_pad=FLAGS.decode == "pipo",
  )
  loading.warn_if_pipo_in_ar(m, FLAGS.decode)
  prompts = read_prompts(FLAGS.prompts, m.tokenizer)
  sp = sampling.resolve(
    m.generation,
    sampling.GREEDY,
    temperature=FLAGS.temperature,
    top_k=FLAGS.top_k,
    top_p=FLAGS.top_p,
    presence_penalty=FLAGS.presence_penalty,
  )
  logging.info("%s; stop ids %s", sampling.describe(sp, m.generation), list(m.stop_ids))
  rows = run(
    prompts,
    m.config,
    m.params,
    m.tokenizer,
    FLAGS.decode,
    sp,
    FLAGS.conf_threshold,
    FLAGS.max_new_tokens,
    FLAGS.batch_size,
    FLAGS.seed,
    FLAGS.bucket_multiple,
    stop_ids=list(m.stop_ids),
  )
  with open(FLAGS.output, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({"tokens": r["tokens"], "raw": r["raw"], "text": r["text"], "stats": r["stats"]}) + "\n")
  tot = sum(r["stats"]["tokens_emitted"] for r in rows)
  steps = sum(r["stats"]["steps"] for r in rows)
  logging.info(
    "wrote %d completions to %s: %d tokens in %d steps (%.3f tokens/step)",
    len(rows),
    FLAGS.output,
    tot,
    steps,
    tot / max(steps, 1),
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
