"""One CLI convention for every `python -m pipo_jax.<tool>` (pipo_jax/cli.py)."""

import os
import subprocess
import sys

import pytest
from absl import flags

from pipo_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tool -> a flag its --help must list
TOOLS = {
  "train": "config",
  "generate": "prompts",
  "bench": "new_tokens",
  "decode_profile": "min_window_s",
  "score": "pipo",
  "convert": "to_hf",
  "evaluate": "benchmark",
  "rollout": "min_pass_rate",
  "make_report": "run_dir",
  "make_task": "n_train",
  "memory_plan": "accelerator",
  "prepare_benchmark": "format",
  "speed": "repeats",
  "diagnose": "student",
}


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def test_every_cli_imports_together_without_defining_flags():
  """Importing every tool into one process defines none of their flags (each defines them in define_flags,
  called only when it is the program), and each has a define_flags and a main."""
  code = (
    "import importlib\nfrom absl import flags\n"
    f"mods = [importlib.import_module('pipo_jax.' + t) for t in {sorted(TOOLS)!r}]\n"
    "assert all(callable(m.main) and callable(m.define_flags) for m in mods)\n"
    "ours = {m: [f.name for f in fl] for m, fl in flags.FLAGS.flags_by_module_dict().items()\n"
    "        if 'pipo_jax' in m}\n"
    "print(ours)\n"
  )
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == "{}"  # libraries (absl, orbax, grain) may define flags; no tool does


def test_every_cli_help():
  """`python -m pipo_jax.<tool> --help` (absl's, which exits with status 1) lists the tool's own flags and
  --verbose, from any directory (run in parallel)."""
  procs = {
    t: subprocess.Popen(
      [sys.executable, "-m", f"pipo_jax.{t}", "--help"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=_env(),
      cwd="/",
    )
    for t in TOOLS
  }
  for t, p in procs.items():
    out, err = p.communicate(timeout=1200)
    assert p.returncode == 1 and "Try --helpfull" in out and "Traceback" not in err, f"{t}: {err[-2000:]}"
    assert f"--{TOOLS[t]}" in out and "verbose: on an input or config error" in out, f"{t} --help:\n{out[:2000]}"


def _run_guarded(exc, verbose):
  def main(argv):
    raise exc

  if "verbose" not in flags.FLAGS:
    cli._define_verbose()
  flags.FLAGS["verbose"].value = verbose
  return cli.guard(main, "tool")


def test_user_error_is_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    _run_guarded(ValueError("data.jsonl:3: expected\n a 'question'"), False)([])
  assert e.value.code == 1
  assert capsys.readouterr().err == "tool: error: data.jsonl:3: expected a 'question'  (--verbose for the traceback)\n"
  with pytest.raises(SystemExit):
    _run_guarded(FileNotFoundError(2, "No such file or directory", "/x/ckpt"), False)([])
  assert capsys.readouterr().err.startswith("tool: error: [Errno 2] No such file or directory: '/x/ckpt'  (")
  with pytest.raises(ValueError):  # --verbose: the traceback
    _run_guarded(ValueError("bad"), True)([])
  with pytest.raises(TypeError):  # a programming error keeps its traceback
    _run_guarded(TypeError("bug"), False)([])
  flags.FLAGS["verbose"].value = False


def test_progress_line_rate_and_eta():
  p = cli.Progress(100, "generate", "prompts", every_s=1e9)
  p.done = 25
  line = p.line(now=p.t0 + 50.0)  # 25 in 50 s: 0.5/s, 75 left -> 150 s
  assert line == "generate: 25/100 prompts (25%), 0.50 prompts/s, elapsed 0:50, ETA 2:30"


def test_empty_input_file_is_an_error(tmp_path):
  f = tmp_path / "empty.jsonl"
  f.write_text("\n  \n")
  with pytest.raises(ValueError, match=r"empty.jsonl: empty prompts file"):
    cli.read_nonempty_lines(str(f), "prompts")
  with pytest.raises(FileNotFoundError, match=r"missing.jsonl: prompts file not found"):
    cli.read_nonempty_lines(str(tmp_path / "missing.jsonl"), "prompts")


def test_stage_logs_start_and_duration(monkeypatch):
  lines, clock = [], iter([10.0, 72.5])
  monkeypatch.setattr(cli.logging, "info", lambda fmt, *a: lines.append(fmt % a))
  monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
  with cli.stage("compile the train step"):
    lines.append("(work)")
  assert lines == ["compile the train step ...", "(work)", "compile the train step: done in 62.5 s"]


def test_progress_logs_at_most_every_interval_and_at_the_end(monkeypatch):
  lines, now = [], [0.0]
  monkeypatch.setattr(cli.logging, "info", lambda fmt, *a: lines.append(fmt % a))
  monkeypatch.setattr(cli.time, "perf_counter", lambda: now[0])
  p = cli.Progress(5, "write", "tensors", every_s=10.0)
  for t in (1.0, 2.0, 11.0, 12.0, 13.0):  # a line at 11 s (10 s since the start), then the final one
    now[0] = t
    p.update()
  assert [line.split(" (")[0] for line in lines] == ["write: 3/5 tensors", "write: 5/5 tensors"]
