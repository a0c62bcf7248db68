"""Code grading: the last fenced Python block of a completion, run against the row's tests in a sandbox.

A `type: "code"` benchmark row carries its tests in `answer`, as a JSON string (what prepare_benchmark writes
for LiveCodeBench):

    {"style": "stdin" | "functional", "fn_name": str (functional only),
     "tests": [{"input": str, "output": str}, ...]}

* stdin style: the program reads `input` on stdin; its stdout must equal `output` as LiveCodeBench compares
  them: both stripped and split into lines (each line stripped), the same number of lines, and each pair of
  lines equal as text or, failing that, as lists of decimal numbers (`1.50` = `1.5`).
* functional style (LeetCode): the program defines `class Solution` with method `fn_name` (a top-level
  function of that name is accepted too); each line of `input` is one JSON argument, `output` one JSON value;
  the result must equal it (tuples compared as lists).

A completion passes when every test passes (stopping at the first failure, as LiveCodeBench does); no fenced
block means fail. The sandbox, per test: a fresh `python -I` subprocess in its own temporary working directory
(removed afterwards) and its own process group (killed whole on timeout), a wall-clock time limit, an address
space limit (RLIMIT_AS) and a file-size limit (RLIMIT_FSIZE), no network (a new network namespace via
`unshare -rn` where the kernel allows it, and in every case socket creation disabled inside the interpreter),
an environment stripped to PATH / LANG. It confines mistakes, not adversaries: the process still runs as the
user. Samples are graded by a pool of worker threads, each waiting on its own subprocess.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import decimal
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

DEFAULT_TIME_LIMIT_S = 6.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_FILE_MB = 16
_OUTPUT_CAP = 1 << 24  # bytes of stdout kept

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)

# Runs inside the sandboxed interpreter: limits are set by the parent (preexec); this blocks sockets, then runs
# the solution as __main__ (stdin style) or calls its function (functional style) and prints the JSON result.
_HARNESS = r"""
import json, socket, sys
def _no_network(*a, **k):
    raise OSError("network access is disabled in the grading sandbox")
socket.socket = socket.create_connection = socket.socketpair = _no_network
socket.getaddrinfo = _no_network
mode, fn_name = sys.argv[1], sys.argv[2]
src = open("solution.py", encoding="utf-8").read()
if mode == "stdin":
    g = {"__name__": "__main__"}
    exec(compile(src, "solution.py", "exec"), g)
else:
    args = [json.loads(line) for line in open("input.txt", encoding="utf-8").read().split("\n") if line.strip()]
    g = {"__name__": "solution"}
    exec(compile("from typing import *\nimport collections, heapq, bisect, itertools, math, functools\n" + src,
                 "solution.py", "exec"), g)
    if "Solution" in g and hasattr(g["Solution"], fn_name):
        fn = getattr(g["Solution"](), fn_name)
    else:
        fn = g[fn_name]
    out = fn(*args)
    sys.stdout.write("\n__RESULT__" + json.dumps(out, default=list))
"""


@dataclasses.dataclass(frozen=True)
class Limits:
  time_s: float = DEFAULT_TIME_LIMIT_S
  memory_mb: int = DEFAULT_MEMORY_MB
  file_mb: int = DEFAULT_FILE_MB


@dataclasses.dataclass
class TestResult:
  passed: bool
  status: str  # passed | wrong | error | timeout
  detail: str = ""


def extract_code(completion: str) -> str | None:
  """The last fenced code block that is Python (``` python / py / untagged), or None."""
  blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
  blocks = [b for lang, b in blocks if lang in ("", "python", "python3", "py")]
  return blocks[-1] if blocks else None


def parse_tests(answer) -> dict:
  """The tests of a code row (`answer`: the JSON string or the dict); ValueError when malformed."""
  spec = json.loads(answer) if isinstance(answer, str) else answer
  if (
    not isinstance(spec, dict)
    or spec.get("style") not in ("stdin", "functional")
    or not isinstance(spec.get("tests"), list)
  ):
    raise ValueError('a code row\'s answer must be JSON {"style": "stdin"|"functional", "tests": [...]}')
  if spec["style"] == "functional" and not spec.get("fn_name"):
    raise ValueError("a functional code row needs 'fn_name'")
  return spec


# -- output comparison (LiveCodeBench's stdin rule) --------------------------------------------------


def _lines(text: str) -> list:
  return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list | None:
  try:
    return [decimal.Decimal(x) for x in line.split()]
  except decimal.InvalidOperation:
    return None


def stdout_matches(got: str, want: str) -> bool:
  a, b = _lines(got), _lines(want)
  if len(a) != len(b):
    return False
  for x, y in zip(a, b):
    if x == y:
      continue
    dx, dy = _decimals(x), _decimals(y)
    if dx is None or dy is None or dx != dy:
      return False
  return True


def _normalise(v):
  if isinstance(v, (list, tuple)):
    return [_normalise(x) for x in v]
  if isinstance(v, dict):
    return {k: _normalise(x) for k, x in v.items()}
  return v


# -- the sandbox -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple:
  """('unshare', '-rn') when a new user + network namespace can be created here, else ()."""
  exe = shutil.which("unshare")
  if not exe:
    return ()
  try:
    ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    ok = False
  return (exe, "-rn") if ok else ()


def _preexec(limits: Limits):
  import resource

  def fn():
    mem = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = limits.file_mb << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

  return fn


def run_one(code: str, stdin: str, style: str, fn_name: str, limits: Limits) -> tuple[str, str, int | None]:
  """Run one test in the sandbox: (status: ok | error | timeout, stdout, returncode)."""
  work = tempfile.mkdtemp(prefix="pipo_code_")
  try:
    with open(os.path.join(work, "solution.py"), "w", encoding="utf-8") as f:
      f.write(code)
    with open(os.path.join(work, "input.txt"), "w", encoding="utf-8") as f:
      f.write(stdin)
    with open(os.path.join(work, "harness.py"), "w", encoding="utf-8") as f:
      f.write(_HARNESS)
    cmd = [*_netns_prefix(), sys.executable, "-I", "harness.py", style, fn_name or "-"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen(
      cmd,
      cwd=work,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      start_new_session=True,
      preexec_fn=_preexec(limits),
    )
    try:
      out, _ = proc.communicate(stdin.encode() if style == "stdin" else b"", timeout=limits.time_s)
      status = "ok" if proc.returncode == 0 else "error"
    except subprocess.TimeoutExpired:
      status = "timeout"
      out = b""
    finally:
      try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children the solution started too
      except ProcessLookupError:
        pass
      if status == "timeout":
        proc.communicate()
    return status, out[:_OUTPUT_CAP].decode("utf-8", "replace"), proc.returncode
  finally:
    shutil.rmtree(work, ignore_errors=True)


def run_test(code: str, test: dict, style: str, fn_name: str, limits: Limits) -> TestResult:
  status, out, rc = run_one(code, test["input"], style, fn_name or "", limits)
  if status == "timeout":
    return TestResult(False, "timeout", f"over {limits.time_s:g}s")
  if status == "error":
    return TestResult(False, "error", f"exit status {rc}")
  if style == "stdin":
    ok = stdout_matches(out, test["output"])
  else:
    _, sep, result = out.rpartition("\n__RESULT__")
    if not sep:
      return TestResult(False, "error", "no result")
    try:
      ok = _normalise(json.loads(result)) == _normalise(json.loads(test["output"]))
    except json.JSONDecodeError:
      ok = False
  return TestResult(ok, "passed" if ok else "wrong")


def grade_code(completion: str, answer, limits: Limits = Limits()) -> bool:
  """True iff the last fenced Python block of `completion` passes every test of `answer` (module docstring)."""
  spec = parse_tests(answer)
  code = extract_code(completion)
  if code is None:
    return False
  for t in spec["tests"]:
    if not run_test(code, t, spec["style"], spec.get("fn_name", ""), limits).passed:
      return False
  return True


def grade_many(jobs: Sequence[tuple[str, str]], limits: Limits = Limits(), workers: int | None = None) -> list:
  """grade_code over (completion, answer) pairs with a pool of worker threads; results in order."""
  if not jobs:
    return []
  workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
  with cf.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda j: grade_code(j[0], j[1], limits), jobs))
