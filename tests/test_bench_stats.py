"""bench's timing statistics against hand-worked rounds (no model: the records are written out by hand)."""

import pytest

from pipo_jax import bench


def test_summarize_medians_and_per_round_ratios():
  ar = {"mode": "ar", "decode_steps": 10, "loop_tokens": 10}
  pipo = {"mode": "pipo", "decode_steps": 5, "loop_tokens": 10}
  ar_ttft, ar_loop = [0.1, 0.2, 0.1], [1.0, 2.0, 1.0]
  rec = bench.summarize(pipo, [0.05, 0.1, 0.1], [0.5, 0.8, 0.8], ar, ar_ttft, ar_loop)
  # step_s = loop / 5 = [0.1, 0.16, 0.16]
  assert (rec["step_s"], rec["step_s_min"], rec["step_s_max"]) == pytest.approx((0.16, 0.1, 0.16))
  # ar steps [0.1, 0.2, 0.1] over [0.1, 0.16, 0.16] = [1.0, 1.25, 0.625]
  assert (rec["speedup_step_vs_ar"], rec["speedup_step_vs_ar_min"], rec["speedup_step_vs_ar_max"]) == pytest.approx(
    (1.0, 0.625, 1.25)
  )
  # tokens/s [20, 12.5, 12.5] over ar's [10, 5, 10] = [2.0, 2.5, 1.25]: the median ratio is 2.0, while the ratio
  # of the medians (12.5 / 10) would be 1.25.
  assert rec["effective_tokens_per_s"] == pytest.approx(12.5)
  assert (rec["speedup_effective_vs_ar"], rec["speedup_effective_vs_ar_min"]) == pytest.approx((2.0, 1.25))
  assert rec["speedup_effective_vs_ar_max"] == pytest.approx(2.5)
  # ttft ratios [2, 2, 1]
  assert (rec["speedup_ttft_vs_ar"], rec["speedup_ttft_vs_ar_min"]) == pytest.approx((2.0, 1.0))
  assert rec["rounds"] == 3
  own = bench.summarize(ar, ar_ttft, ar_loop, ar, ar_ttft, ar_loop)
  assert own["speedup_effective_vs_ar_min"] == own["speedup_effective_vs_ar_max"] == 1.0


def test_timed_window_repeats_until_it_lasts(monkeypatch):
  clock = [0.0]
  calls = []

  def fn():  # each call takes 0.01 s of the fake clock
    clock[0] += 0.01
    calls.append(1)
    return 0

  monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
  assert bench.timed_window(fn, 0.035) == pytest.approx(0.01)
  assert len(calls) == 4  # 0.04 s is the first window of at least 0.035 s
  calls.clear()
  assert bench.timed_window(fn, 0.0) == pytest.approx(0.01) and len(calls) == 1
