"""Evaluation report: `report.json`, `report.md` (paper Table 1 layout + efficiency + threshold sweep), `sweep.png`.

Everything is a pure function of a list of row dicts except `write_report`, the one writer.

Row fields (missing optional fields render as "—"):
  method                  str, e.g. "Regular", "MTP", "EAGLE-2", "PIPO-SFT", "PIPO-SFT+OPD"
  conf_threshold          float τ_c, or None for methods without a confidence gate
  control                 None, or "random_pad": PAD by an unconditional coin flip at the PAD ratio the
                          confidence gate reached at `conf_threshold` (the paper's Fig. 6 "Random" baseline)
  k                       samples per question (avg@k / pass@k)
  avg_at_k, pass_at_k     overall accuracies, fractions in [0, 1] (the unweighted mean over benchmarks)
  benchmarks              optional {name: {"avg_at_k": .., "pass_at_k": ..}} for the per-benchmark columns
  pad_ratio               PADs / draft positions
  tokens_per_answer       real (non-PAD) tokens per answer
  slots_per_answer        decode slots per answer
  effective_tokens_per_s  real tokens per second of wall time
  speedup_vs_ar           effective_tokens_per_s / the Regular row's (filled by `add_speedup` when absent)
Any other keys are kept in report.json untouched.

The main table holds every row that is not a control; the sweep table every row with a τ, controls included.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

RANDOM_PAD = "random_pad"
_DASH = "—"


def _num(x) -> Optional[float]:
  if x is None:
    return None
  try:
    v = float(x)
  except (TypeError, ValueError):
    return None
  return None if math.isnan(v) else v


def _pct(x) -> str:
  v = _num(x)
  return _DASH if v is None else f"{100.0 * v:.2f}"


def _fmt(x, spec: str) -> str:
  v = _num(x)
  return _DASH if v is None else format(v, spec)


def _tau(row: Mapping[str, Any]) -> str:
  return _fmt(row.get("conf_threshold"), "g")


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in body]
  return "\n".join(lines) + "\n"


def _bold_best(body: list[list[str]], cols: Sequence[int]) -> None:
  """Bold the largest number of each column in place, like the paper's Table 1 (ties all bold)."""
  for c in cols:
    vals = [_num(r[c]) if r[c] != _DASH else None for r in body]
    present = [v for v in vals if v is not None]
    if len(present) < 2:
      continue
    best = max(present)
    for r, v in zip(body, vals):
      if v == best:
        r[c] = f"**{r[c]}**"


def add_speedup(rows: Sequence[Mapping[str, Any]], baseline_method: str = "Regular") -> list[dict]:
  """Copies of `rows` with `speedup_vs_ar` filled from the baseline row's effective tokens/s where missing."""
  base = next((_num(r.get("effective_tokens_per_s")) for r in rows
               if r.get("method") == baseline_method and not r.get("control")), None)
  out = []
  for r in rows:
    r = dict(r)
    eff = _num(r.get("effective_tokens_per_s"))
    if r.get("speedup_vs_ar") is None and base and eff is not None:
      r["speedup_vs_ar"] = eff / base
    out.append(r)
  return out


def benchmark_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Benchmarks appearing in any row, in first-seen order."""
  names: list[str] = []
  for r in rows:
    for name in (r.get("benchmarks") or {}):
      if name not in names:
        names.append(name)
  return names


def _label(row: Mapping[str, Any]) -> str:
  label = str(row.get("method", "?"))
  if row.get("control") == RANDOM_PAD:
    label += " (random PAD)"
  return label


def main_table_md(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table 1 layout: per-benchmark avg@k / pass@k and the overall, in %, best per column in bold."""
  main = [r for r in rows if not r.get("control")]
  k = next((r.get("k") for r in main if r.get("k")), "k")
  names = benchmark_names(main)
  header = ["Method", "τ_c"]
  for n in names + ["Overall"]:
    header += [f"{n} avg@{k}", f"{n} pass@{k}"]
  body = []
  for r in main:
    cells = [_label(r), _tau(r)]
    for n in names:
      b = (r.get("benchmarks") or {}).get(n, {})
      cells += [_pct(b.get("avg_at_k")), _pct(b.get("pass_at_k"))]
    cells += [_pct(r.get("avg_at_k")), _pct(r.get("pass_at_k"))]
    body.append(cells)
  _bold_best(body, range(2, len(header)))
  return _md_table(header, body)


def efficiency_table_md(rows: Sequence[Mapping[str, Any]]) -> str:
  """Lengths and speed: PAD ratio, real tokens and slots per answer, effective tokens/s, speed-up vs AR."""
  header = ["Method", "τ_c", "PAD ratio", "tokens/answer", "slots/answer", "eff. tokens/s", "speed-up vs AR"]
  body = [[_label(r), _tau(r), _fmt(r.get("pad_ratio"), ".3f"), _fmt(r.get("tokens_per_answer"), ",.0f"),
           _fmt(r.get("slots_per_answer"), ",.0f"), _fmt(r.get("effective_tokens_per_s"), ",.1f"),
           _fmt(r.get("speedup_vs_ar"), ".2f") + ("×" if _num(r.get("speedup_vs_ar")) is not None else "")]
          for r in rows if not r.get("control")]
  return _md_table(header, body)


def sweep_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Rows with a τ_c (confidence gate and its random-PAD controls), by method, policy, τ."""
  swept = [r for r in rows if _num(r.get("conf_threshold")) is not None]
  return sorted(swept, key=lambda r: (str(r.get("method")), bool(r.get("control")), float(r["conf_threshold"])))


def sweep_table_md(rows: Sequence[Mapping[str, Any]]) -> str:
  """Threshold sweep (paper Fig. 6 as a table): accuracy and speed per τ_c, random-PAD controls alongside."""
  swept = sweep_rows(rows)
  k = next((r.get("k") for r in swept if r.get("k")), "k")
  header = ["Method", "PAD policy", "τ_c", "PAD ratio", f"avg@{k}", f"pass@{k}", "tokens/answer", "speed-up vs AR"]
  body = [[str(r.get("method", "?")), "random" if r.get("control") == RANDOM_PAD else "confidence", _tau(r),
           _fmt(r.get("pad_ratio"), ".3f"), _pct(r.get("avg_at_k")), _pct(r.get("pass_at_k")),
           _fmt(r.get("tokens_per_answer"), ",.0f"), _fmt(r.get("speedup_vs_ar"), ".2f")] for r in swept]
  return _md_table(header, body)


def report_markdown(rows: Sequence[Mapping[str, Any]], title: str = "PIPO evaluation",
                    plot_name: Optional[str] = None) -> str:
  """The whole report.md text."""
  parts = [f"# {title}\n", "Accuracies in %. Overall = unweighted mean over benchmarks. Tokens never count PAD;"
           " a slot is one decode step (one pair for PIPO).\n",
           "## Accuracy (Table 1 layout)\n", main_table_md(rows), "## Efficiency\n", efficiency_table_md(rows)]
  if sweep_rows(rows):
    parts += ["## Confidence-threshold sweep\n",
              "Random PAD: PAD by coin flip at the PAD ratio the confidence gate reached at that τ_c.\n",
              sweep_table_md(rows)]
    if plot_name:
      parts.append(f"![threshold sweep]({plot_name})\n")
  return "\n".join(parts)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str) -> bool:
  """PNG: accuracy vs τ_c (left) and speed-up / PAD ratio vs τ_c (right), random-PAD control dashed grey.

  Returns False (and writes nothing) when no row has a τ_c.
  """
  swept = sweep_rows(rows)
  if not swept:
    return False
  import matplotlib  # local: only the writer needs a plotting backend
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = next((r.get("k") for r in swept if r.get("k")), "k")
  fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
  ax_pad = ax_speed.twinx()
  for method in dict.fromkeys(str(r.get("method")) for r in swept):
    for control in (False, True):
      sel = [r for r in swept if str(r.get("method")) == method and bool(r.get("control")) == control]
      if not sel:
        continue
      tau = [float(r["conf_threshold"]) for r in sel]
      style = dict(color="grey", linestyle="--", marker="x") if control else dict(marker="o")
      name = f"{method} random PAD" if control else method

      def series(key, scale=1.0, sel=sel):
        return [(_num(r.get(key)) * scale) if _num(r.get(key)) is not None else float("nan") for r in sel]

      ax_acc.plot(tau, series("pass_at_k", 100), label=f"{name} pass@{k}", **style)
      ax_acc.plot(tau, series("avg_at_k", 100), label=f"{name} avg@{k}", alpha=0.6,
                  **{**style, "linestyle": ":"})
      ax_speed.plot(tau, series("speedup_vs_ar"), label=f"{name} speed-up", **style)
      if not control:
        ax_pad.plot(tau, series("pad_ratio"), color="tab:red", alpha=0.5, marker=".", label=f"{method} PAD ratio")
  ax_acc.set(xlabel="confidence threshold τ_c", ylabel="accuracy (%)", title="Accuracy vs τ_c")
  ax_speed.set(xlabel="confidence threshold τ_c", ylabel="speed-up vs AR (×)", title="Speed vs τ_c")
  ax_pad.set_ylabel("PAD ratio")
  ax_acc.legend(fontsize=7)
  handles = ax_speed.get_legend_handles_labels()
  pad_handles = ax_pad.get_legend_handles_labels()
  ax_speed.legend(handles[0] + pad_handles[0], handles[1] + pad_handles[1], fontsize=7)
  for ax in (ax_acc, ax_speed):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_report(rows: Sequence[Mapping[str, Any]], run_dir: str, title: str = "PIPO evaluation",
                 baseline_method: str = "Regular") -> dict:
  """Write report.json, report.md and (when there is a sweep) sweep.png into `run_dir`; returns their paths."""
  os.makedirs(run_dir, exist_ok=True)
  rows = add_speedup(rows, baseline_method)
  paths = {"json": os.path.join(run_dir, "report.json"), "md": os.path.join(run_dir, "report.md")}
  png = os.path.join(run_dir, "sweep.png")
  if plot_sweep(rows, png):
    paths["png"] = png
  with open(paths["json"], "w") as f:
    json.dump({"title": title, "baseline_method": baseline_method, "benchmarks": benchmark_names(rows),
               "rows": rows}, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  with open(paths["md"], "w") as f:
    f.write(report_markdown(rows, title, "sweep.png" if "png" in paths else None))
  return paths
