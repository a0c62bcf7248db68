import json
import types

import numpy as np
import pytest

from pipo_jax import metrics


def test_writer_jsonl_tensorboard_and_rates(tmp_path):
  w = metrics.MetricsWriter(
    str(tmp_path), total_steps=10, flops_per_step=100.0, peak_flops=1000.0, num_devices=2, enabled=True
  )
  w.write_scalars(1, {"loss": np.float32(2.5), "lr": 1e-4})
  first = w.log_progress(2, {"loss": 2.0}, tokens_since_last=64)  # starts the clock: no rate yet
  assert "tokens_per_second" not in first
  w._last = (w._last[0] - 2.0, w._last[1])  # pretend 2 s passed since step 2
  out = w.log_progress(4, {"loss": 1.5}, tokens_since_last=400)
  w.close()
  assert out["tokens_per_second"] == pytest.approx(200.0, rel=0.05)
  assert out["steps_per_second"] == pytest.approx(1.0, rel=0.05)
  assert out["mfu"] == pytest.approx(100.0 * 1.0 / 2000.0, rel=0.05)  # FLOPs per step x steps/s / peak
  recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in recs] == [1, 2, 4]
  assert recs[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-4)}
  assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path / "x"), enabled=False)
  w.write_scalars(1, {"loss": 1.0})
  w.log_progress(2, {"loss": 1.0}, 10)
  w.close()
  assert not (tmp_path / "x").exists()


def test_peak_flops_table():
  dev = lambda kind: types.SimpleNamespace(device_kind=kind)
  assert metrics.peak_flops_per_device(dev("TPU v5p")) == 459e12
  assert metrics.peak_flops_per_device(dev("TPU v6 lite")) == 918e12
  assert metrics.peak_flops_per_device(dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert metrics.peak_flops_per_device(dev("NVIDIA H200")) == 989e12
  assert metrics.peak_flops_per_device(dev("cpu")) is None
  assert metrics.peak_flops_per_device(dev("cpu"), override=5e11) == 5e11


def test_measured_matmul_peak_is_a_plausible_rate():
  peak = metrics.measure_matmul_peak(size=256, repeats=3)
  assert 1e8 < peak < 1e14  # FLOP/s of one CPU device: above 0.1 GFLOP/s, below any chip's fp32 peak


def test_trainer_peak_flops_options(monkeypatch):
  from pipo_jax.config import Config, TrainConfig
  from pipo_jax.trainer import Trainer

  monkeypatch.setattr(metrics, "measure_matmul_peak", lambda: 123.0)
  tr = Trainer.__new__(Trainer)
  tr.cfg = Config(train=TrainConfig(peak_flops_per_device=5e11, measure_peak_flops=True))
  assert tr.peak_flops() == 5e11  # a given figure wins
  tr.cfg = Config(train=TrainConfig(measure_peak_flops=True))
  assert tr.peak_flops() == 123.0
  tr.cfg = Config(train=TrainConfig())
  assert tr.peak_flops() is None  # CPU: no table entry, no mfu
  with pytest.raises(ValueError, match="peak_flops_per_device"):
    Config(train=TrainConfig(peak_flops_per_device=-1.0)).validate(num_devices=1, process_count=1)
