"""The miniature's synthetic chain-of-thought task: multi-step integer arithmetic worked inside a think block.

Example (3 operations):
    question: "Compute ((3+4)*5-6)."
    response: "<think>\\n(3+4)*5-6=7*5-6\\n7*5-6=35-6\\n35-6=29\\n</think>\\nThe answer is \\boxed{29}."

Operations are applied left to right; the question shows the fold with the parentheses the precedence needs,
wrapped in one outer pair. Each worked line rewrites the remaining expression with its first operation done
(`expr_k=expr_k+1`, the next line starting from the right-hand side), so every step is local: the next line
copies the previous right-hand side, and the work ends when that side is a single number. (The earlier
`a+b=c` lines made a small model count the remaining operations from the question to know when to stop,
the one thing it got wrong.) Subtraction never goes below zero (so no step shows a negative number), which keeps
the character vocabulary small. A character-level tokenizer (< 128 ids) covers the task and the chat template;
it is saved as tokenizer.json + tokenizer_config.json so the ordinary `load_tokenizer` path reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models

from pipo_jax.data.schemas import write_jsonl

# Id order: <unk> 0, then <|endoftext|> at 1 so that PAD = EOS = 1 as in the `tiny` model presets.
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")  # added but not special: they stay in decoded text, as in Qwen3.5
CHARS = ("\n",) + tuple(chr(c) for c in range(32, 127))  # newline + printable ASCII


@dataclasses.dataclass(frozen=True)
class Difficulty:
  min_ops: int = 1
  max_ops: int = 3
  min_operand: int = 1
  max_operand: int = 9
  ops: str = "+-*"


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  response: str
  answer: int


def fold_expression(value: int, ops_and_operands: list[tuple[str, int]]) -> str:
  """`value` folded left to right with each (op, b), parenthesised where precedence needs it: "(3+4)*5-6"."""
  expr, last_op = str(value), None
  for op, b in ops_and_operands:
    if op == "*" and last_op in ("+", "-"):
      expr = f"({expr})"
    expr, last_op = f"{expr}{op}{b}", op
  return expr


def make_problem(rng: np.random.Generator, difficulty: Difficulty = Difficulty()) -> Problem:
  """One random problem; all randomness comes from `rng`."""
  d = difficulty
  n_ops = int(rng.integers(d.min_ops, d.max_ops + 1))
  value = int(rng.integers(d.min_operand, d.max_operand + 1))
  ops, values = [], [value]  # values[k] is the running result after k operations
  for _ in range(n_ops):
    op = d.ops[int(rng.integers(len(d.ops)))]
    b = int(rng.integers(d.min_operand, d.max_operand + 1))
    if op == "-" and b > value:  # keep every intermediate non-negative
      op = "+" if "+" in d.ops else "*"
    value = value + b if op == "+" else value - b if op == "-" else value * b
    ops.append((op, b))
    values.append(value)
  rests = [fold_expression(values[k], ops[k:]) for k in range(n_ops + 1)]  # rests[0] is the question's
  lines = [f"{rests[k]}={rests[k + 1]}" for k in range(n_ops)]
  question = f"Compute ({rests[0]})."
  response = "<think>\n" + "".join(s + "\n" for s in lines) + "</think>\n" + f"The answer is \\boxed{{{value}}}."
  return Problem(question, response, value)


def make_splits(
  n_train: int, n_test: int, seed: int = 0, difficulty: Difficulty = Difficulty(), n_opd: int = 0, max_tries: int = 100
) -> dict[str, list[Problem]]:
  """Disjoint splits {"train", "opd", "test"} of distinct questions, deterministic in `seed`.

  Questions are drawn from one stream, deduplicated and then shuffled; test takes the first n_test, opd the next
  n_opd, train the rest, so no question is in two splits and every split has the pool's mix. (Cut in drawing
  order, the earliest splits took nearly all of the few distinct 1-operation questions and train got none: the
  demo teacher then failed every 1-operation test question.) Raises if the difficulty cannot give that many
  distinct questions.
  """
  rng = np.random.default_rng(seed)
  need = n_train + n_test + n_opd
  seen: set[str] = set()
  problems: list[Problem] = []
  for _ in range(need * max_tries):
    if len(problems) == need:
      break
    p = make_problem(rng, difficulty)
    if p.question not in seen:
      seen.add(p.question)
      problems.append(p)
  if len(problems) < need:
    raise ValueError(f"only {len(problems)} distinct questions at {difficulty}; asked for {need}")
  problems = [problems[i] for i in rng.permutation(need)]
  return {"test": problems[:n_test], "opd": problems[n_test : n_test + n_opd], "train": problems[n_test + n_opd :]}


def build_tokenizer() -> Tokenizer:
  """Character-level tokenizer for the task and the chat template: 102 ids (< 128)."""
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + THINK_TOKENS + CHARS)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one id per character
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
  return tok


def save_tokenizer(out_dir: str) -> str:
  """Write tokenizer.json and tokenizer_config.json (pad `<|endoftext|>`, eos `<|im_end|>`, as Qwen3.5 does)."""
  os.makedirs(out_dir, exist_ok=True)
  build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
  cfg = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "pad_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "unk_token": "<unk>",
    "bos_token": None,
    "model_max_length": 4096,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  return out_dir


def sft_row(p: Problem) -> dict:
  return {"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.response}]}


def prompt_row(p: Problem, index: int) -> dict:
  return {
    "messages": [{"role": "user", "content": p.question}],
    "source": "synthetic_arith",
    "source_index": index,
    "answer": str(p.answer),
  }


def benchmark_row(p: Problem) -> dict:
  return {"question": p.question, "answer": str(p.answer), "type": "math"}


def write_dataset(
  out_dir: str,
  n_train: int = 2000,
  n_test: int = 200,
  n_opd: int = 0,
  seed: int = 0,
  difficulty: Difficulty = Difficulty(),
  tokenizer_dir: str | None = None,
) -> dict[str, str]:
  """Write the task to `out_dir`: train.jsonl (SFT messages), test.jsonl (benchmark schema), test_sft.jsonl
  (messages, for eval loss), opd.jsonl (prompts, when n_opd > 0) and the tokenizer (default out_dir/tokenizer).
  Returns the paths by name."""
  os.makedirs(out_dir, exist_ok=True)
  splits = make_splits(n_train, n_test, seed, difficulty, n_opd=n_opd)
  paths = {
    "train": os.path.join(out_dir, "train.jsonl"),
    "test": os.path.join(out_dir, "test.jsonl"),
    "test_sft": os.path.join(out_dir, "test_sft.jsonl"),
    "tokenizer": save_tokenizer(tokenizer_dir or os.path.join(out_dir, "tokenizer")),
  }
  write_jsonl(paths["train"], [sft_row(p) for p in splits["train"]])
  write_jsonl(paths["test"], [benchmark_row(p) for p in splits["test"]])
  write_jsonl(paths["test_sft"], [sft_row(p) for p in splits["test"]])
  if n_opd:
    paths["opd"] = os.path.join(out_dir, "opd.jsonl")
    write_jsonl(paths["opd"], [prompt_row(p, i) for i, p in enumerate(splits["opd"])])
  return paths
