"""Report tables, JSON and plot on a hand-made row set (numbers from the paper's 4B rows)."""

import json

import pytest

from pipo_jax.evaluation import report

BENCH = lambda a, b, c, d: {  # (AIME, GPQA) avg/pass pairs
  "AIME25": {"avg_at_k": a, "pass_at_k": b},
  "GPQA-D": {"avg_at_k": c, "pass_at_k": d},
}

ROWS = [
  dict(
    method="Regular",
    conf_threshold=None,
    k=4,
    avg_at_k=0.5216,
    pass_at_k=0.6348,
    benchmarks=BENCH(0.4917, 0.6333, 0.5972, 0.7273),
    pad_ratio=0.0,
    tokens_per_answer=20160,
    slots_per_answer=20160,
    effective_tokens_per_s=100.0,
  ),
  dict(
    method="MTP",
    conf_threshold=None,
    k=4,
    avg_at_k=0.3850,
    pass_at_k=0.5228,
    benchmarks=BENCH(0.3417, 0.4333, 0.5227, 0.6919),
    pad_ratio=0.0,
    tokens_per_answer=44144,
    slots_per_answer=22072,
    effective_tokens_per_s=190.0,
  ),
  dict(
    method="PIPO-SFT",
    conf_threshold=0.95,
    k=4,
    avg_at_k=0.4528,
    pass_at_k=0.6501,
    benchmarks=BENCH(0.4250, 0.6000, 0.5947, 0.7929),
    pad_ratio=0.665,
    tokens_per_answer=24138,
    slots_per_answer=18082,
    effective_tokens_per_s=133.0,
    note="kept verbatim",
  ),
  dict(
    method="PIPO-SFT",
    conf_threshold=1.0,
    k=4,
    avg_at_k=0.47,
    pass_at_k=0.6455,
    pad_ratio=1.0,
    tokens_per_answer=18000,
    slots_per_answer=18000,
    effective_tokens_per_s=99.0,
  ),
  dict(
    method="PIPO-SFT",
    conf_threshold=0.9,
    control="random_pad",
    k=4,
    avg_at_k=0.41,
    pass_at_k=0.5964,
    pad_ratio=0.6,
    tokens_per_answer=25000,
    slots_per_answer=18500,
    effective_tokens_per_s=135.0,
  ),
  dict(
    method="PIPO-SFT",
    conf_threshold=0.9,
    k=4,
    avg_at_k=0.43,
    pass_at_k=0.6193,
    pad_ratio=0.6,
    tokens_per_answer=25000,
    slots_per_answer=18500,
    effective_tokens_per_s=140.0,
  ),
]


def _table_lines(md, first_header_cell):
  lines = md.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header_cell} |"))
  out = []
  for l in lines[start:]:
    if not l.startswith("|"):
      break
    out.append([c.strip() for c in l.strip("|").split("|")])
  return out[0], out[2:]


def test_main_table_matches_paper_layout():
  header, body = _table_lines(report.main_table_md(ROWS), "Method")
  assert header == [
    "Method",
    "τ_c",
    "AIME25 avg@4",
    "AIME25 pass@4",
    "GPQA-D avg@4",
    "GPQA-D pass@4",
    "Overall avg@4",
    "Overall pass@4",
  ]
  assert [r[0] for r in body] == ["Regular", "MTP", "PIPO-SFT", "PIPO-SFT", "PIPO-SFT"]  # control excluded
  assert body[0] == ["Regular", "—", "**49.17**", "**63.33**", "**59.72**", "72.73", "**52.16**", "63.48"]
  assert body[2] == ["PIPO-SFT", "0.95", "42.50", "60.00", "59.47", "**79.29**", "45.28", "**65.01**"]
  assert body[3][2:6] == ["—"] * 4  # no per-benchmark numbers on that row


def test_efficiency_and_sweep_tables():
  rows = report.add_speedup(ROWS)
  assert rows[2]["speedup_vs_ar"] == pytest.approx(1.33)
  assert "speedup_vs_ar" not in ROWS[2]  # inputs untouched
  header, body = _table_lines(report.efficiency_table_md(rows), "Method")
  assert body[2] == ["PIPO-SFT", "0.95", "0.665", "24,138", "18,082", "133.0", "1.33×"]
  header, body = _table_lines(report.sweep_table_md(rows), "Method")
  assert header[:6] == ["Method", "PAD policy", "τ_c", "PAD ratio", "avg@4", "pass@4"]
  assert [(r[1], r[2], r[5]) for r in body] == [
    ("confidence", "0.9", "61.93"),
    ("confidence", "0.95", "65.01"),
    ("confidence", "1", "64.55"),
    ("random", "0.9", "59.64"),
  ]


def test_write_report(tmp_path):
  paths = report.write_report(ROWS, str(tmp_path / "run"), title="4B test")
  data = json.loads(open(paths["json"]).read())
  assert data["title"] == "4B test" and data["benchmarks"] == ["AIME25", "GPQA-D"]
  assert len(data["rows"]) == len(ROWS)
  r = data["rows"][2]
  assert (r["method"], r["conf_threshold"], r["pass_at_k"], r["note"]) == ("PIPO-SFT", 0.95, 0.6501, "kept verbatim")
  assert r["speedup_vs_ar"] == pytest.approx(1.33)
  md = open(paths["md"]).read()
  assert "# 4B test" in md and "## Confidence-threshold sweep" in md and "![threshold sweep](sweep.png)" in md
  png = open(paths["png"], "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_no_sweep_no_png(tmp_path):
  paths = report.write_report(ROWS[:2], str(tmp_path))
  assert "png" not in paths and not (tmp_path / "sweep.png").exists()
  assert "sweep" not in open(paths["md"]).read()


def test_rows_from_eval_metrics(tmp_path):
  from pipo_jax.evaluation import eval_metrics as em

  lengths = [em.count_lengths([1, 2], pad_id=None)] * 2
  ar = em.run_row("Regular", {"AIME25": [[1, 0]]}, lengths, wall_time_s=2.0)
  pipo = em.run_row("PIPO-SFT", {"AIME25": [[1, 1]]}, lengths, wall_time_s=1.0, conf_threshold=0.95)
  paths = report.write_report([ar, pipo], str(tmp_path))
  _, body = _table_lines(open(paths["md"]).read(), "Method")
  assert body == [
    ["Regular", "—", "50.00", "**100.00**", "50.00", "**100.00**"],
    ["PIPO-SFT", "0.95", "**100.00**", "**100.00**", "**100.00**", "**100.00**"],
  ]
  assert json.load(open(paths["json"]))["rows"][1]["speedup_vs_ar"] == pytest.approx(2.0)
