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
  speedup_min/max         optional spread of the speed-up (repeated timed rounds, `pipo_jax.speed`)
  budget_curve            optional {slot budget: {"avg_at_k", "pass_at_k"}} (`evaluate.slot_budget_curve`)
Any other keys are kept in report.json untouched.

The main table holds every row that is not a control; the sweep table every row with a τ, controls included.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

RANDOM_PAD = "random_pad"
_DASH = "—"


def _num(x) -> float | None:
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
  base = next(
    (
      _num(r.get("effective_tokens_per_s")) for r in rows if r.get("method") == baseline_method and not r.get("control")
    ),
    None,
  )
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
    for name in r.get("benchmarks") or {}:
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


def _speed(r: Mapping[str, Any]) -> str:
  """ "1.62× (1.58–1.66)" with the timing spread when known, else "1.62×"."""
  v = _num(r.get("speedup_vs_ar"))
  if v is None:
    return _DASH
  if _num(r.get("speedup_min")) is not None:
    return f"{v:.2f}× ({float(r['speedup_min']):.2f}–{float(r['speedup_max']):.2f})"
  return f"{v:.2f}×"


def efficiency_table_md(rows: Sequence[Mapping[str, Any]]) -> str:
  """Lengths and speed: PAD ratio, real tokens and slots per answer, effective tokens/s, speed-up vs AR."""
  header = ["Method", "τ_c", "PAD ratio", "tokens/answer", "slots/answer", "eff. tokens/s", "speed-up vs AR"]
  body = [
    [
      _label(r),
      _tau(r),
      _fmt(r.get("pad_ratio"), ".3f"),
      _fmt(r.get("tokens_per_answer"), ",.0f"),
      _fmt(r.get("slots_per_answer"), ",.0f"),
      _fmt(r.get("effective_tokens_per_s"), ",.1f"),
      _speed(r),
    ]
    for r in rows
    if not r.get("control")
  ]
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
  body = [
    [
      str(r.get("method", "?")),
      "random" if r.get("control") == RANDOM_PAD else "confidence",
      _tau(r),
      _fmt(r.get("pad_ratio"), ".3f"),
      _pct(r.get("avg_at_k")),
      _pct(r.get("pass_at_k")),
      _fmt(r.get("tokens_per_answer"), ",.0f"),
      _fmt(r.get("speedup_vs_ar"), ".2f"),
    ]
    for r in swept
  ]
  return _md_table(header, body)


def report_markdown(
  rows: Sequence[Mapping[str, Any]],
  title: str = "PIPO evaluation",
  plot_name: str | None = None,
  budget_tau: float = 0.95,
  budget_plot: str | None = None,
  preamble: str = "",
) -> str:
  """The whole report.md text (`preamble`: markdown placed right under the title)."""
  parts = (
    [f"# {title}\n"]
    + ([preamble] if preamble else [])
    + [
      "Accuracies in %. Overall = unweighted mean over benchmarks. Tokens never count PAD;"
      " a slot is one decode step (one pair for PIPO).\n",
      "## Accuracy (Table 1 layout)\n",
      main_table_md(rows),
      "## Efficiency\n",
      efficiency_table_md(rows),
    ]
  )
  if sweep_rows(rows):
    parts += [
      "## Confidence-threshold sweep\n",
      "Random PAD: PAD by coin flip at the PAD ratio the confidence gate reached at that τ_c.\n",
      sweep_table_md(rows),
    ]
    if plot_name:
      parts.append(f"![threshold sweep]({plot_name})\n")
  budget = budget_table_md(rows, budget_tau)
  if budget:
    parts += [
      "## Accuracy vs response budget (slots)\n",
      "An answer counts when it is correct and finished within the budget; a Regular slot is one token, "
      "an MTP or PIPO slot one or two.\n",
      budget,
    ]
    if budget_plot:
      parts.append(f"![slot budget]({budget_plot})\n")
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
      ax_acc.plot(tau, series("avg_at_k", 100), label=f"{name} avg@{k}", alpha=0.6, **{**style, "linestyle": ":"})
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


def budget_rows(rows: Sequence[Mapping[str, Any]], tau: float) -> list[Mapping[str, Any]]:
  """Rows of the slot-budget curve: every non-control row with a curve, gated ones only at threshold `tau`."""
  return [
    r
    for r in rows
    if r.get("budget_curve")
    and not r.get("control")
    and (_num(r.get("conf_threshold")) is None or abs(float(r["conf_threshold"]) - tau) < 1e-9)
  ]


def _curve(row: Mapping[str, Any], key: str) -> dict:
  return {int(b): float(v[key]) for b, v in row["budget_curve"].items()}  # JSON keys come back as strings


def budget_span(rows: Sequence[Mapping[str, Any]], step: int = 5) -> list[int]:
  """Budgets (multiples of `step`) from just before the first answer fits to just after every curve is flat."""
  curves = [_curve(r, "pass_at_k") for r in rows]
  budgets = sorted(set().union(*[c.keys() for c in curves]))
  first = min((b for b in budgets if any(c.get(b, 0) > 0 for c in curves)), default=budgets[0])
  last = max((b for b in budgets if any(c.get(b, 0) != c[max(c)] for c in curves)), default=budgets[-1])
  lo, hi = max(step, (first // step) * step), min(budgets[-1], -(-(last + 1) // step) * step)
  return list(range(lo, hi + 1, step))


def budget_table_md(rows: Sequence[Mapping[str, Any]], tau: float) -> str:
  """pass@k / avg@k at slot budgets (paper Fig. 2 as a table); one row per method."""
  sel = budget_rows(rows, tau)
  if not sel:
    return ""
  budgets = budget_span(sel)
  k = next((r.get("k") for r in sel if r.get("k")), "k")
  header = ["Method", "τ_c"] + [f"{b}" for b in budgets]
  body = []
  for key, name in (("pass_at_k", f"pass@{k}"), ("avg_at_k", f"avg@{k}")):
    for r in sel:
      c = _curve(r, key)
      body.append([f"{_label(r)} {name}", _tau(r)] + [_pct(c.get(b)) for b in budgets])
  return _md_table(header, body)


def plot_budget(rows: Sequence[Mapping[str, Any]], path: str, tau: float) -> bool:
  """PNG: pass@k (left) and avg@k (right) vs slot budget, one line per method. False when no row has a curve."""
  sel = budget_rows(rows, tau)
  if not sel:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = next((r.get("k") for r in sel if r.get("k")), "k")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, name in ((axes[0], "pass_at_k", f"pass@{k}"), (axes[1], "avg_at_k", f"avg@{k}")):
    for r in sel:
      c = _curve(r, key)
      b = sorted(c)
      label = _label(r) + (f" τ={_tau(r)}" if _num(r.get("conf_threshold")) is not None else "")
      ax.plot(b, [100 * c[x] for x in b], label=label)
    ax.set(
      xlabel="response budget (slots; a PIPO slot holds 1-2 tokens)",
      ylabel=f"{name} (%)",
      title=f"{name} vs slot budget",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def apply_speed(rows: Sequence[Mapping[str, Any]], speed_rows: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Copies of `rows` whose speed-up comes from the repeated timing rounds (`pipo_jax.speed`) where one matches
  (same method, same τ, not a control): speedup_vs_ar = the median over rounds, speedup_min / _max its spread."""
  out = []
  for r in rows:
    r = dict(r)
    for s in speed_rows:
      same_tau = (_num(s.get("tau")) is None and _num(r.get("conf_threshold")) is None) or (
        _num(s.get("tau")) is not None
        and _num(r.get("conf_threshold")) is not None
        and abs(float(s["tau"]) - float(r["conf_threshold"])) < 1e-9
      )
      if s.get("method") == r.get("method") and same_tau and not r.get("control"):
        r.update(
          speedup_vs_ar=s["speedup_median"],
          speedup_min=s["speedup_min"],
          speedup_max=s["speedup_max"],
          speedup_rounds=s["speedup"],
        )
    out.append(r)
  return out


def _row(rows, method: str, tau: float | None = None, control: bool = False):
  for r in rows:
    t = _num(r.get("conf_threshold"))
    if (
      r.get("method") == method
      and bool(r.get("control")) == control
      and ((tau is None and t is None) or (tau is not None and t is not None and abs(t - tau) < 1e-9))
    ):
      return r
  return None


def paired_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float]:
  """(mean, standard error) over questions of a's per-question avg@k minus b's (same questions, paired)."""
  import numpy as np

  da, db = a.get("per_question_avg") or {}, b.get("per_question_avg") or {}
  diffs = np.concatenate([np.asarray(da[n]) - np.asarray(db[n]) for n in da if n in db]) if da else np.zeros(0)
  if diffs.size < 2:
    return float("nan"), float("nan")
  return float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(diffs.size))


def miniature_targets(
  rows: Sequence[Mapping[str, Any]],
  tau: float = 0.95,
  teacher: str = "Regular",
  sft: str = "PIPO-SFT",
  opd: str = "PIPO+OPD",
) -> list[dict]:
  """The CPU miniature's targets, each {"target", "measured", "met"} (met None when it cannot be measured)."""
  out = []

  def add(target, measured, met):
    out.append({"target": target, "measured": measured, "met": met})

  t, s, o = _row(rows, teacher), _row(rows, sft, tau), _row(rows, opd, tau)
  if t is not None:
    add("teacher (Regular) avg@k ≥ 90 %", f"{_pct(t['avg_at_k'])} %", t["avg_at_k"] >= 0.9)
  if t is not None and o is not None:
    gap = 100 * (t["avg_at_k"] - o["avg_at_k"])
    add(f"PIPO+OPD at τ {tau:g} within 5 points avg@k of the teacher", f"{gap:+.2f} points below", gap <= 5)
    add(
      f"PIPO+OPD at τ {tau:g} pass@k ≥ the teacher's",
      f"{_pct(o['pass_at_k'])} vs {_pct(t['pass_at_k'])}",
      o["pass_at_k"] >= t["pass_at_k"],
    )
  if t is not None and s is not None:
    gap = 100 * (t["avg_at_k"] - s["avg_at_k"])
    add(f"PIPO-SFT at τ {tau:g} within 10 points avg@k of the teacher", f"{gap:+.2f} points below", gap <= 10)
  if s is not None and o is not None:
    add(
      f"OPD above SFT on avg@k at τ {tau:g}",
      f"{100 * (o['avg_at_k'] - s['avg_at_k']):+.2f} points",
      o["avg_at_k"] > s["avg_at_k"],
    )
  gated = [
    r for r in rows if r.get("method") == opd and not r.get("control") and _num(r.get("conf_threshold")) is not None
  ]
  ratios = [
    float(r["pad_ratio"]) for r in gated if _num(r.get("pad_ratio")) is not None and 0 < float(r["pad_ratio"]) < 1
  ]
  if ratios:
    add(
      "the sweep spans PAD ratios from a few % to ≥ 0.6",
      f"{min(ratios):.3f} … {max(ratios):.3f}",
      min(ratios) <= 0.1 and max(ratios) >= 0.6,
    )
  for r in sorted(gated, key=lambda r: float(r["conf_threshold"])):
    ctl = _row(rows, opd, float(r["conf_threshold"]), control=True)
    if ctl is None or float(r.get("pad_ratio") or 0) < 0.1:
      continue
    d, se = paired_difference(r, ctl)
    add(
      f"gate above random PAD at τ {_tau(r)} (PAD ratio {float(r['pad_ratio']):.2f}), avg@k",
      f"{100 * d:+.2f} ± {100 * se:.2f} points (paired SE over questions)",
      d > 0,
    )
  if o is not None and _num(o.get("speedup_min")) is not None:
    lo, hi, med = float(o["speedup_min"]), float(o["speedup_max"]), float(o["speedup_vs_ar"])
    add(
      f"effective speed-up of PIPO+OPD at τ {tau:g} ≥ 1.5× (spread ≤ ±0.05×)",
      f"{med:.2f}× (min {lo:.2f}, max {hi:.2f}, {len(o.get('speedup_rounds') or [])} rounds)",
      med >= 1.5 and (hi - lo) / 2 <= 0.05,
    )
  return out


TRAINING_STAGES = ("make_task", "teacher", "rollout", "difficulty", "sft")  # the demo's stages before OPD


def _checkpoint_step(method: str) -> int | None:
  """`PIPO-SFT step 600` -> 600 (the rows the demo writes for its SFT checkpoints)."""
  head, _, step = str(method).rpartition(" step ")
  return int(step) if head and step.isdigit() else None


def training_budget(
  step_rows: Sequence[Mapping[str, Any]],
  rows: Sequence[Mapping[str, Any]],
  timings: Mapping[str, float],
  teacher: str = "Regular",
  opd: str = "PIPO+OPD",
  tau: float = 0.95,
) -> list[dict]:
  """Accuracy against the minutes of training it took: one point per SFT checkpoint, then PIPO+OPD.

  A checkpoint at step s of S costs the stages before SFT plus s/S of the SFT stage (steps take equal time);
  PIPO+OPD adds the OPD stage. Evaluation stages are a fixed cost on top (`eval_minutes`). Each point:
  {"label", "train_minutes", "avg_at_k", "pass_at_k", "gap"} with gap = teacher avg@k - this avg@k, in points.
  """
  steps = sorted((s, r) for r in step_rows if (s := _checkpoint_step(r.get("method", ""))) is not None)
  if not steps:
    return []
  before = sum(float(timings.get(k, 0)) for k in TRAINING_STAGES[:-1]) / 60
  sft, last = float(timings.get("sft", 0)) / 60, steps[-1][0]
  t = _row(rows, teacher)
  gap = lambda r: 100 * (t["avg_at_k"] - r["avg_at_k"]) if t is not None else float("nan")
  out = [
    {
      "label": r["method"],
      "train_minutes": before + sft * s / last,
      "avg_at_k": r["avg_at_k"],
      "pass_at_k": r["pass_at_k"],
      "gap": gap(r),
    }
    for s, r in steps
  ]
  o = _row(rows, opd, tau)
  if o is not None:
    out.append(
      {
        "label": f"{opd} (from step {last})",
        "train_minutes": before + sft + float(timings.get("opd", 0)) / 60,
        "avg_at_k": o["avg_at_k"],
        "pass_at_k": o["pass_at_k"],
        "gap": gap(o),
      }
    )
  return out


def training_budget_md(points: Sequence[Mapping[str, Any]], timings: Mapping[str, float], tau: float) -> str:
  """The accuracy-vs-training-minutes table, the evaluation minutes on top and the demo's 20-minute target."""
  body = [
    [p["label"], f"{p['train_minutes']:.1f}", _pct(p["avg_at_k"]), _pct(p["pass_at_k"]), f"{p['gap']:+.2f}"]
    for p in points
  ]
  evals = sum(float(v) for k, v in timings.items() if k.startswith("eval") or k in ("speed", "diagnose")) / 60
  total = float(timings.get("total_this_invocation", 0)) / 60
  return (
    _md_table(["checkpoint", "training minutes", f"avg@k at τ {tau:g}", "pass@k", "teacher − it (points)"], body)
    + f"\n\nTraining minutes: the stages {', '.join(TRAINING_STAGES)} (and opd for PIPO+OPD) up to the checkpoint; "
    + f"the evaluation stages add {evals:.1f} minutes. "
    + (
      f"This run: {total:.1f} minutes in all against the 20-minute budget ({'met' if total <= 20 else 'missed'})."
      if total
      else ""
    )
  )


def targets_md(targets: Sequence[Mapping[str, Any]]) -> str:
  body = [[t["target"], t["measured"], {True: "met", False: "**missed**", None: "—"}[t["met"]]] for t in targets]
  return _md_table(["target", "measured", ""], body)


def write_report(
  rows: Sequence[Mapping[str, Any]],
  run_dir: str,
  title: str = "PIPO evaluation",
  baseline_method: str = "Regular",
  budget_tau: float = 0.95,
  preamble: str = "",
) -> dict:
  """Write report.json, report.md and (when there is a sweep) sweep.png into `run_dir`; returns their paths."""
  os.makedirs(run_dir, exist_ok=True)
  rows = add_speedup(rows, baseline_method)
  paths = {"json": os.path.join(run_dir, "report.json"), "md": os.path.join(run_dir, "report.md")}
  png = os.path.join(run_dir, "sweep.png")
  if plot_sweep(rows, png):
    paths["png"] = png
  budget_png = os.path.join(run_dir, "budget.png")
  if plot_budget(rows, budget_png, budget_tau):
    paths["budget_png"] = budget_png
  with open(paths["json"], "w") as f:
    json.dump(
      {"title": title, "baseline_method": baseline_method, "benchmarks": benchmark_names(rows), "rows": rows},
      f,
      indent=2,
      sort_keys=True,
      default=str,
    )
    f.write("\n")
  with open(paths["md"], "w") as f:
    f.write(
      report_markdown(
        rows,
        title,
        "sweep.png" if "png" in paths else None,
        budget_tau,
        "budget.png" if "budget_png" in paths else None,
        preamble,
      )
    )
  return paths
