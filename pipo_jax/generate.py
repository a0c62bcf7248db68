r"""Generate completions for a JSONL file of prompts.

  python -m pipo_jax.generate --checkpoint=DIR --prompts=IN.jsonl --output=OUT.jsonl \
      --decode=pipo --conf_threshold=0.95 --max_new_tokens=512 [--temperature=0.6 --top_k=20 --top_p=0.95 \
      --presence_penalty=1.5 --seed=0 --batch_size=8]

Input lines: {"prompt": str} (user turn; the chat template and the `<think>\n` opener are applied),
{"messages": [{"role", "content"}, ...]}, or {"tokens": [int, ...]} (used as is).
Output lines: {"tokens": [...] (PAD slots removed), "raw": [...] (the raw stream, PAD slots included),
"text": str, "stats": {steps, tokens_emitted, drafts_proposed, drafts_kept, pad_ratio}}, in input order.
`--max_new_tokens` counts emitted non-PAD tokens. Prompts are left-padded to one bucket (the longest prompt
rounded up to --bucket_multiple) and the last batch is filled up, so the whole file compiles once.
Without --checkpoint, `--preset=NAME --init=random` runs a random-initialised model (token input only,
unless --tokenizer is given).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from absl import app, flags, logging

from pipo_jax.inference.api import MODES, generate, left_pad, result_rows
from pipo_jax.inference.model_io import load, load_tokenizer_or_none
from pipo_jax.inference.sampling import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "", "orbax checkpoint or HF directory (pipo_jax.loading.load_model)")
flags.DEFINE_string("preset", "", "without --checkpoint: a model preset of pipo_jax.config.PRESETS")
flags.DEFINE_enum("init", "random", ["random"], "without --checkpoint: how to initialise the preset")
flags.DEFINE_string("tokenizer", "", "directory with tokenizer.json (default: the checkpoint directory)")
flags.DEFINE_string("prompts", None, "input JSONL")
flags.DEFINE_string("output", None, "output JSONL")
flags.DEFINE_enum("decode", "pipo", list(MODES), "decoding mode")
flags.DEFINE_float("conf_threshold", 0.95, "pipo: keep token2 iff sigmoid(conf) >= tau; <0 keep all, >=1 none")
flags.DEFINE_integer("max_new_tokens", 256, "emitted non-PAD tokens per prompt")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_integer("top_k", 0, "0 = off")
flags.DEFINE_float("top_p", 1.0, "1 = off")
flags.DEFINE_float("presence_penalty", 0.0, "subtracted from the logits of tokens already emitted")
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
  prompts = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from e
      ids = encode_record(rec, tok, f"{path}:{n}")
      if not ids:
        raise ValueError(f"{path}:{n}: empty prompt")
      prompts.append(ids)
  return prompts


def run(prompts: list, config, params, tok, mode: str, sp: SamplingParams, tau: float, max_new: int,
        batch_size: int, seed: int, bucket_multiple: int = 64) -> list:
  """Generate for token-id prompts; returns one output dict per prompt, in order."""
  m = bucket_multiple
  bucket = -(-max(len(p) for p in prompts) // m) * m
  stop_ids = list(tok.special.stop_ids) if tok is not None else None
  rows = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - n)  # fixed batch shape: fill, then drop the fillers
    ids, valid = left_pad(chunk, bucket, config.pad_token_id or 0)
    t0 = time.time()
    res = generate(params, config, ids, valid, mode=mode, sampling=sp, conf_threshold=tau, max_new_tokens=max_new,
                   rng=jax.random.fold_in(jax.random.PRNGKey(seed), start), stop_ids=stop_ids)
    out = result_rows(res)[:n]
    logging.info("batch %d: %d prompts in %.2fs", start // batch_size, n, time.time() - t0)
    for r in out:
      r["text"] = tok.decode(r["tokens"]) if tok is not None else ""
    rows += out
  return rows


def main(argv):
  del argv
  if not FLAGS.prompts or not FLAGS.output:
    raise app.UsageError("--prompts and --output are required")
  config, params = load(FLAGS.checkpoint, FLAGS.preset, FLAGS.seed)
  tok = load_tokenizer_or_none(FLAGS.tokenizer or FLAGS.checkpoint)
  if config.pad_token_id is None and tok is not None:  # plain Qwen3.5 config.json may not name a PAD id
    config = dataclasses.replace(config, pad_token_id=tok.pad_id)
  prompts = read_prompts(FLAGS.prompts, tok)
  sp = SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.presence_penalty)
  rows = run(prompts, config, params, tok, FLAGS.decode, sp, FLAGS.conf_threshold, FLAGS.max_new_tokens,
             FLAGS.batch_size, FLAGS.seed, FLAGS.bucket_multiple)
  with open(FLAGS.output, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({"tokens": r["tokens"], "raw": r["raw"], "text": r["text"], "stats": r["stats"]}) + "\n")
  tot = sum(r["stats"]["tokens_emitted"] for r in rows)
  steps = sum(r["stats"]["steps"] for r in rows)
  logging.info("wrote %d completions to %s: %d tokens in %d steps (%.3f tokens/step)", len(rows), FLAGS.output,
               tot, steps, tot / max(steps, 1))


if __name__ == "__main__":
  app.run(main)
