"""Rule-based answer grading (docs/method.md#evaluation).

Three graders and a dispatcher:

* `grade_math(completion, gold)`: the LAST `\\boxed{...}` of the full completion text (balanced braces, nesting
  allowed) is extracted by us, then parsed and compared with math-verify. No box means wrong.
* `grade_multiple_choice(completion, gold)`: the regex `\\boxed{([A-Z])}` over the last 3 lines of the stripped
  text; the last match must equal the gold letter.
* `code`: the last fenced Python block run against the row's tests in a sandboxed subprocess
  (pipo_jax/evaluation/code_grading.py; `answer` holds the tests as JSON).
* `grade(completion, answer, answer_type)` with `answer_type` in `ANSWER_TYPES`; `grade_samples` grades code
  samples on a pool of parallel workers.

math-verify configuration (the reference's, `RedAI-Infra/PIPO pipo/eval/evaluator.py`, adapted to the 0.9.0 API
where `boxed=` lives in `NormalizationConfig`):

* gold: `parse(gold, [ExprExtractionConfig()])`; if that extracts nothing (a LaTeX gold such as `\\frac{1}{2}`, which
  the reference would silently grade as always wrong), we retry with a LaTeX config on `$gold$`. AIME golds are
  integers, so the reference behaviour is unchanged there.
* prediction: `parse(r"\\boxed{<last box>}", [LatexExtractionConfig(boxed_match_priority=0,
  try_extract_without_anchor=False, normalization_config=NormalizationConfig(basic_latex=True, units=True,
  malformed_operators=False, nits=False, boxed="last")), ExprExtractionConfig()], extraction_mode="first_match")`.
* correct iff `verify(gold, pred)`.

Two deliberate differences from the reference, both to make "the last box wins" exact:
  1. We cut out the last box ourselves before calling math-verify. Given the whole text, math-verify 0.9.0 joins
     several boxes into a set (`\\boxed{29} ... \\boxed{30}` parses as `{29, 30}`), so neither answer matches.
  2. Text without any box is wrong. The reference also passes `ExprExtractionConfig()` over the whole text, which
     would pick up a bare number such as "the answer is 29"; the protocol says the answer is the boxed one.

Timeouts: math-verify bounds `parse` and `verify` with `signal.alarm` (SIGALRM). That only works on the main thread
of the main interpreter (elsewhere math-verify raises ValueError), and its cleanup calls `signal.alarm(0)`, which
would cancel an alarm some other code had set. `_effective_timeout` therefore enables the timeout only on the main
thread and only when no ITIMER_REAL alarm is pending; otherwise grading runs without a timeout (a pathological
expression can then take long, never crash). Run grading in worker *processes* (whose main thread can use the
alarm) rather than threads if timeouts matter. SIGALRM is not used by JAX, grain or orbax.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Sequence

import numpy as np
from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

ANSWER_TYPES = ("math", "multiple_choice", "code")
DEFAULT_TIMEOUT_S = 5

_BOXED = "\\boxed"
_MC_PATTERN = re.compile(r"\\boxed{([A-Z])}")

_GOLD_CONFIG = (ExprExtractionConfig(),)
_GOLD_LATEX_FALLBACK = (LatexExtractionConfig(),)
_PRED_CONFIG = (
  LatexExtractionConfig(
    boxed_match_priority=0,
    try_extract_without_anchor=False,
    normalization_config=NormalizationConfig(
      nits=False, malformed_operators=False, basic_latex=True, units=True, boxed="last"
    ),
  ),
  ExprExtractionConfig(),
)

_log = logging.getLogger(__name__)
_warned_no_timeout = False


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` in `text`, braces balanced (nested braces kept), or None.

  A box whose braces never close (a truncated generation) does not count; the search then falls back to the
  previous complete box, since that is the last answer the model actually finished writing.
  """
  start = text.rfind(_BOXED)
  while start != -1:
    i = start + len(_BOXED)
    while i < len(text) and text[i] in " \t":  # `\boxed {x}` is valid LaTeX
      i += 1
    if i < len(text) and text[i] == "{":
      depth = 0
      for j in range(i, len(text)):
        c = text[j]
        if c == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
          continue  # an escaped brace `\{` is literal text, not nesting
        if c == "{" and (j == 0 or text[j - 1] != "\\"):
          depth += 1
        elif c == "}" and (j == 0 or text[j - 1] != "\\"):
          depth -= 1
          if depth == 0:
            return text[i + 1 : j]
    start = text.rfind(_BOXED, 0, start)
  return None


def _effective_timeout(timeout_s: int | None) -> int | None:
  """`timeout_s` where math-verify's SIGALRM timeout is safe to use here, else None (see module docstring)."""
  global _warned_no_timeout
  if not timeout_s or timeout_s <= 0:
    return None
  safe = (
    hasattr(signal, "SIGALRM")
    and threading.current_thread() is threading.main_thread()
    and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
  )
  if safe:
    return int(timeout_s)
  if not _warned_no_timeout:
    _log.warning(
      "math grading runs without a timeout: SIGALRM is unavailable here (not the main thread, or an "
      "alarm is already pending). Grade in worker processes to keep the timeout."
    )
    _warned_no_timeout = True
  return None


def parse_gold(gold: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> list:
  """math-verify parse of a gold answer: expression config first, LaTeX as a fallback. [] when unparseable."""
  t = _effective_timeout(timeout_s)
  parsed = parse(str(gold), list(_GOLD_CONFIG), parsing_timeout=t)
  if not parsed:
    parsed = parse(f"${gold}$", list(_GOLD_LATEX_FALLBACK), parsing_timeout=t)
  return parsed


def grade_math(completion: str, gold: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> bool:
  """True iff the last boxed answer of `completion` is mathematically equivalent to `gold` (math-verify)."""
  box = last_boxed(completion)
  if box is None or not box.strip():
    return False
  t = _effective_timeout(timeout_s)
  pred = parse(_BOXED + "{" + box + "}", list(_PRED_CONFIG), extraction_mode="first_match", parsing_timeout=t)
  if not pred:
    return False
  gold_parsed = parse_gold(gold, timeout_s)
  if not gold_parsed:
    _log.warning("unparseable gold answer %r: graded as wrong", gold)
    return False
  return bool(verify(gold_parsed, pred, timeout_seconds=t))


def grade_multiple_choice(completion: str, gold: str) -> bool:
  """True iff the last `\\boxed{X}` (one capital letter) within the last 3 lines of the stripped text is `gold`."""
  tail = "\n".join(completion.strip().split("\n")[-3:])
  matches = _MC_PATTERN.findall(tail)
  return bool(matches) and matches[-1] == str(gold).strip()


def grade(completion: str, answer: str, answer_type: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> bool:
  """Grade one completion. `answer_type` is one of `ANSWER_TYPES`."""
  if answer_type == "math":
    return grade_math(completion, answer, timeout_s)
  if answer_type == "multiple_choice":
    return grade_multiple_choice(completion, answer)
  if answer_type == "code":
    from pipo_jax.evaluation import code_grading

    return code_grading.grade_code(completion, answer)
  raise ValueError(f"grade: unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


def grade_samples(
  completions_QN: Sequence[Sequence[str]],
  answers_Q: Sequence[str],
  answer_types_Q: Sequence[str] | str,
  timeout_s: int | None = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
  """0/1 matrix [questions, samples] for a benchmark: sample j of question i graded against answer i.

  `answer_types_Q` is one type for all questions or one per question. Every question needs the same number of
  samples (pass@k / avg@k assume it).
  """
  q = len(completions_QN)
  if len(answers_Q) != q:
    raise ValueError(f"grade_samples: {q} questions but {len(answers_Q)} answers")
  types = [answer_types_Q] * q if isinstance(answer_types_Q, str) else list(answer_types_Q)
  n = {len(c) for c in completions_QN}
  if len(n) > 1:
    raise ValueError(f"grade_samples: questions have different sample counts {sorted(n)}")
  out = np.zeros((q, n.pop() if n else 0), np.int8)
  code_jobs, code_at = [], []
  for i, (comps, a, t) in enumerate(zip(completions_QN, answers_Q, types)):
    for j, c in enumerate(comps):
      if t == "code":  # run in parallel below
        code_jobs.append((c, a))
        code_at.append((i, j))
      else:
        out[i, j] = grade(c, a, t, timeout_s)
  if code_jobs:
    from pipo_jax.evaluation import code_grading

    for (i, j), ok in zip(code_at, code_grading.grade_many(code_jobs)):
      out[i, j] = ok
  return out
