"""pipo_jax.watchdog: a stalled command (no CPU use) is killed and retried; a finishing one keeps its status."""

import sys
import time

from pipo_jax import watchdog


def test_passes_exit_status():
  assert watchdog.run([sys.executable, "-c", "import sys; sys.exit(3)"], stall_s=30, retries=0, poll_s=0.1) == 3


def test_kills_a_stalled_command_after_retries():
  t0 = time.monotonic()
  rc = watchdog.run(["sleep", "60"], stall_s=0.5, retries=1, poll_s=0.1, min_cpu_s=0.05)
  assert rc == 124 and time.monotonic() - t0 < 30


def test_busy_command_is_not_killed():
  busy = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
  assert watchdog.run([sys.executable, "-c", busy], stall_s=1.0, retries=0, poll_s=0.2, min_cpu_s=0.05) == 0
