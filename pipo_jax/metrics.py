"""Metrics: TensorBoard events + `metrics.jsonl` (process 0 only), console progress, FLOP utilisation.

`metrics.jsonl` holds one JSON object per logged step: {"step": int, "<name>": float, ...}.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

from pipo_jax.io import workdir

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Keys are matched as lowercase
# substrings of `jax.Device.device_kind`; the most specific (longest) key wins.
PEAK_FLOPS = {
  "tpu v4": 275e12,
  "tpu v5 lite": 197e12,
  "tpu v5e": 197e12,
  "tpu v5p": 459e12,
  "tpu v5": 459e12,  # "TPU v5" is how v5p reports itself
  "tpu v6 lite": 918e12,
  "tpu v6e": 918e12,
  "tpu7x": 2307e12,
  "h100": 989e12,
  "h200": 989e12,
  "a100": 312e12,
  "b200": 2250e12,
}


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `override` if > 0, else the table; None when unknown (CPU)."""
  if override and override > 0:
    return float(override)
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  hits = [k for k in PEAK_FLOPS if k in kind]
  return PEAK_FLOPS[max(hits, key=len)] if hits else None


def measure_matmul_peak(size: int = 2048, repeats: int = 5, device: jax.Device | None = None) -> float:
  """FLOP/s of the best of `repeats` timed fp32 [size, size] x [size, size] matmuls on one device (after a
  compile-and-warm-up run): a stand-in peak where the table has none (CPU), so MFU reads as a fraction of what
  this machine's matmul reaches rather than of a vendor figure."""
  import jax.numpy as jnp

  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  f = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 / best


def mfu(
  flops_per_step: float, steps_per_second: float, peak_per_device: float | None, num_devices: int
) -> float | None:
  """Model FLOP utilisation in [0, 1]: the step's FLOPs (all devices, `flop_model.train_step(...).total`) per
  second over the devices' peak; None when the peak is unknown."""
  if not peak_per_device:
    return None
  return flops_per_step * steps_per_second / (peak_per_device * num_devices)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricsWriter:
  """Writes scalars on process 0 only (others are no-ops, so every process can call it).

  `log_progress(step, metrics, tokens)` adds throughput (tokens/s and steps/s since the previous call), MFU
  when `flops_per_step` (all devices) and a peak are known, and prints one console line with the ETA to
  `total_steps`.
  """

  def __init__(
    self,
    logdir: str,
    total_steps: int | None = None,
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
    num_devices: int | None = None,
    enabled: bool | None = None,
  ):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self.logdir = logdir
    self.total_steps = total_steps
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.num_devices = num_devices or jax.device_count()
    self._tb = None
    self._jsonl = None
    self._last = None  # (time, step) of the previous progress line
    if self.enabled:
      workdir.makedirs(logdir)  # local path or URL (gs://...)
      from tensorboardX import SummaryWriter  # import only where used: workers never need it

      self._tb = SummaryWriter(logdir=logdir)
      self._jsonl = workdir.open_append(workdir.join(logdir, "metrics.jsonl"))

  def write_scalars(self, step: int, metrics: Mapping[str, float]):
    """One JSONL record and one TB scalar per metric. Values may be device arrays (fetched here)."""
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items() if v is not None}
    rec = {"step": int(step)}
    rec.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))

  def write_text(self, tag: str, text: str, step: int = 0):
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def log_progress(self, step: int, metrics: Mapping[str, float], tokens_since_last: int | None = None) -> dict:
    """Write metrics plus rates; returns what was written. The first call only starts the clock."""
    now = time.perf_counter()
    out = {k: _scalar(v) for k, v in metrics.items() if v is not None}
    if self._last is not None and tokens_since_last:
      dt = max(now - self._last[0], 1e-9)
      out["tokens_per_second"] = tokens_since_last / dt
      out["steps_per_second"] = (step - self._last[1]) / dt
      u = None
      if self.flops_per_step:
        u = mfu(self.flops_per_step, out["steps_per_second"], self.peak_flops, self.num_devices)
      if u is not None:
        out["mfu"] = u
    self.write_scalars(step, out)
    if self.enabled:
      eta = float("nan")
      if self.total_steps and out.get("steps_per_second"):
        eta = (self.total_steps - step) / out["steps_per_second"]
      parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
      if "loss" in out:
        parts.append(f"loss {out['loss']:.4f}")
      if "tokens_per_second" in out:
        parts.append(f"{out['tokens_per_second']:.0f} tok/s")
      if "mfu" in out:
        parts.append(f"mfu {100 * out['mfu']:.1f}%")
      if out.get("skipped_nonfinite"):
        parts.append(f"skipped_nonfinite {int(out['skipped_nonfinite'])}")
      parts.append(f"eta {_format_duration(eta)}")
      logging.info(" | ".join(parts))
    self._last = (now, step)
    return out

  def flush(self):
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def median_spread(values) -> tuple[float, float, float]:
  """(median, min, max) of timed rounds: how benchmarks report a figure with its spread."""
  v = np.asarray(values, float)
  return float(np.median(v)), float(v.min()), float(v.max())
