"""Sandboxed code grading (pipo_jax/evaluation/code_grading.py): correct, wrong, crashing, infinite-loop, memory-hog,
file-writing, process-spawning and network-using solutions. Nothing here leaves 127.0.0.1."""

import json
import os
import socket
import threading
import time

import numpy as np
import pytest

from pipo_jax.evaluation import code_grading, eval_metrics, grading
from pipo_jax.evaluation.code_grading import Limits

STDIN_ROW = json.dumps(
  {"style": "stdin", "tests": [{"input": "3 4\n", "output": "7\n"}, {"input": "10 -2\n", "output": "8"}]}
)
FUNC_ROW = json.dumps(
  {
    "style": "functional",
    "fn_name": "twoSum",
    "tests": [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]"}, {"input": "[3, 2, 4]\n6", "output": "[1, 2]"}],
  }
)
FAST = Limits(time_s=10.0, memory_mb=512)


def fence(code, lang="python"):
  return f"Some reasoning.\n```{lang}\n{code}\n```\nDone."


ADD = "a, b = map(int, input().split())\nprint(a + b)"
TWO_SUM = (
  "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
  "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
  "                return (seen[target - x], i)\n            seen[x] = i\n"
)


def test_extract_last_python_block():
  text = "```python\nprint(1)\n```\nthen\n```text\nnot code\n```\n```py\nprint(2)\n```\ntrailing"
  assert code_grading.extract_code(text) == "print(2)\n"
  assert code_grading.extract_code("no fence at all") is None


def test_stdout_comparison_is_livecodebench_rule():
  assert code_grading.stdout_matches("7 \n", "7")
  assert code_grading.stdout_matches("1.50 2\n", "1.5 2.0")
  assert not code_grading.stdout_matches("7\n8", "7")
  assert not code_grading.stdout_matches("abc", "abd")


def test_correct_and_wrong_stdin_and_functional():
  assert code_grading.grade_code(fence(ADD), STDIN_ROW, FAST)
  assert not code_grading.grade_code(fence("a, b = map(int, input().split())\nprint(a - b)"), STDIN_ROW, FAST)
  assert code_grading.grade_code(fence(TWO_SUM), FUNC_ROW, FAST)  # a tuple result equals the JSON list
  assert not code_grading.grade_code(
    fence(TWO_SUM.replace("return (seen[target - x], i)", "return [i]")), FUNC_ROW, FAST
  )
  assert not code_grading.grade_code("I think the answer is a+b.", STDIN_ROW, FAST)  # no code block


def test_crash_and_infinite_loop():
  assert not code_grading.grade_code(fence("raise SystemExit(3)"), STDIN_ROW, FAST)
  assert not code_grading.grade_code(fence("1/0"), STDIN_ROW, FAST)
  t0 = time.perf_counter()
  status, _, _ = code_grading.run_one("while True:\n    pass\n", "", "stdin", "", Limits(time_s=1.0))
  assert status == "timeout" and time.perf_counter() - t0 < 5.0


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      return "\nState:\tZ" not in f.read()
  except FileNotFoundError:
    return False


def test_timeout_kills_the_whole_process_group(tmp_path):
  """A solution that starts a child and loops: on timeout both are gone (the child reported its pid to a file
  outside the sandbox's directory, which the test alone reads)."""
  pid_file = tmp_path / "pids"
  code = (
    f"import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n    os._exit(0)\n"
    f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{pid}}')\ntime.sleep(60)\n"
  )
  status, _, _ = code_grading.run_one(code, "", "stdin", "", Limits(time_s=15.0))  # room for a slow start
  assert status == "timeout"
  pids = [int(p) for p in pid_file.read_text().split()]
  time.sleep(0.5)
  assert len(pids) == 2 and not any(_alive(p) for p in pids)


def test_memory_hog_fails_within_the_limit():
  hog = "x = bytearray(3 * 1024 ** 3)\nprint(len(x))"
  status, out, _ = code_grading.run_one(hog, "", "stdin", "", Limits(time_s=10.0, memory_mb=512))
  assert status == "error" and out == ""


def test_file_writes_stay_in_a_removed_temp_dir(tmp_path):
  """Relative writes land in the per-test directory, which is removed; a big write hits the size limit."""
  before = set(os.listdir("/tmp"))
  code = (
    "import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())\nopen('big.bin', 'wb').write(b'0' * (8 << 20))\n"
  )
  status, out, _ = code_grading.run_one(code, "", "stdin", "", Limits(time_s=30.0, file_mb=1))
  assert status == "error"  # EFBIG (Python ignores SIGXFSZ) on the 8 MiB write
  work = out.strip()
  assert work.startswith(os.path.realpath(os.path.dirname(work))) and "pipo_code_" in work
  assert not os.path.exists(work)
  assert not [d for d in set(os.listdir("/tmp")) - before if d.startswith("pipo_code_")]
  assert not os.path.exists("out.txt")


def test_no_network():
  """The solution tries to connect to a server the test runs on 127.0.0.1: it fails, the server sees nothing."""
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(1)
  srv.settimeout(10.0)
  port = srv.getsockname()[1]
  got = []

  def accept():
    try:
      got.append(srv.accept())
    except OSError:
      pass

  th = threading.Thread(target=accept)
  th.start()
  code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
  status, out, _ = code_grading.run_one(code, "", "stdin", "", Limits(time_s=60.0))
  th.join()
  srv.close()
  assert status == "error" and "connected" not in out and not got


def test_grade_samples_code_in_parallel_with_pass_at_k():
  """Code rows through grading.grade_samples (parallel workers) beside a multiple-choice row; pass@k / avg@k by hand."""
  comps = [
    [fence(ADD), fence("print(0)"), "no code"],
    [fence(TWO_SUM), fence(TWO_SUM), fence("class Solution: pass")],
    ["\\boxed{B}", "\\boxed{C}", "\\boxed{B}"],
  ]
  t0 = time.perf_counter()
  c = grading.grade_samples(comps, [STDIN_ROW, FUNC_ROW, "B"], ["code", "code", "multiple_choice"])
  print(f"graded 6 code samples in {time.perf_counter() - t0:.2f}s")
  np.testing.assert_array_equal(c, [[1, 0, 0], [1, 1, 0], [1, 0, 1]])
  m = eval_metrics.benchmark_metrics(c, k=2)
  assert m["avg_at_k"] == pytest.approx(5 / 9)
  # pass@2 per question: 1 - C(n - c, 2) / C(3, 2) = 1 - 1/3 (c = 1), 1 (c = 2), 1 (c = 2).
  assert m["pass_at_k"] == pytest.approx((2 / 3 + 1 + 1) / 3)
