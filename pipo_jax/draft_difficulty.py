"""Annotate SFT records with how hard each response token is to draft, for difficulty-weighted gate PADs.

    python -m pipo_jax.draft_difficulty --teacher=runs/demo/teacher --tokenizer=runs/demo/data/tokenizer \\
        --data=runs/demo/rollout/sft.jsonl --output=runs/demo/rollout/sft_difficulty.jsonl

Every line is copied with one more key, `draft_difficulty`: per response token (the tokenization the SFT pipeline
uses), 1 - p of that token under the teacher's native MTP head, teacher-forced (x_t from h_{t-2} and e(x_{t-1})),
i.e. how likely a one-layer draft of it is wrong. Unsupervised tokens (the `<think>\\n` opener by default) carry a
value too; the SFT pipeline ignores it.

Why: at inference the confidence gate rejects the drafts it doubts, and the backbone must then predict the
rejected token itself one pair later. With uniform PAD placement (data.pad_insertion=gate) the backbone rarely
trains on that at the hard tokens; data.pad_difficulty_mix leans the PADs towards high difficulty
(data/pairs.difficulty_weights).
"""

from __future__ import annotations

import json
import os

import numpy as np

from pipo_jax import cli
from pipo_jax.data import schemas
from pipo_jax.data import tokenizer as tok_lib
from pipo_jax.diagnose import make_teacher_fn, run_batched
from pipo_jax.io import loading


def response_difficulty(mtp_logprob: np.ndarray, n_prompt: int) -> np.ndarray:
  """1 - p(x_t) of the MTP head on the response part: float32 [T - n_prompt].

  mtp_logprob float [T]: log p(x_t) of the native MTP head (indices 0 and 1 have no prediction: difficulty 0).
  """
  d = 1.0 - np.exp(np.asarray(mtp_logprob, np.float64))
  d[:2] = 0.0
  return np.clip(d[n_prompt:], 0.0, 1.0).astype(np.float32)


def difficulties(cfg, params, tok, sequences, batch_size: int = 32) -> list[np.ndarray]:
  """Per response token draft difficulty of each (prompt_ids, response_ids): float32 [R] per sequence."""
  if not cfg.mtp_num_hidden_layers:
    raise ValueError("the teacher has no native MTP head (model.mtp_num_hidden_layers = 0)")
  seqs = [np.concatenate([p, r]).astype(np.int32) for p, r in sequences]
  outs = run_batched(make_teacher_fn(cfg), params, seqs, tok.pad_id, batch_size, label="draft difficulty")
  return [response_difficulty(out[2], len(p)) for out, (p, _) in zip(outs, sequences)]


def annotate(teacher_path: str, data_path: str, tokenizer_path: str, output: str, batch_size: int = 32) -> dict:
  """Write `output` (data_path's lines + draft_difficulty); returns a summary with the mean difficulty."""
  tok = tok_lib.load_tokenizer(tokenizer_path)
  objs, sequences = [], []
  for lineno, line in cli.read_nonempty_lines(data_path, "SFT data"):
    rec = schemas.parse_line(line, data_path, lineno, require_response=True)
    objs.append(json.loads(line))
    sequences.append(tok_lib.record_token_ids(rec, tok))
  cfg, params = loading.load_model(teacher_path)
  ds = difficulties(cfg, params, tok, sequences, batch_size)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for obj, d in zip(objs, ds):
      obj["draft_difficulty"] = [round(float(v), 5) for v in d]
      f.write(json.dumps(obj) + "\n")
  os.replace(tmp, output)  # never a half-written file under the final name
  n = sum(len(d) for d in ds)
  return {"records": len(objs), "tokens": n, "mean_difficulty": float(sum(d.sum() for d in ds)) / max(n, 1)}


def define_flags() -> None:
  """Defined only when run as a program, so the module can be imported next to other CLIs."""
  from absl import flags

  global _TEACHER, _DATA, _TOK, _OUT, _BATCH
  _TEACHER = flags.DEFINE_string("teacher", None, "teacher checkpoint with a native MTP head", required=True)
  _DATA = flags.DEFINE_string("data", None, "SFT JSONL (records with an assistant turn)", required=True)
  _TOK = flags.DEFINE_string("tokenizer", None, "tokenizer directory", required=True)
  _OUT = flags.DEFINE_string("output", None, "annotated JSONL to write", required=True)
  _BATCH = flags.DEFINE_integer("batch_size", 32, "sequences per forward")


def main(argv) -> None:
  del argv
  summary = annotate(_TEACHER.value, _DATA.value, _TOK.value, _OUT.value, _BATCH.value)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags)
