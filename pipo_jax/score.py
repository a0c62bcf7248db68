r"""Score token sequences: per-token log-probabilities, regular (AR) or compressed (PIPO) mode.

  python -m pipo_jax.score --checkpoint=DIR --input=IN.jsonl --output=OUT.jsonl [--batch_size=8] [--pipo] \
      [--dtype=float32 --matmul_precision=highest --pad_token_id=N]

DIR is an HF directory (plain Qwen3.5 or PIPO) or this project's orbax checkpoint (workdir or step dir).
Each input line is {"tokens": [int, ...]} (at least one token); each output line, in input order, is
{"logprobs": [...]} with log p(tokens[t] | tokens[<t]) for t = 1..n-1 in float32. With --pipo the line is
{"backbone_logprobs", "mtp_logprobs", "confidence"} instead (see evaluation/score_pipo.py; None where a stream has no
prediction for that token).

Sequences of any lengths are mixed freely: they are sorted by length, left-padded into fixed-size batches
whose length is rounded up to a power of two (>= 16), so the number of compilations is logarithmic in the
longest sequence. The LM head is applied in token chunks so [tokens, vocab] logits never exist for the whole
batch at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from pipo_jax import cli
from pipo_jax.config import ModelConfig
from pipo_jax.evaluation import score_pipo
from pipo_jax.models import qwen3_5

FLAGS = flags.FLAGS

_HEAD_CHUNK = 256  # tokens per LM-head chunk


def read_token_file(path: str, vocab_size: int) -> list[np.ndarray]:
  """Parse and validate the input JSONL; errors name file:line and what was expected."""
  seqs = []
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: input file not found")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path}: empty input file")
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      where = f"{path}:{lineno}"
      if not line.strip():
        raise ValueError(f'{where}: empty line; expected {{"tokens": [int, ...]}}')
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(rec, dict) or "tokens" not in rec:
        raise ValueError(f'{where}: expected an object with a "tokens" list')
      toks = rec["tokens"]
      if (
        not isinstance(toks, list) or not toks or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks)
      ):
        raise ValueError(f'{where}: "tokens" must be a non-empty list of integers')
      bad = [t for t in toks if not 0 <= t < vocab_size]
      if bad:
        raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
      seqs.append(np.asarray(toks, np.int32))
  return seqs


def make_logprob_fn(config: ModelConfig):
  """Jitted (params, ids_BT, valid_BT) -> lp_BT1 with lp[b, t] = log p(ids[b, t+1] | ids[b, <=t]), fp32."""
  model = qwen3_5.Qwen35(config)

  @jax.jit
  def fn(params, ids_BT, valid_BT):
    variables = {"params": params}
    x_BTD = model.apply(variables, ids_BT, method=model.embed)
    h_BTD, _ = model.apply(variables, x_BTD, qwen3_5.positions_from_valid(valid_BT), valid_BT)
    w_DV = model.apply(variables, method=model.head_kernel)
    B, T, D = h_BTD.shape
    chunk = min(T, _HEAD_CHUNK)  # T is a power of two >= 16, so chunk divides it
    targets_BT = jnp.concatenate([ids_BT[:, 1:], jnp.zeros((B, 1), ids_BT.dtype)], axis=1)

    def head(_, xs):
      h_BCD, tgt_BC = xs
      logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV).astype(jnp.float32)
      lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
      return None, jnp.take_along_axis(logits_BCV, tgt_BC[..., None], axis=-1)[..., 0] - lse_BC

    xs = (
      h_BTD.reshape(B, T // chunk, chunk, D).swapaxes(0, 1),
      targets_BT.reshape(B, T // chunk, chunk).swapaxes(0, 1),
    )
    _, lp_NBC = jax.lax.scan(head, None, xs)
    return lp_NBC.swapaxes(0, 1).reshape(B, T)[:, :-1]

  return fn


def score_sequences(config: ModelConfig, params, seqs: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
  """Per-sequence float32 log-probs of tokens 1..n-1 (empty for a 1-token sequence), in input order."""
  fn = make_logprob_fn(config)
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
  out: list = [None] * len(seqs)
  progress = cli.Progress(len(seqs), "score", "sequences")
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    T = score_pipo.pow2_bucket(max(len(seqs[i]) for i in idx))
    # Fixed batch size too (dummy all-pad rows), so each length bucket compiles once.
    ids = np.zeros((batch_size, T), np.int32)
    valid = np.zeros((batch_size, T), bool)
    for row, i in enumerate(idx):
      n = len(seqs[i])
      ids[row, T - n :] = seqs[i]
      valid[row, T - n :] = True
    lp = np.asarray(fn(params, ids, valid))
    for row, i in enumerate(idx):
      n = len(seqs[i])
      out[i] = lp[row, T - n :].astype(np.float32)
    progress.update(len(idx))
  return out


def score_file(
  checkpoint: str,
  input_path: str,
  output_path: str,
  batch_size: int = 8,
  pipo: bool = False,
  dtype: str = "float32",
  pad_token_id: int | None = None,
) -> int:
  """Score every line of input_path into output_path; returns the number of sequences."""
  from pipo_jax.io import loading

  overrides = ModelConfig(preset=None, dtype=dtype)
  m = loading.load_for_cli(checkpoint, overrides=overrides, init_heads=pipo, pad_token_id=pad_token_id, need_pad=pipo)
  config, params = m.config, m.params
  seqs = read_token_file(input_path, config.vocab_size)
  logging.info(
    "scoring %d sequences (%d tokens)%s",
    len(seqs),
    sum(len(s) for s in seqs),
    " in compressed PIPO mode" if pipo else "",
  )
  if pipo:
    records = score_pipo.score_sequences_pipo(config, params, seqs, batch_size, config.pad_token_id)
  else:
    records = [
      {"logprobs": [float(v) for v in lp]} for lp in score_sequences(config, params["backbone"], seqs, batch_size)
    ]
  with open(output_path, "w") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")
  logging.info("wrote %s", output_path)
  return len(records)


def main(argv):
  del argv
  cli.require("checkpoint", "input", "output")
  if FLAGS.batch_size < 1:
    raise app.UsageError("--batch_size must be >= 1")
  jax.config.update("jax_default_matmul_precision", FLAGS.matmul_precision)
  score_file(FLAGS.checkpoint, FLAGS.input, FLAGS.output, FLAGS.batch_size, FLAGS.pipo, FLAGS.dtype, FLAGS.pad_token_id)


def define_flags():
  """The CLI's flags (defined by `cli.run`, only when this module is the program)."""
  flags.DEFINE_string("checkpoint", None, "HF directory or orbax checkpoint (workdir or step dir).")
  flags.DEFINE_string("input", None, 'JSONL file, one {"tokens": [...]} per line.')
  flags.DEFINE_string("output", None, 'JSONL file to write, one {"logprobs": [...]} per input line.')
  flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_string("matmul_precision", "highest", "jax_default_matmul_precision for fp32 matmuls.")
  flags.DEFINE_bool("pipo", False, "Score in compressed PIPO mode (backbone and MTP streams, confidence).")
  flags.DEFINE_integer("pad_token_id", None, "--pipo: PAD id when neither config.json nor a tokenizer names one")


if __name__ == "__main__":
  cli.run(main, define_flags)
