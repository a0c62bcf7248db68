"""The one convention of every `python -m pipo_jax.<tool>` command.

* Each tool defines its flags in `define_flags()`, called only when the module is the program (inside
  `cli.run`), so any number of tools can be imported together (tests, other tools) without flag clashes.
* `cli.run(main, define_flags)` is the tool's `__main__`: it defines the tool's flags plus `--verbose`, makes
  stdout line-buffered (progress arrives line by line when piped to a file), and turns the project's own input
  and config errors (ValueError, OSError: a malformed line, a missing file, a bad flag value) into one line
  `<tool>: error: <message>` on stderr and exit status 1. `--verbose` re-raises with the full traceback.
  Programming errors (TypeError, KeyError, ...) keep their traceback.
* `Progress` is the progress convention of long commands: a log line with count, rate and ETA at most every
  `every_s` seconds (and at the end), through absl logging, so `--verbosity=-1` silences it and a CI log gets
  tens of lines, not thousands.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from absl import app, flags, logging

FLAGS = flags.FLAGS
USER_ERRORS = (ValueError, OSError)


def _define_verbose() -> None:
  if "verbose" not in FLAGS:
    flags.DEFINE_bool("verbose", False, "on an input or config error, print the full traceback instead of one line")
  # Listed by the program's --help beside its own flags (absl names the main module after sys.argv[0]).
  FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS["verbose"])


def one_line(e: BaseException) -> str:
  msg = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
    msg = f"{e.filename}: {msg}"
  return msg


def guard(main: Callable, prog: str) -> Callable:
  """`main` with USER_ERRORS reported as one stderr line and exit status 1 (unless --verbose)."""

  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if "verbose" in FLAGS and FLAGS["verbose"].value:
        raise
      sys.stderr.write(f"{prog}: error: {one_line(e)}  (--verbose for the traceback)\n")
      sys.stderr.flush()
      sys.exit(1)

  return wrapped


def run(main: Callable, define_flags: Callable | None = None, prog: str = "") -> None:
  """The `if __name__ == "__main__":` body of every tool (see the module docstring)."""
  if define_flags is not None:
    define_flags()
  _define_verbose()
  try:
    sys.stdout.reconfigure(line_buffering=True)
  except (AttributeError, ValueError):  # not a TextIOWrapper (e.g. captured by a test harness)
    pass
  prog = prog or os.path.basename(sys.argv[0]).removesuffix(".py")
  app.run(guard(main, prog))


def require(*names: str) -> None:
  """app.UsageError naming the first of `names` (flag names) left empty."""
  for n in names:
    if FLAGS[n].value in (None, "", []):
      raise app.UsageError(f"--{n} is required")


def read_nonempty_lines(path: str, what: str = "input") -> list[tuple[int, str]]:
  """(line number, line) of the non-blank lines of a text file; an empty file is a user error."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: {what} file not found")
  with open(path, encoding="utf-8") as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  if not lines:
    raise ValueError(f"{path}: empty {what} file")
  return lines


class Progress:
  """Count work items; log `label: done/total (rate/s, ETA)` at most every `every_s` seconds and at the end."""

  def __init__(self, total: int, label: str, unit: str = "items", every_s: float = 10.0):
    self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
    self.done = 0
    self.t0 = self._last = time.perf_counter()

  def line(self, now: float | None = None) -> str:
    now = time.perf_counter() if now is None else now
    dt = max(now - self.t0, 1e-9)
    rate = self.done / dt
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_s = "?" if eta == float("inf") else f"{int(eta) // 60}:{int(eta) % 60:02d}"
    pct = 100.0 * self.done / max(self.total, 1)
    return (
      f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.2f} {self.unit}/s, "
      f"elapsed {int(dt) // 60}:{int(dt) % 60:02d}, ETA {eta_s}"
    )

  def update(self, n: int = 1) -> None:
    self.done += n
    now = time.perf_counter()
    if self.done >= self.total or now - self._last >= self.every_s:
      self._last = now
      logging.info("%s", self.line(now))


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
  """Log `label ...` before one long indivisible call (a compilation, a checkpoint restore) and `label: done in
  N s` after it: the progress a call without items to count can show."""
  logging.info("%s ...", label)
  t0 = time.perf_counter()
  yield
  logging.info("%s: done in %.1f s", label, time.perf_counter() - t0)


def define_sampling_flags() -> tuple:
  """--temperature / --top_k / --top_p of the tools that draw k samples per prompt (rollout, evaluate, speed):
  None when not given, so that `inference.sampling.resolve` falls back to generation_config.json, then to
  temperature 1."""
  holders = (
    flags.DEFINE_float("temperature", None, "0 = greedy (default: generation_config.json, else 1)"),
    flags.DEFINE_integer("top_k", None, "0 = off (default: generation_config.json, else 0)"),
    flags.DEFINE_float("top_p", None, "1 = off (default: generation_config.json, else 1)"),
  )
  for h in holders:  # listed by the program's --help, as if the tool had defined them itself
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[h.name])
  return holders
