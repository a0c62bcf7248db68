r"""Local copies of the paper's benchmarks, in their published file formats -> our benchmark rows.

  python -m pipo_jax.prepare_benchmark --format=aime25 --input=aime2025-I.jsonl,aime2025-II.jsonl \
      --output=bench/aime25.jsonl
  python -m pipo_jax.prepare_benchmark --format=gpqa_diamond --input=gpqa_diamond.csv --output=bench/gpqa.jsonl
  python -m pipo_jax.prepare_benchmark --format=livecodebench --input=test6.jsonl --output=bench/lcb_v6.jsonl \
      [--start_date=2025-02-01 --end_date=2025-05-01]
  python -m pipo_jax.prepare_benchmark --format=longbench_v2 --input=data.json --output=bench/longbench.jsonl \
      [--longbench_length=short]

Nothing is downloaded: each input is a file the user fetched. Output rows are what `pipo_jax.evaluate` reads,
{"question", "answer", "type", "id"}:

* aime25 (math): JSONL / JSON records with `question` or `problem` and `answer` (opencompass/AIME2025,
  math-ai/aime25, yentinglin/aime_2025 exported to JSON); type "math", the answer an integer string.
* gpqa_diamond (multiple_choice): the CSV of Idavidrein/gpqa (`Question`, `Correct Answer`,
  `Incorrect Answer 1..3`); the four choices are shuffled per question with `--seed` (a numpy Generator seeded
  with (seed, question index)), labelled A-D, and the answer is the correct choice's letter.
* livecodebench (code): JSONL of livecodebench/code_generation_lite (`question_content`, `starter_code`,
  `public_test_cases` as a JSON string, `private_test_cases` as JSON or base64(zlib(pickle(JSON string))),
  `metadata` with `func_name`, `contest_date`); the answer is the JSON test spec of pipo_jax/evaluation/code_grading.py
  (public then private tests; style "functional" when the tests are, else "stdin"). The pickle is read with an
  unpickler that accepts only strings and bytes.
* longbench_v2 (multiple_choice): the JSON list of THUDM/LongBench-v2 (`context`, `question`,
  `choice_A..D`, `answer` letter); the question holds the document, the question and the labelled choices.

Multiple-choice and code questions end with an instruction saying how to give the answer (a letter in
`\boxed{}`, a fenced Python block), since that is what the graders read.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import pickle
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from absl import flags, logging

FORMATS = ("aime25", "gpqa_diamond", "livecodebench", "longbench_v2")
LETTERS = "ABCD"
MC_INSTRUCTION = "Answer with the letter of the correct choice, written as \\boxed{X} on the last line."
CODE_STDIN_FORMAT = (
  "Read the input from stdin, solve the problem and write the answer to stdout (do not test on "
  "the sample inputs directly). Give your program as one Python code block:\n"
  "```python\n# YOUR CODE HERE\n```"
)
CODE_STARTER_FORMAT = (
  "Complete the starter code below and give the whole solution as one Python code block:\n```python\n{starter}\n```"
)


# -- reading ---------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict]:
  """Records of a .jsonl, .json (a list, or {"data": [...]}) or .csv file; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: benchmark file not found")
  ext = os.path.splitext(path)[1].lower()
  with open(path, encoding="utf-8", newline="" if ext == ".csv" else None) as f:
    if ext == ".csv":
      rows = list(csv.DictReader(f))
    elif ext == ".json":
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
      rows = data.get("data") if isinstance(data, dict) else data
      if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    elif ext == ".jsonl":
      rows = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
      raise ValueError(f"{path}: expected a .jsonl, .json or .csv file (export parquet files to JSON first)")
  if not rows:
    raise ValueError(f"{path}: no records")
  if not all(isinstance(r, dict) for r in rows):
    raise ValueError(f"{path}: expected records (JSON objects / CSV rows)")
  return rows


def _field(rec: dict, names: Sequence[str], where: str, fmt: str):
  for n in names:
    if rec.get(n) not in (None, ""):
      return rec[n]
  raise ValueError(f"{where}: no {' / '.join(repr(n) for n in names)} field; is this a {fmt} file?")


# -- AIME25 ----------------------------------------------------------------------------------------


def aime_rows(records: Iterable[dict], path: str) -> list[dict]:
  rows = []
  for i, r in enumerate(records):
    where = f"{path}: record {i + 1}"
    q = _field(r, ("question", "problem", "Problem", "Question"), where, "AIME25")
    a = str(_field(r, ("answer", "Answer"), where, "AIME25")).strip()
    rows.append(
      {
        "question": str(q).strip(),
        "answer": a,
        "type": "math",
        "id": str(r.get("id", r.get("ID", f"{os.path.basename(path)}:{i}"))),
      }
    )
  return rows


# -- GPQA-Diamond ----------------------------------------------------------------------------------


def choices_block(choices: Sequence[str]) -> str:
  return "\n".join(f"{LETTERS[j]}) {c}" for j, c in enumerate(choices))


def gpqa_rows(records: Sequence[dict], path: str, seed: int = 0) -> list[dict]:
  """Choices shuffled per question by a Generator seeded with (seed, index): reproducible, order-free."""
  rows = []
  for i, r in enumerate(records):
    where = f"{path}: record {i + 1}"
    q = str(_field(r, ("Question",), where, "GPQA")).strip()
    correct = str(_field(r, ("Correct Answer",), where, "GPQA")).strip()
    wrong = [str(_field(r, (f"Incorrect Answer {j}",), where, "GPQA")).strip() for j in (1, 2, 3)]
    options = [correct] + wrong
    perm = np.random.default_rng([seed, i]).permutation(4)
    shuffled = [options[p] for p in perm]
    answer = LETTERS[int(np.flatnonzero(perm == 0)[0])]
    rows.append(
      {
        "question": f"{q}\n\n{choices_block(shuffled)}\n\n{MC_INSTRUCTION}",
        "answer": answer,
        "type": "multiple_choice",
        "id": str(r.get("Record ID", i)),
      }
    )
  return rows


# -- LiveCodeBench ---------------------------------------------------------------------------------


class _StringsOnly(pickle.Unpickler):
  """LiveCodeBench pickles a JSON string; refuse anything that would import or call code."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case pickle")


def decode_tests(raw, where: str) -> list:
  """LiveCodeBench test cases: a list, a JSON string, or base64(zlib(pickle(JSON string)))."""
  if isinstance(raw, list):
    return raw
  if not isinstance(raw, str):
    raise ValueError(f"{where}: test cases are neither a list nor a string")
  try:
    return json.loads(raw)
  except json.JSONDecodeError:
    pass
  try:
    obj = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(raw.encode("utf-8"))))).load()
  except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as e:
    raise ValueError(f"{where}: test cases are neither JSON nor base64(zlib(pickle)) ({e})") from None
  if isinstance(obj, bytes):
    obj = obj.decode("utf-8")
  return json.loads(obj) if isinstance(obj, str) else obj


def lcb_rows(records: Sequence[dict], path: str, start_date: str = "", end_date: str = "") -> list[dict]:
  """Problems with start_date <= contest_date[:10] < end_date (ISO dates; '' = open)."""
  rows = []
  for i, r in enumerate(records):
    where = f"{path}: record {i + 1}"
    content = str(_field(r, ("question_content",), where, "LiveCodeBench")).strip()
    date = str(r.get("contest_date", ""))[:10]
    if (start_date and date < start_date) or (end_date and date >= end_date):
      continue
    tests = decode_tests(_field(r, ("public_test_cases",), where, "LiveCodeBench"), where)
    tests += decode_tests(r.get("private_test_cases") or "[]", where)
    if not tests:
      raise ValueError(f"{where}: no test cases")
    meta = r.get("metadata") or {}
    meta = json.loads(meta) if isinstance(meta, str) and meta.strip() else (meta or {})
    functional = all(t.get("testtype") == "functional" for t in tests)
    if not functional and any(t.get("testtype") == "functional" for t in tests):
      raise ValueError(f"{where}: mixes functional and stdin tests")
    spec = {
      "style": "functional" if functional else "stdin",
      "tests": [{"input": t["input"], "output": t["output"]} for t in tests],
    }
    starter = str(r.get("starter_code") or "").strip()
    if functional:
      if not meta.get("func_name"):
        raise ValueError(f"{where}: functional tests but no metadata.func_name")
      spec["fn_name"] = meta["func_name"]
    fmt = CODE_STARTER_FORMAT.format(starter=starter) if starter else CODE_STDIN_FORMAT
    rows.append(
      {
        "question": f"{content}\n\n{fmt}",
        "answer": json.dumps(spec),
        "type": "code",
        "id": str(r.get("question_id", i)),
        "contest_date": date,
      }
    )
  return rows


# -- LongBench v2 ----------------------------------------------------------------------------------


def longbench_rows(records: Sequence[dict], path: str, length: str = "") -> list[dict]:
  rows = []
  for i, r in enumerate(records):
    where = f"{path}: record {i + 1}"
    if length and r.get("length") != length:
      continue
    ctx = str(_field(r, ("context",), where, "LongBench v2"))
    q = str(_field(r, ("question",), where, "LongBench v2")).strip()
    choices = [str(_field(r, (f"choice_{L}",), where, "LongBench v2")).strip() for L in LETTERS]
    ans = str(_field(r, ("answer",), where, "LongBench v2")).strip()
    if ans not in LETTERS:
      raise ValueError(f"{where}: answer {ans!r} is not one of A-D")
    rows.append(
      {
        "question": f"Read the document and answer the question.\n\n<document>\n{ctx}\n</document>\n\n"
        f"Question: {q}\n\n{choices_block(choices)}\n\n{MC_INSTRUCTION}",
        "answer": ans,
        "type": "multiple_choice",
        "id": str(r.get("_id", i)),
        "length": r.get("length"),
      }
    )
  return rows


def prepare(
  fmt: str, paths: Sequence[str], seed: int = 0, start_date: str = "", end_date: str = "", longbench_length: str = ""
) -> list[dict]:
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: expected one of {FORMATS}")
  rows = []
  for p in paths:
    recs = read_records(p)
    if fmt == "aime25":
      rows += aime_rows(recs, p)
    elif fmt == "gpqa_diamond":
      rows += gpqa_rows(recs, p, seed)
    elif fmt == "livecodebench":
      rows += lcb_rows(recs, p, start_date, end_date)
    else:
      rows += longbench_rows(recs, p, longbench_length)
  if not rows:
    raise ValueError(f"{', '.join(paths)}: no {fmt} questions left after filtering")
  return rows


def write_rows(rows: Sequence[dict], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined by `cli.run`, only when this module is the program)."""
  flags.DEFINE_enum("format", None, list(FORMATS), "published format of the input file(s)")
  flags.DEFINE_list("input", None, "local benchmark file(s) in that format")
  flags.DEFINE_string("output", None, "benchmark JSONL to write ({question, answer, type, id} rows)")
  flags.DEFINE_integer("seed", 0, "gpqa_diamond: choice-shuffling seed")
  flags.DEFINE_string("start_date", "", "livecodebench: keep contest_date >= this (YYYY-MM-DD)")
  flags.DEFINE_string("end_date", "", "livecodebench: keep contest_date < this (YYYY-MM-DD)")
  flags.DEFINE_enum("longbench_length", "", ["", "short", "medium", "long"], "longbench_v2: keep one length")


def main(argv):
  del argv
  from pipo_jax import cli

  cli.require("format", "input", "output")
  rows = prepare(FLAGS.format, FLAGS.input, FLAGS.seed, FLAGS.start_date, FLAGS.end_date, FLAGS.longbench_length)
  write_rows(rows, FLAGS.output)
  logging.info("wrote %d %s rows to %s", len(rows), FLAGS.format, FLAGS.output)
  print(f"{FLAGS.output}: {len(rows)} {FLAGS.format} questions")


if __name__ == "__main__":
  from pipo_jax import cli

  cli.run(main, define_flags)
