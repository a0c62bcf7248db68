"""Evaluation metrics against brute force and hand-worked examples."""

import itertools

import numpy as np
import pytest

from pipo_jax.evaluation import eval_metrics as em


def _brute_pass_at_k(n, c, k):
  """Share of all k-subsets of n samples (c correct) containing at least one correct sample."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert em.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
  assert em.pass_at_k(4, 0, 4) == 0.0
  assert em.pass_at_k(4, 4, 1) == 1.0
  assert em.pass_at_k(4, 1, 4) == 1.0  # k == n: any-correct
  assert em.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  # Large n: the product form stays finite where C(n, k) as a float would overflow.
  assert em.pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    em.pass_at_k(4, 5, 1)
  with pytest.raises(ValueError):
    em.pass_at_k(4, 1, 5)


def test_benchmark_and_overall():
  correct = [
    [1, 0, 0, 0],  # 1/4 samples, any-correct
    [0, 0, 0, 0],
    [1, 1, 1, 1],
  ]
  m = em.benchmark_metrics(correct)
  assert m["avg_at_k"] == pytest.approx(5 / 12)
  assert m["pass_at_k"] == pytest.approx(2 / 3)  # k = n = 4: the paper's plain max over samples
  assert (m["k"], m["n_questions"], m["n_samples"]) == (4, 3, 4)
  assert em.avg_at_k(correct) == pytest.approx(5 / 12)
  m1 = em.benchmark_metrics(correct, k=1)
  assert m1["pass_at_k"] == pytest.approx(m["avg_at_k"])  # pass@1 == mean accuracy
  # Overall is unweighted over benchmarks: a 2-question benchmark counts as much as a 100-question one.
  per = {"a": {"avg_at_k": 0.2, "pass_at_k": 0.4}, "b": {"avg_at_k": 0.6, "pass_at_k": 1.0}}
  assert em.overall_metrics(per) == {"avg_at_k": pytest.approx(0.4), "pass_at_k": pytest.approx(0.7)}
  with pytest.raises(ValueError):
    em.benchmark_metrics([[0, 2]])


def test_length_accounting_never_counts_pad():
  pad = 99
  # PIPO pairs: [t1, t2|PAD] per slot; generation stopped on token1 in the last slot (odd length).
  ids = [5, 6, 7, pad, 8, pad, 9]
  s = em.count_lengths(ids, pad_id=pad, tokens_per_slot=2)
  assert (s.n_tokens, s.n_pad, s.n_slots, s.n_draft_positions) == (5, 2, 4, 4)
  ar = em.count_lengths([1, 2, 3], pad_id=None)
  assert (ar.n_tokens, ar.n_pad, ar.n_slots) == (3, 0, 3)
  m = em.length_metrics([s, em.count_lengths([1, 2, pad, pad], pad, 2)], wall_time_s=2.0)
  assert m["tokens_per_answer"] == pytest.approx((5 + 2) / 2)
  assert m["slots_per_answer"] == pytest.approx((4 + 2) / 2)
  assert m["pad_ratio"] == pytest.approx((2 + 2) / (4 + 2))
  assert m["tokens_per_slot"] == pytest.approx(7 / 6)
  assert m["effective_tokens_per_s"] == pytest.approx(7 / 2.0)
  assert em.length_metrics([ar])["pad_ratio"] == 0.0


def test_budget_in_slots_not_raw_ids():
  """A PIPO answer of 40K ids = 20K pairs fits a 32K-slot budget; the reference scored it 0 (id count > 32K)."""
  pad = 0
  ids = np.array([1, pad] * 20_000)
  s = em.count_lengths(ids, pad, tokens_per_slot=2)
  assert (s.n_slots, s.n_tokens, s.n_pad) == (20_000, 20_000, 20_000)
  out = em.budget_metrics([[1, 1]], [[s.n_slots, 40_000]], budgets=[16_384, 32_768])
  assert out[32_768]["avg_at_k"] == pytest.approx(0.5)
  assert out[32_768]["pass_at_k"] == 1.0
  assert out[16_384]["pass_at_k"] == 0.0


def test_run_row_feeds_report():
  lengths = [em.count_lengths([1, 2, 3, 0], pad_id=0, tokens_per_slot=2)] * 4
  row = em.run_row(
    "PIPO-SFT", {"a": [[1, 0], [0, 0]], "b": [[1, 1]]}, lengths, wall_time_s=3.0, conf_threshold=0.95, note="x"
  )
  assert row["benchmarks"]["a"]["pass_at_k"] == pytest.approx(0.5)
  assert row["avg_at_k"] == pytest.approx((0.25 + 1.0) / 2)
  assert row["pass_at_k"] == pytest.approx((0.5 + 1.0) / 2)
  assert (row["k"], row["conf_threshold"], row["control"], row["note"]) == (2, 0.95, None, "x")
  assert row["pad_ratio"] == pytest.approx(0.5) and row["tokens_per_answer"] == 3.0
  assert row["effective_tokens_per_s"] == pytest.approx(12 / 3.0)
