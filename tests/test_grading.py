"""Grading rules (docs/method.md#evaluation) on hand-made completions."""

import threading

import pytest

from pipo_jax.evaluation import grading


@pytest.mark.parametrize(
  "text,expected",
  [
    (r"so \boxed{29}.", "29"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{2}}{2}} and more", r"\frac{\sqrt{2}}{2}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed {7}", "7"),
    (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
    (r"\boxed{3} and a truncated \boxed{\frac{1}{", "3"),
    ("no box at all", None),
    (r"\boxed", None),
  ],
)
def test_last_boxed(text, expected):
  assert grading.last_boxed(text) == expected


@pytest.mark.parametrize(
  "completion,gold,expected",
  [
    (r"The answer is $\boxed{1/2}$.", "0.5", True),
    (r"The answer is $\boxed{0.5}$.", "1/2", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\frac{1}{2}}", "1/2", True),
    (r"<think>hmm</think> final: \boxed{29}", "29", True),
    (r"\boxed{29}", "30", False),  # wrong box
    ("the answer is 29", "29", False),  # no box: wrong even though 29 appears
    (r"\boxed{30} no wait \boxed{29}", "29", True),  # several boxes: the last wins
    (r"\boxed{29} no wait \boxed{30}", "29", False),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}", True),  # nested braces + LaTeX gold fallback
    (r"\boxed{\sqrt{4}}", "2", True),
    (r"\boxed{}", "0", False),
  ],
)
def test_grade_math(completion, gold, expected):
  assert grading.grade(completion, gold, "math") is expected


def test_grade_multiple_choice_last_three_lines():
  body = "reasoning\n" * 5
  assert grading.grade(body + r"So the answer is \boxed{C}", "C", "multiple_choice")
  assert not grading.grade(body + r"So the answer is \boxed{C}", "B", "multiple_choice")
  # The last match wins.
  assert grading.grade(body + r"\boxed{A} no, \boxed{B}" + "\n", "B", "multiple_choice")
  # A box outside the last 3 lines of the stripped text does not count (trailing blank lines are stripped first).
  assert grading.grade(r"\boxed{D}" + "\nx\ny\n\n\n", "D", "multiple_choice")
  assert not grading.grade(r"\boxed{D}" + "\nx\ny\nz\n", "D", "multiple_choice")
  # Only single capital letters count.
  assert not grading.grade(r"\boxed{d}", "D", "multiple_choice")
  assert not grading.grade(r"\boxed{AB}", "A", "multiple_choice")


def test_grade_unknown_type():
  with pytest.raises(ValueError, match="answer_type"):
    grading.grade("x", "y", "essay")


def test_grade_math_off_main_thread():
  """math-verify's SIGALRM timeout would raise off the main thread; grading must still work there."""
  out = {}
  t = threading.Thread(target=lambda: out.setdefault("r", grading.grade(r"\boxed{1/2}", "0.5", "math")))
  t.start()
  t.join()
  assert out["r"] is True
  assert grading._effective_timeout(5) == 5  # the main thread keeps the timeout


def test_grade_samples_matrix():
  comps = [[r"\boxed{2}", r"\boxed{3}"], [r"\boxed{B}", "no answer"]]
  out = grading.grade_samples(comps, ["2", "B"], ["math", "multiple_choice"])
  assert out.tolist() == [[1, 0], [1, 0]]
  assert grading.grade_samples([[r"\boxed{1}"]], ["1"], "math").tolist() == [[1]]
  with pytest.raises(ValueError, match="sample counts"):
    grading.grade_samples([["a"], ["b", "c"]], ["1", "2"], "math")
