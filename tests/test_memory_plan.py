"""pipo_jax.memory_plan: abstract-shape AOT plans of the train step on the tiny preset (8 simulated devices)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pipo_jax import memory_plan
from pipo_jax.config import Config, DataConfig, LossConfig, MeshConfig, ModelConfig, resolve_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(batch=8, length=256, **kw) -> Config:
  return Config(
    mode="sft",
    model=ModelConfig(preset="tiny"),
    data=DataConfig(batch_size=batch, max_length=length),
    loss=LossConfig(logits_chunk=128),
    **kw,
  )


@pytest.fixture(scope="module")
def plans():
  """One compile per shape: base (8 x 256), twice the batch, twice the length."""
  return {
    "base": memory_plan.plan(_cfg(), "v6e"),
    "batch2": memory_plan.plan(_cfg(batch=16)),
    "length2": memory_plan.plan(_cfg(length=512)),
  }


def test_fields_and_accounting(plans):
  p = plans["base"]
  assert p["num_devices"] == jax.device_count() == 8 and p["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  for k in ("params_bytes", "optimizer_bytes", "temp_bytes", "total_bytes"):
    assert isinstance(p[k], int) and p[k] > 0, k
  assert p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
  # data=8 replicates every param: one device holds all of them, fp32.
  import flax.linen as nn

  from pipo_jax.trainer import boxed_params

  n = sum(
    int(np.prod(x.shape))
    for x in jax.tree_util.tree_leaves(
      nn.meta.unbox(boxed_params(resolve_model_config(ModelConfig(preset="tiny")), "sft"))
    )
  )
  assert p["params_bytes"] == 4 * n
  # AdamW: two fp32 moments per *trainable* param (the heads; the backbone is frozen), plus counts.
  assert 0 < p["optimizer_bytes"] < 2 * p["params_bytes"] + 1024
  # The donated state is aliased, and the arguments hold at least params + optimizer + batch.
  assert p["alias_bytes"] > 0
  assert p["argument_bytes"] >= p["params_bytes"] + p["optimizer_bytes"]
  assert p["fits"] is True and p["hbm_bytes"] == 32 * 2**30 and plans["batch2"]["fits"] is None


def test_temporaries_scale_with_batch_and_length(plans):
  base, b2, l2 = (plans[k]["temp_bytes"] for k in ("base", "batch2", "length2"))
  r_batch, r_len = b2 / base, l2 / base
  print(f"\ntiny sft temp bytes: base {base:,}, 2x batch {b2:,} ({r_batch:.2f}x), 2x length {l2:,} ({r_len:.2f}x)")
  # Activations are linear in the per-device batch; fixed-size buffers (grads, the logits chunk) keep it under 2x.
  assert 1.5 <= r_batch <= 2.5
  # Linear parts plus materialised attention scores (quadratic in length): between 1.5x and 3x here.
  assert 1.5 <= r_len <= 3.0
  # Parameters and optimizer state do not depend on the batch shape.
  for k in ("params_bytes", "optimizer_bytes"):
    assert plans["base"][k] == plans["batch2"][k] == plans["length2"][k]


def test_fsdp_shards_params():
  """On data=2,fsdp=4 the 'embed'-sharded params shrink per device; the batch must divide data*fsdp."""
  from pipo_jax import sharding

  mc = resolve_model_config(ModelConfig(preset="tiny"))
  fsdp = _cfg(mesh=MeshConfig(data=2, fsdp=4))
  state, _ = memory_plan.abstract_train_state(fsdp, mc, sharding.make_mesh(fsdp.mesh))
  state_r, _ = memory_plan.abstract_train_state(_cfg(), mc, sharding.make_mesh(_cfg().mesh))
  sharded = memory_plan.per_device_bytes((state.trainable, state.frozen))
  replicated = memory_plan.per_device_bytes((state_r.trainable, state_r.frozen))
  assert sharded < replicated / 2
  bad = _cfg(batch=4, mesh=MeshConfig(data=1, fsdp=8))
  with pytest.raises(ValueError, match="not divisible by data\\*fsdp"):
    memory_plan.abstract_batch(bad, sharding.make_mesh(bad.mesh))


def test_reexec_when_backend_has_other_device_count(monkeypatch):
  """jax is up with 8 devices here: asking for 4 re-runs the command in a child with the env set."""
  seen = {}

  def fake_call(cmd, env):
    seen.update(cmd=cmd, env=env)
    return 3

  monkeypatch.setattr(subprocess, "call", fake_call)
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=8")
  with pytest.raises(SystemExit) as e:
    memory_plan.ensure_host_devices(4, argv=["--config.model.preset=tiny", "--num_devices=4"])
  assert e.value.code == 3
  assert seen["cmd"][1:] == ["-m", "pipo_jax.memory_plan", "--config.model.preset=tiny", "--num_devices=4"]
  assert seen["env"]["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert seen["env"]["JAX_PLATFORMS"] == "cpu"
  memory_plan.ensure_host_devices(8)  # matches: returns in place


@pytest.mark.slow
def test_cli_json(tmp_path):
  """The CLI in a fresh process: sets the device count itself, prints the table, writes the JSON."""
  out = tmp_path / "plan.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  env["PYTHONPATH"] = ROOT
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "pipo_jax.memory_plan",
      "--config.model.preset=tiny",
      "--config.data.batch_size=4",
      "--config.data.max_length=128",
      "--num_devices=4",
      "--accelerator=H100",
      f"--output={out}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-4000:]
  assert "FITS in H100" in r.stdout
  plan = json.loads(out.read_text())
  assert plan["num_devices"] == 4 and plan["fits"] is True
  for k in ("params_bytes", "optimizer_bytes", "temp_bytes", "total_bytes"):
    assert plan[k] > 0


def test_whole_param_gather_detector_reads_the_consumer_module():
  """A gather of a whole tensor-sharded param is flagged; one whose shape merely equals it while its op_name
  names another module (an FSDP-only gather of the 9B's GDN in_proj_qkv is [4096, 4096], the whole o_proj) is
  not; a gather whose op_name names no module falls back to the shape."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from pipo_jax import sharding

  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  spec = lambda *axes: NamedSharding(mesh, P(*axes))
  params = {
    "layers": {
      "layer_3": {
        "self_attn": {
          "o_proj": {"kernel": jax.ShapeDtypeStruct((1, 64, 64), "bfloat16", sharding=spec(None, "tensor", "fsdp"))}
        }
      },
      "layer_0": {
        "linear_attn": {
          "in_proj_qkv": {
            "kernel": jax.ShapeDtypeStruct((1, 64, 128), "bfloat16", sharding=spec(None, "fsdp", "tensor"))
          }
        }
      },
    }
  }
  gather = lambda op_name: {
    "kind": "all-gather",
    "bytes": 8192,
    "times": 1,
    "shape": "bf16[1,64,64]{2,1,0}",
    "op_name": op_name,
  }
  built = {"params": params, "teacher": None}
  fsdp_only = gather("jit(step)/while/body/layers/layer_0/linear_attn/in_proj_qkv/dot_general")
  real = gather("jit(step)/while/body/layers/layer_3/self_attn/o_proj/dot_general")
  anonymous = gather("jit(step)/while/body/sharding_constraint")
  assert memory_plan.whole_param_gathers([fsdp_only], built, mesh) == []
  hits = memory_plan.whole_param_gathers([real, anonymous], built, mesh)
  assert [h["param"] for h in hits] == ["[0]['layers']['layer_3']['self_attn']['o_proj']['kernel']"] * 2, hits
