"""prepare_benchmark on small fixtures written in the published formats of AIME25, GPQA-Diamond, LiveCodeBench
(v6 file layout) and LongBench v2."""

import base64
import csv
import json
import pickle
import zlib

import numpy as np
import pytest

from pipo_jax import prepare_benchmark as pb
from pipo_jax.evaluation import code_grading, grading


def _jsonl(path, recs):
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return str(path)


def test_aime25(tmp_path):
  a = _jsonl(tmp_path / "aime2025-I.jsonl", [{"question": "Find x. ", "answer": "70"}])  # opencompass layout
  b = _jsonl(tmp_path / "test.jsonl", [{"problem": "Find y.", "answer": 588, "id": "II-1"}])  # math-ai layout
  rows = pb.prepare("aime25", [a, b])
  assert rows == [
    {"question": "Find x.", "answer": "70", "type": "math", "id": "aime2025-I.jsonl:0"},
    {"question": "Find y.", "answer": "588", "type": "math", "id": "II-1"},
  ]
  assert grading.grade("so \\boxed{588}", rows[1]["answer"], rows[1]["type"])


GPQA_HEADER = [
  "Pre-Revision Question",
  "Question",
  "Correct Answer",
  "Incorrect Answer 1",
  "Incorrect Answer 2",
  "Incorrect Answer 3",
  "Explanation",
  "Record ID",
  "High-level domain",
]


def _gpqa_csv(path, n):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(GPQA_HEADER)
    for i in range(n):
      w.writerow(
        ["pre", f'Q{i}: which, "quoted"?', f"right{i}", f"w1_{i}", f"w2_{i}", f"w3_{i}", "expl", f"rec{i}", "Physics"]
      )
  return str(path)


def test_gpqa_diamond_shuffles_with_a_fixed_seed(tmp_path):
  path = _gpqa_csv(tmp_path / "gpqa_diamond.csv", 40)
  rows = pb.prepare("gpqa_diamond", [path], seed=0)
  assert rows == pb.prepare("gpqa_diamond", [path], seed=0)  # reproducible
  assert [r["answer"] for r in rows] != [r["answer"] for r in pb.prepare("gpqa_diamond", [path], seed=1)]
  for i, r in enumerate(rows):
    assert r["type"] == "multiple_choice" and r["id"] == f"rec{i}"
    assert r["question"].startswith(f'Q{i}: which, "quoted"?\n\n')
    lines = {ln[:2]: ln[3:] for ln in r["question"].splitlines() if ln[:2] in ("A)", "B)", "C)", "D)")}
    assert sorted(lines.values()) == sorted([f"right{i}", f"w1_{i}", f"w2_{i}", f"w3_{i}"])
    assert lines[r["answer"] + ")"] == f"right{i}"  # the letter points at the correct answer
    # Independent reference of the shuffle: the permutation of a Generator seeded with (0, i).
    perm = np.random.default_rng([0, i]).permutation(4)
    assert r["answer"] == "ABCD"[list(perm).index(0)]
  counts = np.bincount(["ABCD".index(r["answer"]) for r in rows], minlength=4)
  assert counts.min() >= 3  # the correct answer is not stuck at one letter
  assert grading.grade("...\n\\boxed{" + rows[0]["answer"] + "}", rows[0]["answer"], "multiple_choice")


def _lcb_private(tests):
  return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def test_livecodebench_stdin_and_functional(tmp_path):
  stdin_pub = [{"input": "3 4\n", "output": "7\n", "testtype": "stdin"}]
  stdin_priv = [{"input": "10 -2\n", "output": "8\n", "testtype": "stdin"}]
  fn_pub = [{"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"}]
  fn_priv = [{"input": "[3,3]\n6", "output": "[0, 1]", "testtype": "functional"}]
  recs = [
    {
      "question_title": "A+B",
      "question_content": "Add two numbers.",
      "platform": "atcoder",
      "question_id": "abc001_a",
      "contest_id": "abc001",
      "contest_date": "2025-03-01T00:00:00",
      "starter_code": "",
      "difficulty": "easy",
      "public_test_cases": json.dumps(stdin_pub),
      "private_test_cases": _lcb_private(stdin_priv),
      "metadata": "{}",
    },
    {
      "question_title": "Two Sum",
      "question_content": "Return indices.",
      "platform": "leetcode",
      "question_id": "1",
      "contest_id": "w1",
      "contest_date": "2025-04-01T00:00:00",
      "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
      "difficulty": "easy",
      "public_test_cases": json.dumps(fn_pub),
      "private_test_cases": _lcb_private(fn_priv),
      "metadata": json.dumps({"func_name": "twoSum"}),
    },
    {
      "question_title": "old",
      "question_content": "Too old.",
      "contest_date": "2024-01-01T00:00:00",
      "starter_code": "",
      "public_test_cases": json.dumps(stdin_pub),
      "private_test_cases": "[]",
      "metadata": "{}",
    },
  ]
  path = _jsonl(tmp_path / "test6.jsonl", recs)
  rows = pb.prepare("livecodebench", [path], start_date="2025-02-01", end_date="2025-05-01")
  assert [r["id"] for r in rows] == ["abc001_a", "1"]
  s0, s1 = (json.loads(r["answer"]) for r in rows)
  assert s0 == {"style": "stdin", "tests": [{"input": "3 4\n", "output": "7\n"}, {"input": "10 -2\n", "output": "8\n"}]}
  assert s1["style"] == "functional" and s1["fn_name"] == "twoSum" and len(s1["tests"]) == 2
  assert "stdin" in rows[0]["question"] and "def twoSum" in rows[1]["question"]
  # The rows grade through the sandbox: a right and a wrong program each.
  good0 = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
  good1 = (
    "```python\nclass Solution:\n    def twoSum(self, nums, target):\n        d = {}\n"
    "        for i, x in enumerate(nums):\n            if target - x in d:\n"
    "                return [d[target - x], i]\n"
    "            d[x] = i\n```"
  )
  c = grading.grade_samples(
    [[good0, good0.replace("+", "*")], [good1, "```python\nprint(1)\n```"]],
    [r["answer"] for r in rows],
    [r["type"] for r in rows],
  )
  np.testing.assert_array_equal(c, [[1, 0], [1, 0]])


def test_livecodebench_refuses_code_in_the_pickle(tmp_path):
  evil = base64.b64encode(zlib.compress(pickle.dumps(code_grading.Limits()))).decode()
  rec = {
    "question_content": "x",
    "public_test_cases": "[]",
    "private_test_cases": evil,
    "metadata": "{}",
    "contest_date": "2025-03-01",
  }
  with pytest.raises(ValueError, match=r"test6.jsonl: record 1: test cases are neither JSON nor .*refusing"):
    pb.prepare("livecodebench", [_jsonl(tmp_path / "test6.jsonl", [rec])])


def test_longbench_v2(tmp_path):
  recs = [
    {
      "_id": "x1",
      "domain": "Single-Document QA",
      "sub_domain": "Legal",
      "difficulty": "hard",
      "length": "short",
      "question": "Who signed?",
      "choice_A": "Ann",
      "choice_B": "Bob",
      "choice_C": "Cid",
      "choice_D": "Dee",
      "answer": "C",
      "context": "Long text... Cid signed it.",
    },
    {
      "_id": "x2",
      "domain": "d",
      "sub_domain": "s",
      "difficulty": "easy",
      "length": "long",
      "question": "q",
      "choice_A": "1",
      "choice_B": "2",
      "choice_C": "3",
      "choice_D": "4",
      "answer": "A",
      "context": "c",
    },
  ]
  path = tmp_path / "data.json"
  path.write_text(json.dumps(recs))
  rows = pb.prepare("longbench_v2", [str(path)], longbench_length="short")
  assert len(rows) == 1 and rows[0]["answer"] == "C" and rows[0]["type"] == "multiple_choice"
  q = rows[0]["question"]
  assert "<document>\nLong text... Cid signed it.\n</document>" in q and "Question: Who signed?" in q
  assert "A) Ann\nB) Bob\nC) Cid\nD) Dee" in q
  assert len(pb.prepare("longbench_v2", [str(path)])) == 2


def test_wrong_format_is_one_line_naming_the_file(tmp_path):
  path = _gpqa_csv(tmp_path / "gpqa_diamond.csv", 2)
  with pytest.raises(
    ValueError,
    match=r"gpqa_diamond.csv: record 1: no 'question_content' field; is this a "
    r"LiveCodeBench file\?",
  ):
    pb.prepare("livecodebench", [path])
  bad = tmp_path / "aime.jsonl"
  bad.write_text('{"question": "q", "answer": 1}\n{oops\n')
  with pytest.raises(ValueError, match=r"aime.jsonl:2: not valid JSON"):
    pb.prepare("aime25", [str(bad)])
  with pytest.raises(FileNotFoundError, match=r"nope.json: benchmark file not found"):
    pb.prepare("longbench_v2", [str(tmp_path / "nope.json")])
