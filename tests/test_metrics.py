import json
import types

import numpy as np
import pytest

from pipo_jax import metrics
from pipo_jax.config import ModelConfig, resolve_model_config


def test_writer_jsonl_tensorboard_and_rates(tmp_path):
  w = metrics.MetricsWriter(
    str(tmp_path), total_steps=10, flops_per_token=100.0, peak_flops=1000.0, num_devices=2, enabled=True
  )
  w.write_scalars(1, {"loss": np.float32(2.5), "lr": 1e-4})
  first = w.log_progress(2, {"loss": 2.0}, tokens_since_last=64)  # starts the clock: no rate yet
  assert "tokens_per_second" not in first
  w._last = (w._last[0] - 2.0, w._last[1])  # pretend 2 s passed since step 2
  out = w.log_progress(4, {"loss": 1.5}, tokens_since_last=400)
  w.close()
  assert out["tokens_per_second"] == pytest.approx(200.0, rel=0.05)
  assert out["steps_per_second"] == pytest.approx(1.0, rel=0.05)
  assert out["mfu"] == pytest.approx(100.0 * 200.0 / 2000.0, rel=0.05)
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


def test_flops_per_token_tiny_by_hand():
  cfg = resolve_model_config(ModelConfig(preset="tiny"))
  # tiny: D=64, I=128, V=256, 4 layers (3 GDN + 1 full), nq=4, nkv=2, hd=16, GDN Hk=2, Hv=4, dk=16, dv=8, 1 MTP layer
  full = 64 * 128 + 2 * 64 * 32 + 64 * 64  # q(+gate) [64,128], k,v [64,32], o [64,64]
  lin = 64 * (2 * 32 + 32) + 64 * 32 + 2 * 64 * 4 + 32 * 64  # qkv [64,96], z [64,32], a,b [64,4], out [32,64]
  mlp = 3 * 64 * 128
  n = full + 3 * lin + 4 * mlp + 64 * 256 + (full + mlp + 2 * 64 * 64)
  t = 32
  attn = 2 * 2 * 4 * 16 * t  # 1 backbone + 1 MTP full-attention layer
  gdn = 3 * 6 * 4 * 16 * 8
  assert metrics.estimate_flops_per_token(cfg, t) == 3 * (2 * n + attn + gdn)
  assert metrics.estimate_flops_per_token(cfg, t, training=False) == 2 * n + attn + gdn
