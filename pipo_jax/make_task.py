"""Write the miniature's synthetic arithmetic task (pipo_jax/data/synthetic.py) to a directory.

    python -m pipo_jax.make_task --flagfile=experiments/demo/make_task.flags

Writes OUT/train.jsonl (SFT messages, the teacher's training set), OUT/opd.jsonl (prompts for the
teacher's rollouts and OPD; disjoint from train and test), OUT/test.jsonl (benchmark schema
{"question", "answer", "type"}), OUT/test_sft.jsonl and OUT/tokenizer/. Idempotent: an existing
OUT/train.jsonl is left alone unless --overwrite (a rerun of the demo reuses the data it trained on).
"""

from __future__ import annotations

import json
import os

from absl import flags

from pipo_jax.data import synthetic


def define_flags() -> None:
  """Defined only when run as a program, so the module can be imported next to other CLIs."""
  global _OUT, _N_TRAIN, _N_OPD, _N_TEST, _SEED, _MIN_OPS, _MAX_OPS, _MIN_OPERAND, _MAX_OPERAND, _OPS
  global _OVERWRITE
  _OUT = flags.DEFINE_string("out_dir", "runs/demo/data", "output directory")
  _N_TRAIN = flags.DEFINE_integer("n_train", 4000, "SFT training problems (teacher)")
  _N_OPD = flags.DEFINE_integer("n_opd", 400, "prompt problems (teacher rollouts -> student SFT, then OPD)")
  _N_TEST = flags.DEFINE_integer("n_test", 100, "held-out benchmark questions")
  _SEED = flags.DEFINE_integer("seed", 0, "split seed")
  _MIN_OPS = flags.DEFINE_integer("min_ops", 1, "fewest operations per problem")
  _MAX_OPS = flags.DEFINE_integer("max_ops", 3, "most operations per problem")
  _MIN_OPERAND = flags.DEFINE_integer("min_operand", 1, "smallest operand")
  _MAX_OPERAND = flags.DEFINE_integer("max_operand", 9, "largest operand")
  _OPS = flags.DEFINE_string("ops", "+-*", "operations to draw from")
  _OVERWRITE = flags.DEFINE_boolean("overwrite", False, "rewrite an existing task directory")


def difficulty_from_flags() -> synthetic.Difficulty:
  return synthetic.Difficulty(
    min_ops=_MIN_OPS.value,
    max_ops=_MAX_OPS.value,
    min_operand=_MIN_OPERAND.value,
    max_operand=_MAX_OPERAND.value,
    ops=_OPS.value,
  )


def main(argv):
  del argv
  out = _OUT.value
  if os.path.exists(os.path.join(out, "train.jsonl")) and not _OVERWRITE.value:
    print(f"[make_task] {out} already holds a task; reusing it (--overwrite to rewrite)")
    return
  d = difficulty_from_flags()
  paths = synthetic.write_dataset(
    out, n_train=_N_TRAIN.value, n_test=_N_TEST.value, n_opd=_N_OPD.value, seed=_SEED.value, difficulty=d
  )
  # Recorded so the report can say which task it measured.
  with open(os.path.join(out, "task.json"), "w") as f:
    json.dump(
      {
        "difficulty": d.__dict__,
        "n_train": _N_TRAIN.value,
        "n_opd": _N_OPD.value,
        "n_test": _N_TEST.value,
        "seed": _SEED.value,
      },
      f,
      indent=2,
    )
  print(f"[make_task] wrote {sorted(paths)} to {out}")


if __name__ == "__main__":
  from pipo_jax import cli

  cli.run(main, define_flags)
