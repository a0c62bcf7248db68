"""Merge `pipo_jax.evaluate` row files into the run's report (report.json, report.md, sweep.png).

    python -m pipo_jax.make_report --rows=runs/demo/eval/teacher.json,runs/demo/eval/sft.json,... \\
        --run_dir=runs/demo --title="PIPO CPU miniature"

Rows keep their file order. The speed-up of every row is its effective tokens/s over the Regular row's
(`report.add_speedup`). `--extra_json` files (e.g. the demo's stage timings) are embedded in report.json under
their stem and listed at the end of report.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import flags


def define_flags() -> None:
  """Defined only when run as a program, so the module can be imported next to other CLIs."""
  global _ROWS, _RUN_DIR, _TITLE, _EXTRA, _NOTES, _SPEED, _TARGETS, _DIAGNOSIS, _STEPS, _TIMINGS
  _ROWS = flags.DEFINE_list("rows", None, "row JSON files written by pipo_jax.evaluate", required=True)
  _RUN_DIR = flags.DEFINE_string("run_dir", None, "where report.json / report.md / sweep.png go", required=True)
  _TITLE = flags.DEFINE_string("title", "PIPO evaluation", "report title")
  _EXTRA = flags.DEFINE_list("extra_json", [], "JSON files embedded in report.json (e.g. stage timings)")
  _NOTES = flags.DEFINE_string("notes", "", "markdown file appended to report.md")
  _SPEED = flags.DEFINE_string(
    "speed", "", "rows of pipo_jax.speed: speed-ups with their spread replace the single-run ones"
  )
  _TARGETS = flags.DEFINE_float("targets_tau", None, "state the CPU miniature's targets (met / missed) at this τ")
  _DIAGNOSIS = flags.DEFINE_string("diagnosis", "", "JSON of pipo_jax.diagnose: its tables go into the report")
  _STEPS = flags.DEFINE_string(
    "step_rows", "", "rows of the SFT checkpoints ('<method> step N'): accuracy vs training minutes (needs --timings)"
  )
  _TIMINGS = flags.DEFINE_string("timings", "", "stage timings JSON of experiments/demo.sh (seconds per stage)")


def build(
  row_files: Sequence[str],
  run_dir: str,
  title: str,
  extra_files: Sequence[str] = (),
  notes_file: str = "",
  speed_file: str = "",
  targets_tau=None,
  diagnosis_file: str = "",
  step_rows_file: str = "",
  timings_file: str = "",
) -> dict:
  from pipo_jax.evaluation import report

  rows = []
  for path in row_files:
    with open(path) as f:
      rows += json.load(f)
  if speed_file:
    with open(speed_file) as f:
      rows = report.apply_speed(rows, json.load(f))
  preamble = []
  if targets_tau is not None:
    targets = report.miniature_targets(report.add_speedup(rows), targets_tau)
    preamble += ["## Targets\n", report.targets_md(targets)]
  if step_rows_file and timings_file:
    with open(step_rows_file) as f, open(timings_file) as g:
      step_rows, timings = json.load(f), json.load(g)
    tau = 0.95 if targets_tau is None else targets_tau
    preamble += [
      "## Accuracy against the training budget\n",
      report.training_budget_md(report.training_budget(step_rows, rows, timings, tau=tau), timings, tau),
      "",
    ]
  if diagnosis_file:
    with open(diagnosis_file) as f:
      preamble += [
        "## Diagnosis (teacher-forced, held-out correct answers; `pipo_jax.diagnose`)\n",
        json.load(f)["markdown"],
      ]
  paths = report.write_report(rows, run_dir, title, preamble="\n".join(preamble))
  extra = {}
  for path in extra_files:
    if os.path.exists(path):
      with open(path) as f:
        extra[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
  if extra:
    with open(paths["json"]) as f:
      doc = json.load(f)
    doc.update(extra)
    with open(paths["json"], "w") as f:
      json.dump(doc, f, indent=2, sort_keys=True, default=str)
      f.write("\n")
  tail = []
  if notes_file and os.path.exists(notes_file):
    with open(notes_file) as f:
      tail.append(f.read())
  for name, value in extra.items():
    tail.append(f"## {name}\n\n```json\n{json.dumps(value, indent=2)}\n```\n")
  if tail:
    with open(paths["md"], "a") as f:
      f.write("\n" + "\n".join(tail))
  return paths


def main(argv):
  del argv
  paths = build(
    _ROWS.value,
    _RUN_DIR.value,
    _TITLE.value,
    _EXTRA.value,
    _NOTES.value,
    _SPEED.value,
    _TARGETS.value,
    _DIAGNOSIS.value,
    _STEPS.value,
    _TIMINGS.value,
  )
  print("[make_report] " + json.dumps(paths))


if __name__ == "__main__":
  from pipo_jax import cli

  cli.run(main, define_flags)
