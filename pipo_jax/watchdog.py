"""Run a command; if its process tree stops using CPU for a while, kill it and run it again.

    python -m pipo_jax.watchdog --stall_s=240 --retries=2 -- python -m pipo_jax.train --flagfile=...

Why: on a loaded CPU, jaxlib 0.10 executions were seen to wedge for good (every XLA worker thread parked in a
futex, the host blocked in `Execute`), at random, in training and before or after the first step. A wedged
process uses (almost) no CPU, while a slow one always uses some, so "less than `min_cpu_s` CPU seconds in
`stall_s` seconds" is a reliable stall signal. Training stages resume from their last checkpoint when rerun, other stages just redo
their work. Exit status: the command's, or 124 when every attempt stalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _tree_cpu_ticks(root: int) -> int:
  """utime + stime (clock ticks) summed over `root` and its descendants (Linux /proc)."""
  children: dict[int, list[int]] = {}
  ticks: dict[int, int] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    pid, ppid = int(name), int(fields[1])
    children.setdefault(ppid, []).append(pid)
    ticks[pid] = int(fields[11]) + int(fields[12])
  total, todo = 0, [root]
  while todo:
    p = todo.pop()
    total += ticks.get(p, 0)
    todo += children.get(p, [])
  return total


def run(cmd: list[str], stall_s: float, retries: int, poll_s: float = 5.0, min_cpu_s: float = 1.0) -> int:
  """Run `cmd`; a window of `stall_s` seconds with less than `min_cpu_s` CPU seconds used is a stall (a wedged
  process still wakes a few polling threads now and then, so "no tick at all" is too strict)."""
  min_ticks = min_cpu_s * os.sysconf("SC_CLK_TCK")
  for attempt in range(retries + 1):
    proc = subprocess.Popen(cmd, start_new_session=True)  # own process group: killed as a whole
    mark_ticks, mark_time = 0, time.monotonic()
    while proc.poll() is None:
      time.sleep(poll_s)
      t = _tree_cpu_ticks(proc.pid)
      if t - mark_ticks >= min_ticks:
        mark_ticks, mark_time = t, time.monotonic()
      elif time.monotonic() - mark_time > stall_s:
        print(f"[watchdog] no CPU use for {stall_s:.0f}s: killing attempt {attempt + 1} of {cmd[:4]}...",
              flush=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        break
    else:
      return proc.returncode
  return 124


def main(argv: list[str]) -> int:
  stall_s, retries = 240.0, 2
  while argv and argv[0] != "--":
    key, _, value = argv.pop(0).partition("=")
    if key == "--stall_s":
      stall_s = float(value)
    elif key == "--retries":
      retries = int(value)
    else:
      raise SystemExit(f"watchdog: unknown option {key}; usage: --stall_s=S --retries=N -- CMD...")
  if not argv[1:]:
    raise SystemExit("watchdog: no command after --")
  return run(argv[1:], stall_s, retries)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
