"""Evaluation metrics: pass@k, avg@k, per-benchmark and overall aggregation, length and throughput accounting.

Accuracies are fractions in [0, 1] (reports render them as percentages).

Units (docs/method.md#evaluation-units):
* a **token** is a real output token id; PAD ids are never counted as output tokens;
* a **slot** is one decode step at the method's own granularity: one token for Regular / EAGLE-2 / MTP as the
  paper counts them, one pair `[token1, token2-or-PAD]` for PIPO;
* PAD ids are counted on their own (`n_pad`), and the PAD ratio is the share of draft positions (token2 of a
  pair) that were PAD.
The reference counted PIPO's PAD ids as tokens against a 32K bucket while doubling PIPO's id budget to 64K, so PIPO
answers between 32K and 64K ids scored 0 in every bucket. Here budgets are always applied to one explicit unit
(slots by default, matching the paper's 32K-slot budget), never to raw id counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k estimate (Chen et al. 2021) from n samples of which c are correct.

  1 - C(n-c, k) / C(n, k), evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials, no overflow.
  With k == n this is exactly the "any of the n samples correct" rate the paper reports as pass@4.
  """
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
  if n - c < k:  # every k-subset contains a correct sample
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _as_correct_matrix(correct_QN) -> np.ndarray:
  arr = np.asarray(correct_QN, dtype=np.float64)
  if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"expected a non-empty [questions, samples] 0/1 matrix, got shape {arr.shape}")
  if not np.all((arr == 0) | (arr == 1)):
    raise ValueError("correctness values must be 0/1 (or bool)")
  return arr


def avg_at_k(correct_QN) -> float:
  """Mean per-sample accuracy over a [questions, samples] 0/1 matrix (the evaluation code's "pass@1")."""
  return float(_as_correct_matrix(correct_QN).mean())


def benchmark_metrics(correct_QN, k: int | None = None) -> dict:
  """avg@k and pass@k of one benchmark from its [questions, samples] 0/1 matrix.

  pass@k is the unbiased estimator averaged over questions; k defaults to the number of samples per question.
  Returns {"avg_at_k", "pass_at_k", "k", "n_questions", "n_samples"}.
  """
  arr = _as_correct_matrix(correct_QN)
  q, n = arr.shape
  k = n if k is None else k
  c = arr.sum(axis=1).astype(int)
  return {
    "avg_at_k": float(arr.mean()),
    "pass_at_k": float(np.mean([pass_at_k(n, int(ci), k) for ci in c])),
    "k": int(k),
    "n_questions": int(q),
    "n_samples": int(n),
  }


def overall_metrics(
  per_benchmark: Mapping[str, Mapping[str, float]], keys: Sequence[str] = ("avg_at_k", "pass_at_k")
) -> dict:
  """Unweighted mean over benchmarks (the paper's "Overall"): each benchmark counts once, whatever its size."""
  if not per_benchmark:
    raise ValueError("overall_metrics: no benchmarks")
  return {key: float(np.mean([m[key] for m in per_benchmark.values()])) for key in keys}


def budget_metrics(correct_QN, length_QN, budgets: Iterable[int], k: int | None = None) -> dict:
  """avg@k / pass@k when answers longer than a budget count as wrong, for each budget.

  `length_QN` must be in the unit the budget is stated in, slots for the paper's budget (Fig. 2): pass the
  per-sample slot counts, not raw id counts. Returns {budget: benchmark_metrics(...)}.
  """
  arr = _as_correct_matrix(correct_QN)
  lengths = np.asarray(length_QN)
  if lengths.shape != arr.shape:
    raise ValueError(f"budget_metrics: lengths {lengths.shape} do not match correctness {arr.shape}")
  return {int(b): benchmark_metrics(arr * (lengths <= b), k) for b in budgets}


# ----------------------------------------------------------------------------------------------------------------
# Lengths and throughput
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LengthStats:
  """Length of one generated answer, in separate units (never mix them)."""

  n_tokens: int  # real output tokens (PAD excluded)
  n_pad: int  # PAD ids emitted (PIPO rejected drafts)
  n_slots: int  # decode slots (steps) used
  tokens_per_slot: int = 1  # 2 for PIPO pairs; fixes how many draft positions a slot has

  @property
  def n_draft_positions(self) -> int:
    return self.n_slots * (self.tokens_per_slot - 1)


def count_lengths(
  output_ids: Sequence[int], pad_id: int | None, tokens_per_slot: int = 1, n_slots: int | None = None
) -> LengthStats:
  """Split one answer's output ids into real tokens, PADs and slots.

  `output_ids` is the raw id stream, PADs included (PIPO emits `[t1, t2 or PAD]` per slot; the last slot may hold
  only t1 when generation stopped on it). `pad_id=None` means the method never emits PAD. Slots default to
  ceil(len(ids) / tokens_per_slot); pass `n_slots` when the decode loop counted them itself.
  """
  if tokens_per_slot < 1:
    raise ValueError(f"tokens_per_slot must be >= 1, got {tokens_per_slot}")
  ids = np.asarray(output_ids, dtype=np.int64).reshape(-1)
  n_pad = 0 if pad_id is None else int(np.sum(ids == pad_id))
  slots = math.ceil(ids.size / tokens_per_slot) if n_slots is None else int(n_slots)
  return LengthStats(n_tokens=int(ids.size - n_pad), n_pad=n_pad, n_slots=slots, tokens_per_slot=tokens_per_slot)


def length_metrics(stats: Sequence[LengthStats], wall_time_s: float | None = None) -> dict:
  """Aggregate answer lengths over a run.

  Returns {"tokens_per_answer", "slots_per_answer", "pad_per_answer", "tokens_per_slot", "pad_ratio",
  "total_tokens", "total_slots", "effective_tokens_per_s"}:
  * tokens_per_slot = real tokens per decode step (the real speed-up lever: ≈1.33 at PAD ratio 0.665);
  * pad_ratio = PADs / draft positions, pooled over answers (0 for methods without draft positions);
  * effective_tokens_per_s = real tokens / wall seconds (None without a wall time). PAD never counts.
  """
  if not stats:
    raise ValueError("length_metrics: no answers")
  tokens = np.array([s.n_tokens for s in stats], dtype=np.float64)
  slots = np.array([s.n_slots for s in stats], dtype=np.float64)
  pads = np.array([s.n_pad for s in stats], dtype=np.float64)
  drafts = float(sum(s.n_draft_positions for s in stats))
  eff = None
  if wall_time_s is not None:
    if wall_time_s <= 0:
      raise ValueError(f"wall_time_s must be > 0, got {wall_time_s}")
    eff = float(tokens.sum() / wall_time_s)
  return {
    "tokens_per_answer": float(tokens.mean()),
    "slots_per_answer": float(slots.mean()),
    "pad_per_answer": float(pads.mean()),
    "tokens_per_slot": float(tokens.sum() / slots.sum()) if slots.sum() else 0.0,
    "pad_ratio": float(pads.sum() / drafts) if drafts else 0.0,
    "total_tokens": int(tokens.sum()),
    "total_slots": int(slots.sum()),
    "effective_tokens_per_s": eff,
  }


# ----------------------------------------------------------------------------------------------------------------
# One report row per evaluated configuration
# ----------------------------------------------------------------------------------------------------------------


def run_row(
  method: str,
  correct_by_benchmark: Mapping[str, object],
  lengths: Sequence[LengthStats],
  wall_time_s: float | None = None,
  conf_threshold: float | None = None,
  control: str | None = None,
  k: int | None = None,
  **extra,
) -> dict:
  """Everything `pipo_jax.evaluation.report` needs about one method / threshold, from raw per-sample results.

  `correct_by_benchmark` maps a benchmark name to its [questions, samples] 0/1 matrix; `lengths` holds one
  LengthStats per generated answer (all benchmarks). Extra keyword fields are copied into the row.
  """
  benchmarks = {name: benchmark_metrics(c, k) for name, c in correct_by_benchmark.items()}
  ks = {m["k"] for m in benchmarks.values()}
  if len(ks) != 1:
    raise ValueError(f"run_row: benchmarks disagree on k ({sorted(ks)}); pass k explicitly")
  row = {
    "method": method,
    "conf_threshold": conf_threshold,
    "control": control,
    "k": ks.pop(),
    "benchmarks": benchmarks,
    **overall_metrics(benchmarks),
    **length_metrics(lengths, wall_time_s),
  }
  row.update(extra)
  return row
