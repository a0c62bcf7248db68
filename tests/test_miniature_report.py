"""The miniature's report additions on hand-made rows: slot-budget curves, timed speed-ups with their spread,
the targets (met / missed) and the paired gate-vs-random difference, each checked against hand-worked values."""

import math

import numpy as np
import pytest

from pipo_jax import evaluate, speed
from pipo_jax.evaluation import report


def _row(method, tau, avg, pas, per_q, control=None, pad=0.0, eff=100.0, curve=None):
  return dict(
    method=method,
    conf_threshold=tau,
    control=control,
    k=4,
    avg_at_k=avg,
    pass_at_k=pas,
    pad_ratio=pad,
    effective_tokens_per_s=eff,
    per_question_avg={"test": per_q},
    budget_curve=curve,
  )


def test_slot_budget_curve_hand_worked():
  # 2 questions x 2 samples; correct only when finished within the budget.
  correct = {"test": [[1, 0], [1, 1]]}
  slots = {"test": [[3, 1], [5, 2]]}
  curve = evaluate.slot_budget_curve(correct, slots, max_slots=5, k=2)
  assert curve["1"] == {"avg_at_k": 0.0, "pass_at_k": 0.0}
  assert curve["2"]["avg_at_k"] == pytest.approx(0.25) and curve["2"]["pass_at_k"] == pytest.approx(0.5)
  assert curve["3"]["avg_at_k"] == pytest.approx(0.5) and curve["3"]["pass_at_k"] == pytest.approx(1.0)
  assert curve["5"]["avg_at_k"] == pytest.approx(0.75)


def test_budget_span_covers_the_rising_part():
  rows = [
    _row(
      "Regular",
      None,
      1,
      1,
      [1],
      curve={b: {"pass_at_k": float(b >= 12), "avg_at_k": float(b >= 12)} for b in range(1, 41)},
    ),
    _row(
      "PIPO+OPD",
      0.95,
      1,
      1,
      [1],
      curve={b: {"pass_at_k": float(b >= 7), "avg_at_k": float(b >= 7)} for b in range(1, 41)},
    ),
  ]
  assert report.budget_span(rows) == [5, 10, 15]
  md = report.budget_table_md(rows, 0.95)
  assert (
    "| Regular pass@4 | — | 0.00 | 0.00 | 100.00 |" in md
    and "| PIPO+OPD pass@4 | 0.95 | 0.00 | 100.00 | 100.00 |" in md
  )


def test_speed_stats_and_apply():
  stats = speed.speedup_stats({"Regular": [100, 110, 90], "PIPO+OPD@0.95": [150, 160, 140]}, "Regular")
  ratios, med, lo, hi = stats["PIPO+OPD@0.95"]
  assert ratios == pytest.approx([1.5, 160 / 110, 140 / 90]) and med == pytest.approx(1.5)
  assert lo == pytest.approx(160 / 110) and hi == pytest.approx(140 / 90)
  spec = speed.RunSpec.parse("PIPO+OPD=runs/x/opd:pipo@0.95")
  assert (spec.method, spec.checkpoint, spec.decode, spec.tau, spec.label) == (
    "PIPO+OPD",
    "runs/x/opd",
    "pipo",
    0.95,
    "PIPO+OPD@0.95",
  )
  with pytest.raises(ValueError, match="LABEL=CHECKPOINT"):
    speed.RunSpec.parse("no-equals-sign")
  rows = [_row("Regular", None, 1, 1, [1]), _row("PIPO+OPD", 0.95, 1, 1, [1]), _row("PIPO+OPD", 0.5, 1, 1, [1])]
  srows = [
    {
      "method": "PIPO+OPD",
      "tau": 0.95,
      "speedup_median": 1.5,
      "speedup_min": 1.45,
      "speedup_max": 1.56,
      "speedup": [1.5, 1.45, 1.56],
    }
  ]
  out = report.apply_speed(rows, srows)
  assert out[1]["speedup_vs_ar"] == 1.5 and out[1]["speedup_min"] == 1.45 and "speedup_vs_ar" not in out[2]
  assert report._speed(out[1]) == "1.50× (1.45–1.56)"


def test_targets_and_paired_difference():
  gate_q, rand_q = [1.0, 0.75, 1.0, 0.5], [0.75, 0.75, 0.5, 0.5]
  rows = [
    _row("Regular", None, 0.98, 1.0, [1, 1, 1, 0.92]),
    _row("PIPO-SFT", 0.95, 0.90, 1.0, [1, 1, 0.6, 1]),
    _row("PIPO+OPD", 0.95, 0.95, 1.0, [1, 1, 0.8, 1], pad=0.05),
    _row("PIPO+OPD", 0.99, 0.8125, 1.0, gate_q, pad=0.3),
    _row("PIPO+OPD", 0.99, 0.625, 1.0, rand_q, control="random_pad", pad=0.3),
  ]
  d, se = report.paired_difference(rows[3], rows[4])
  diffs = np.array(gate_q) - np.array(rand_q)  # 0.25, 0, 0.5, 0
  assert d == pytest.approx(0.1875) and se == pytest.approx(diffs.std(ddof=1) / 2)
  rows[2].update(speedup_vs_ar=1.6, speedup_min=1.57, speedup_max=1.64, speedup_rounds=[1.6, 1.57, 1.64])
  t = {x["target"]: x for x in report.miniature_targets(rows, 0.95)}
  assert t["teacher (Regular) avg@k ≥ 90 %"]["met"]
  assert t["PIPO+OPD at τ 0.95 within 5 points avg@k of the teacher"]["met"]  # 3 points below
  assert t["PIPO-SFT at τ 0.95 within 10 points avg@k of the teacher"]["met"]  # 8 points below
  assert t["OPD above SFT on avg@k at τ 0.95"]["met"]
  gate = t["gate above random PAD at τ 0.99 (PAD ratio 0.30), avg@k"]
  assert gate["met"] and gate["measured"].startswith("+18.75 ±")
  assert t["effective speed-up of PIPO+OPD at τ 0.95 ≥ 1.5× (spread ≤ ±0.05×)"]["met"]
  span = t["the sweep spans PAD ratios from a few % to ≥ 0.6"]
  assert not span["met"] and span["measured"] == "0.050 … 0.300"
  md = report.targets_md(report.miniature_targets(rows, 0.95))
  assert "**missed**" in md and math.isfinite(se)


def test_speed_windows_repeat_a_decode_until_min_window(monkeypatch):
  """Hand-made decode times: Regular 4 s per decode of 40 tokens, PIPO 1.5 s; a 5 s window repeats Regular twice
  (8 s, 80 tokens) and PIPO four times (6 s, 160 tokens) in every round. Every decode samples with the baseline
  checkpoint's generation_config.json (top_k 7) under the tools' temperature-1 fallback."""
  from pipo_jax.evaluation import batch_sampling
  from pipo_jax.inference.sampling import SamplingParams

  seconds = {"ar": 4.0, "pipo": 1.5}
  calls = []

  def fake_sample(model, prompts, k, mode, sampling, **kw):
    calls.append(mode)
    assert sampling == SamplingParams(temperature=1.0, top_k=7)
    samples = [[batch_sampling.Sample("", [0] * 10, [], 0, 0, 0) for _ in range(k)] for _ in prompts]
    return batch_sampling.SampleRun(samples, decode_s=seconds[mode], compile_s=0.0, batches=1)

  monkeypatch.setattr(batch_sampling, "load", lambda c, t: batch_sampling.Model(None, None, None, {"top_k": 7}))
  monkeypatch.setattr(batch_sampling, "sample", fake_sample)
  specs = [speed.RunSpec("Regular", "t", "ar"), speed.RunSpec("PIPO", "s", "pipo", 0.95)]
  prompts = [[{"role": "user", "content": "q"}]]
  rows = speed.measure(specs, "", prompts, 4, {}, 2, 8, 4, "Regular", log=lambda s: None, min_window_s=5.0)
  assert calls == ["ar", "ar", "pipo", "pipo", "pipo", "pipo"] * 2
  reg, pipo = rows
  assert reg["effective_tokens_per_s"] == [10.0, 10.0] and pipo["effective_tokens_per_s"] == [160 / 6] * 2
  assert pipo["speedup_median"] == pytest.approx(160 / 60) and (reg["tokens"], reg["seconds"]) == (160, 16.0)
  rows = speed.measure(specs, "", prompts, 4, {}, 1, 8, 4, "Regular", log=lambda s: None)  # no window: one decode
  assert rows[1]["effective_tokens_per_s"] == [40 / 1.5]


def test_training_budget_hand_worked():
  # Before SFT: 60 + 300 + 120 + 60 s = 9 min; SFT 600 s = 10 min for 1200 steps; OPD 120 s = 2 min.
  timings = {
    "make_task": 60,
    "teacher": 300,
    "rollout": 120,
    "difficulty": 60,
    "sft": 600,
    "opd": 120,
    "eval_teacher": 90,
    "speed": 150,
    "total_this_invocation": 1500,
  }
  steps = [
    {"method": "PIPO-SFT step 1200", "avg_at_k": 0.7, "pass_at_k": 0.9},
    {"method": "PIPO-SFT step 600", "avg_at_k": 0.5, "pass_at_k": 0.8},
  ]
  rows = [
    {"method": "Regular", "avg_at_k": 0.95, "pass_at_k": 1.0},
    {"method": "PIPO+OPD", "conf_threshold": 0.95, "avg_at_k": 0.75, "pass_at_k": 0.9},
    {"method": "PIPO+OPD", "conf_threshold": 0.9, "avg_at_k": 0.1, "pass_at_k": 0.1},
  ]
  points = report.training_budget(steps, rows, timings, tau=0.95)
  assert [p["label"] for p in points] == ["PIPO-SFT step 600", "PIPO-SFT step 1200", "PIPO+OPD (from step 1200)"]
  assert [p["train_minutes"] for p in points] == pytest.approx([14.0, 19.0, 21.0])
  assert [p["gap"] for p in points] == pytest.approx([45.0, 25.0, 20.0])
  md = report.training_budget_md(points, timings, 0.95)
  assert "| PIPO-SFT step 600 | 14.0 | 50.00 | 80.00 | +45.00 |" in md
  assert "add 4.0 minutes" in md and "25.0 minutes in all" in md and "(missed)" in md
  assert report.training_budget([{"method": "PIPO-SFT", "avg_at_k": 1, "pass_at_k": 1}], rows, timings) == []
