"""Opt-in workaround for JAX CPU runs that wedge with asynchronous dispatch.

With jax 0.10 on a shared, oversubscribed CPU, a jitted train step dispatched while earlier steps are still in
flight can hang forever: every XLA and Eigen worker thread parks in a futex and the host blocks in
`device_get` (seen in the demo teacher run right after step 1; upstream: jax-ml/jax#25861, whose workaround is
to turn CPU async dispatch off). `PIPO_CPU_SYNC_DISPATCH=1` in the environment turns it off for a process;
experiments/demo.sh sets it. The cost is host/device overlap, negligible next to a CPU step.
"""

from __future__ import annotations

import os


def maybe_disable_async_dispatch() -> bool:
  """Disable CPU async dispatch when PIPO_CPU_SYNC_DISPATCH=1; returns whether it did. Call before any jit."""
  if os.environ.get("PIPO_CPU_SYNC_DISPATCH", "0") != "1":
    return False
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True
