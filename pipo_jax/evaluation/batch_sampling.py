"""Sample n completions per prompt with the inference engine: the shared core of `rollout` and `evaluate`.

    model = load(checkpoint, tokenizer_path)
    run = sample(model, prompts, n=4, mode="pipo", sampling=SamplingParams(temperature=1.0), conf_threshold=0.95)
    run.samples[q][i] -> Sample(text, tokens, raw, steps, n_pad, token2_slots); run.decode_s: timed seconds

Prompts are chat message lists; each is encoded as the generation prompt (ending in `<think>\\n`, plus the
parity PAD in pipo mode, as PromptPipeline does) and left-padded into one fixed bucket, so every batch of a run
hits the same compiled function. The Q x n sample rows are decoded in fixed-size batches (the last one filled
with copies of row 0 and dropped), each with its own PRNG key folded from `seed`.

Timing: the first batch of a shape is run once untimed (compilation), then every batch is timed to
`block_until_ready` (later runs of the same shape skip the warm-up). `decode_s` is the sum of the timed batches,
prefill included: what a user waits for.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from pipo_jax import cli
from pipo_jax.config import ModelConfig
from pipo_jax.data import tokenizer as tok_lib
from pipo_jax.data.tokenizer import THINK_PREFIX
from pipo_jax.inference import api
from pipo_jax.inference.sampling import SamplingParams
from pipo_jax.io import loading


class Model(NamedTuple):
  config: ModelConfig
  params: dict
  tokenizer: tok_lib.ChatTokenizer
  generation: dict | None = None  # generation_config.json's sampling defaults (None: the file is absent)


@dataclasses.dataclass
class Sample:
  """One completion. `text` is the assistant message content (`<think>\\n` + the decoded output, specials
  dropped); `raw` is the engine's slot stream with PADs; token2_slots = second-token decisions written (pipo)."""

  text: str
  tokens: list
  raw: list
  steps: int
  n_pad: int
  token2_slots: int


@dataclasses.dataclass
class SampleRun:
  samples: list  # [Q][n] Sample
  decode_s: float  # timed generation seconds (compilation excluded)
  compile_s: float  # the untimed warm-up call(s)
  batches: int


_WARM: set = set()  # signatures already compiled in this process


def load(checkpoint: str, tokenizer_path: str = "") -> Model:
  """Model (LoRA merged, heads present) + tokenizer, through the CLIs' one loader (pipo_jax.io.loading)."""
  m = loading.load_for_cli(checkpoint, tokenizer_path, need_tokenizer=True)
  return Model(m.config, m.params, m.tokenizer, m.generation)


def prompt_ids(tok: tok_lib.ChatTokenizer, messages: Sequence[dict], parity_pad: bool) -> np.ndarray:
  ids = tok.generation_prompt_ids(messages)
  if parity_pad and len(ids) % 2:
    ids = np.append(ids, np.int32(tok.pad_id))
  return ids


def bucket_length(n: int, multiple: int = 16) -> int:
  """A batch's fixed length: the longest sequence `n` rounded up to a multiple of 16 (even, so PIPO pairs align),
  at least one multiple. One compilation then serves every batch whose longest sequence falls in the bucket."""
  return max(multiple, -(-n // multiple) * multiple)


def sample(
  model: Model,
  prompts: Sequence[Sequence[dict]],
  n: int,
  mode: str,
  sampling: SamplingParams,
  conf_threshold: float = 0.95,
  max_new_tokens: int = 96,
  batch_size: int = 64,
  seed: int = 0,
  random_pad_ratio: float | None = None,
) -> SampleRun:
  """n samples for each prompt (a list of chat messages) in decode `mode`; see the module docstring."""
  tok, cfg = model.tokenizer, model.config
  if not prompts:
    raise ValueError("no prompts to sample (empty prompt file?)")
  encoded = [prompt_ids(tok, m, parity_pad=(mode == "pipo")) for m in prompts]
  bucket = bucket_length(max(len(e) for e in encoded))
  rows = [(q, i) for q in range(len(prompts)) for i in range(n)]
  B = min(batch_size, len(rows))
  samples = [[None] * n for _ in prompts]
  decode_s, compile_s, n_batches = 0.0, 0.0, 0
  params = api.params_for_backend(cfg, model.params)  # once, outside the timed calls
  progress = cli.Progress(len(rows), f"sample ({mode})", "samples")
  for start in range(0, len(rows), B):
    chunk = rows[start : start + B]
    fill = chunk + [chunk[0]] * (B - len(chunk))  # a fixed batch shape: one compilation per run
    ids, valid = api.left_pad([encoded[q] for q, _ in fill], bucket, tok.pad_id)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), start)

    def call(ids=ids, valid=valid, key=key):  # bound now: called in this iteration only
      res = api.generate(
        params,
        cfg,
        ids,
        valid,
        mode=mode,
        sampling=sampling,
        conf_threshold=conf_threshold,
        max_new_tokens=max_new_tokens,
        rng=key,
        stop_ids=tok.special.stop_ids,
        random_pad_ratio=random_pad_ratio,
      )
      return jax.block_until_ready(res)

    sig = (id(model.params), mode, sampling, B, bucket, max_new_tokens, random_pad_ratio is None)
    if sig not in _WARM:  # compile once per shape; tau and the control ratio are traced (no recompiles)
      _WARM.add(sig)
      t0 = time.perf_counter()
      call()
      compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = call()
    decode_s += time.perf_counter() - t0
    n_batches += 1
    for (q, i), row in zip(chunk, api.result_rows(res)):
      raw = row["raw"]
      n_pad = len(raw) - len(row["tokens"])
      samples[q][i] = Sample(
        text=THINK_PREFIX + tok.decode(row["tokens"]),
        tokens=row["tokens"],
        raw=raw,
        steps=row["stats"]["steps"],
        n_pad=n_pad,
        token2_slots=len(raw) // 2 if mode == "pipo" else 0,
      )
    progress.update(len(chunk))
  return SampleRun(samples, decode_s, compile_s, n_batches)
