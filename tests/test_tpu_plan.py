"""memory_plan --target=tpu: the trainer's steps compiled by the real TPU compiler (libtpu, no TPU needed).

libtpu is not a global dependency (an importable libtpu makes every jax process probe for a TPU): install it with
`pip install --target DIR -r requirements-tpu.txt` and run with PIPO_TPU_SITE=DIR. Without it the tests that
compile for a TPU skip with that reason; the HLO-counting tests run on the CPU compiler's HLO either way.
"""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipo_jax import hlo_stats, memory_plan, optim, sharding, tpu_plan
from pipo_jax.config import (
  Config,
  DataConfig,
  LoraConfig,
  LossConfig,
  MeshConfig,
  ModelConfig,
  OPDConfig,
  OptimConfig,
  resolve_model_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5p:2x2x1"  # 4 chips: the production axes data x fsdp x tensor as 1 x 2 x 2


def _libtpu_or_skip():
  try:
    return tpu_plan.libtpu_path()
  except tpu_plan.LibTPUMissing as e:
    pytest.skip(f"libtpu missing: {e}")


@pytest.fixture(scope="module")
def devices():
  _libtpu_or_skip()
  return tpu_plan.topology_devices(TOPOLOGY)


def _cfg(mode: str) -> Config:
  common = dict(
    model=ModelConfig(preset="tiny"),
    mesh=MeshConfig(data=1, fsdp=2, tensor=2),
    loss=LossConfig(logits_chunk=32),
    lora=LoraConfig(rank=8, alpha=16),
  )
  if mode == "sft":
    return Config(
      mode="sft", data=DataConfig(batch_size=4, max_length=64), optim=OptimConfig(grad_accum_steps=2), **common
    )
  return Config(
    mode="opd",
    data=DataConfig(batch_size=2, max_length=64),
    opd=OPDConfig(teacher=ModelConfig(preset="tiny"), prompt_length=16, max_new_tokens=16, topk=4),
    **common,
  )


def _compile(cfg: Config, devices):
  from pipo_jax.io import loading

  mc = loading.model_config_of(cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  built = memory_plan.build_step(cfg, mc, mesh)
  compiled, _, _ = memory_plan.compile_step(built, mesh)
  return {
    "cfg": cfg,
    "mc": mc,
    "mesh": mesh,
    "built": built,
    "compiled": compiled,
    "plan": memory_plan.tpu_report(cfg, mc, mesh, built, compiled, "v5p"),
  }


@pytest.fixture(scope="module")
def sft(devices):
  return _compile(_cfg("sft"), devices)


@pytest.fixture(scope="module")
def opd(devices):
  return _compile(_cfg("opd"), devices)


# ------------------------------------------------------------------------------------------------
# Independent references: shard sizes from the partition spec and the mesh axis sizes (not shard_shape)
# ------------------------------------------------------------------------------------------------


def _shard_bytes(x, mesh_shape: dict) -> int:
  spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(tuple(x.sharding.spec)))
  n = 1
  for dim, axes in zip(x.shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    k = math.prod(mesh_shape[a] for a in axes)
    assert dim % k == 0
    n *= dim // k
  return n * np.dtype(x.dtype).itemsize


def _tree_shard_bytes(tree, mesh_shape) -> int:
  return sum(_shard_bytes(x, mesh_shape) for x in jax.tree_util.tree_leaves(tree))


def _rule_axes(names) -> list:
  table = dict(sharding.RULES)
  return [None if n is None else table[n] for n in names]


@pytest.mark.parametrize("which", ["sft", "opd"])
def test_per_chip_param_and_optimizer_bytes_are_the_shard_sums(which, request):
  r = request.getfixturevalue(which)
  p, built, mesh_shape = r["plan"], r["built"], dict(r["mesh"].shape)
  params = _tree_shard_bytes(built["params"], mesh_shape)
  if built["teacher"] is not None:
    params += _tree_shard_bytes(built["teacher"], mesh_shape)
    assert p["teacher_params_bytes"] == _tree_shard_bytes(built["teacher"], mesh_shape)
  assert p["params_bytes"] == params
  assert p["optimizer_bytes"] == _tree_shard_bytes(built["optimizer"], mesh_shape)
  # AdamW: mu and nu per trainable param, each sharded like it, plus replicated int32 counts.
  trainable = _tree_shard_bytes(built["state"].trainable, mesh_shape)
  counts = [x for x in jax.tree_util.tree_leaves(built["optimizer"]) if x.ndim == 0]
  assert p["optimizer_bytes"] == 2 * trainable + sum(np.dtype(x.dtype).itemsize for x in counts)
  # The compiler held every argument as planned, and its buffers cover them.
  assert p["sharding_mismatches"] == []
  assert p["argument_bytes"] >= p["params_bytes"] + p["optimizer_bytes"] + p["batch_bytes"]
  step_total = p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
  if built["teacher"] is None:
    assert p["total_bytes"] == step_total
  else:  # the larger of the train step (teacher resident) and the teacher scoring (TrainState resident)
    assert p["train_step"]["total_bytes"] == step_total + p["teacher_params_bytes"]
    scoring = p["teacher_scoring"]
    assert scoring["total_bytes"] >= scoring["argument_bytes"] + _tree_shard_bytes(built["state"], mesh_shape)
    assert p["total_bytes"] == max(p["train_step"]["total_bytes"], scoring["total_bytes"])
  assert p["alias_bytes"] > 0  # the donated state is updated in place


def test_rule_sharded_params_stay_sharded_in_the_compiled_step(sft):
  """Every param whose logical axes map to a mesh axis of size > 1 (per sharding.RULES) is split on the chips."""
  from pipo_jax.trainer import boxed_params

  mc, mesh, compiled = sft["mc"], sft["mesh"], sft["compiled"]
  boxed = boxed_params(mc, "sft")
  state_sh = compiled.input_shardings[0][0]
  got = {
    jax.tree_util.keystr(k): s
    for k, s in jax.tree_util.tree_leaves_with_path(optim.combine(state_sh.trainable, state_sh.frozen))
  }
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.meta.Partitioned)):
    shape = leaf.value.shape
    shard = got[jax.tree_util.keystr(path)].shard_shape(shape)
    for d, axes in enumerate(_rule_axes(leaf.names)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      k = math.prod(mesh.shape[a] for a in axes)
      assert shard[d] == shape[d] // k, (jax.tree_util.keystr(path), leaf.names, shape, shard)
      checked += k > 1
  assert checked > 20  # embed / heads / mlp / vocab dims really are split on this mesh


def test_mismatch_detector_flags_a_replicated_param(sft):
  """sharding_mismatches reports a parameter the compiled program would hold whole."""
  built, compiled, mesh = sft["built"], sft["compiled"], sft["mesh"]

  class Replicating:  # the compiled step, except that one sharded frozen param comes out replicated
    def __init__(self, inner):
      shardings, kwargs = inner.input_shardings
      state = shardings[0]
      leaves, treedef = jax.tree_util.tree_flatten(state.frozen)
      i = next(j for j, s in enumerate(leaves) if any(a is not None for a in s.spec))
      leaves[i] = NamedSharding(mesh, P())
      self.input_shardings = (
        (state.replace(frozen=jax.tree_util.tree_unflatten(treedef, leaves)),) + tuple(shardings[1:]),
        kwargs,
      )

  assert memory_plan.sharding_mismatches(compiled, built) == []
  bad = memory_plan.sharding_mismatches(Replicating(compiled), built)
  assert len(bad) == 1 and "frozen" in bad[0]


def test_opd_step_compiles_with_teacher_and_counts_its_collectives(opd):
  p = opd["plan"]
  assert p["teacher_params_bytes"] > 0 and p["student_params_bytes"] > 0
  assert p["length"] == 16 + 2 * 16
  # FSDP over 2 chips gathers params and scatters gradients; tensor over 2 reduces partial matmul sums.
  c = p["collectives"]
  assert c["all-gather"]["count"] > 0 and c["all-reduce"]["count"] + c["reduce-scatter"]["count"] > 0


def test_flops_are_trip_count_corrected_and_agree_with_the_compiler(sft):
  p = sft["plan"]
  ca = p["compiler_cost_analysis"]["flops"]
  # Our once-counted HLO FLOPs against the compiler's own once-counted total. (Measured on this tiny step: 57.47M vs
  # 57.28M; 77.0M while hlo_stats charged the TPU's base-dilated convolutions for their dilation holes.)
  assert p["hlo_counts_once"]["flops"] == pytest.approx(ca, rel=0.02), (p["hlo_counts_once"], ca)
  # Loops (accumulation over 2 micro-batches, LM-head chunks) run more than once: their bodies count that often.
  assert p["loops"] and p["unknown_trip_counts"] == 0
  assert p["flops"] > 1.2 * ca
  # The model FLOPs (flop_model: no remat) against the compiled matmul FLOPs per chip: what the TPU compiler runs
  # is the model's `executed` count (with the LM-head chunks' recomputed logits) split over the 4 chips. (Measured
  # 1.015. Before hlo_stats counted only the real taps of a convolution, the batched dots that the TPU compiler
  # writes as base-dilated convolutions, the delta rule's, read 1.37.)
  from pipo_jax import flop_model

  trained = flop_model.trained_modules(sft["built"]["state"].trainable)
  f = flop_model.train_step(sft["cfg"], sft["mc"], trained, sft["built"]["length"])
  n = sft["mesh"].devices.size
  print(f"\ntiny sft: compiled dot FLOPs {p['dot_flops']:.4e}, model executed / chip {f.executed / n:.4e}")
  assert p["model_flops"] == pytest.approx(f.total / n)
  assert p["dot_flops"] / (f.executed / n) == pytest.approx(1.0, abs=0.03)


# ------------------------------------------------------------------------------------------------
# HLO counting against hand-computed figures (these need no libtpu: the CPU compiler's HLO has the same shape)
# ------------------------------------------------------------------------------------------------


def _scan_matmuls(L=5, M=16, K=64):
  def f(x_MK, w_LKK):
    return jax.lax.scan(lambda h, w: (h @ w, None), x_MK, w_LKK)[0]

  x = jax.ShapeDtypeStruct((M, K), jnp.float32)
  w = jax.ShapeDtypeStruct((L, K, K), jnp.float32)
  return f, (x, w), L * 2 * M * K * K


def test_convolution_taps_by_hand():
  # A batched dot as the TPU writes it: size-2 window over a base dilated by 2 (input 0 _ 1): each of the 2
  # outputs sees one real element and one hole.
  assert hlo_stats._taps(2, 2, 1, 0, 0, 2, 1) == 2
  # A causal prefix sum: window 32 over 32 inputs padded by 31 in front: output o sees o + 1 real inputs.
  assert hlo_stats._taps(32, 32, 1, 31, 0, 1, 1) == sum(range(1, 33))
  # Plain valid window 3 over 5 inputs, stride 2: outputs at 0, 2 see 3 inputs each.
  assert hlo_stats._taps(5, 3, 2, 0, 0, 1, 1) == 6
  ins = hlo_stats._parse_instr(
    "  %c = f32[2,2,32,32]{3,2,1,0} convolution(%a, %a), window={size=2x2 lhs_dilate=2x2}, dim_labels=01bf_01oi->01bf"
  )
  # [2, 2] batches of a 32 x 16 by 16 x 32 product: 2 * 4 * 32 * 32 * 16.
  assert hlo_stats._flops(ins, {"a": "f32[2,2,32,16]"}) == 2 * 4 * 32 * 32 * 16


NESTED_SLICE_HLO = """
HloModule m

%inner (p0: f32[8,4,16], p1: s32[]) -> f32[4,16] {
  %p0 = f32[8,4,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = f32[1,4,16]{2,1,0} dynamic-slice(%p0, %p1, %c0, %c0), dynamic_slice_sizes={1,4,16}
  ROOT %b = f32[4,16]{1,0} bitcast(%ds)
}

%outer (q0: f32[8,4,16], q1: s32[], q2: f32[16,3]) -> f32[4,3] {
  %q0 = f32[8,4,16]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %q2 = f32[16,3]{1,0} parameter(2)
  %f = f32[4,16]{1,0} fusion(%q0, %q1), kind=kLoop, calls=%inner
  ROOT %d = f32[4,3]{1,0} dot(%f, %q2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[8,4,16], i: s32[], w: f32[16,3]) -> f32[4,3] {
  %a = f32[8,4,16]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %w = f32[16,3]{1,0} parameter(2)
  ROOT %r = f32[4,3]{1,0} fusion(%a, %i, %w), kind=kOutput, calls=%outer
}
"""


def test_bytes_of_a_slice_read_through_a_nested_fusion():
  """As the TPU writes a layer's matmul on a stacked cache: the outer fusion takes the whole [8, 4, 16] stack, a
  nested fusion dynamic-slices one [4, 16] layer out of it. By hand: the slice 4*16*4 = 256 B, the index 4 B,
  the weight 16*3*4 = 192 B, the output 4*3*4 = 48 B: 500 B, not the whole stack's 2048 B + 244 B."""
  r = hlo_stats.analyze(NESTED_SLICE_HLO)
  assert r["bytes"] == 256 + 4 + 192 + 48
  assert r["flops"] == 2 * 4 * 3 * 16


CONDITIONAL_HLO = """
HloModule m

%small (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  ROOT %n = f32[4,8]{1,0} negate(%a)
}

%big (b: f32[4,8]) -> f32[4,8] {
  %b = f32[4,8]{1,0} parameter(0)
  %w = f32[8,8]{1,0} constant({...})
  ROOT %d = f32[4,8]{1,0} dot(%b, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (p: s32[], x: f32[4,8]) -> f32[4,8] {
  %p = s32[] parameter(0)
  %x = f32[4,8]{1,0} parameter(1)
  ROOT %c = f32[4,8]{1,0} conditional(%p, %x, %x), branch_computations={%small, %big}
}
"""


def test_a_conditional_counts_its_largest_branch_only():
  """One branch runs: the [4, 8] x [8, 8] dot of the larger one, 2*4*8*8 = 512 FLOPs, reading 128 + 256 B and
  writing 128 B; the other branch's negate is not counted (pipo's decode: two loops, one runs)."""
  r = hlo_stats.analyze(CONDITIONAL_HLO)
  assert r["flops"] == 2 * 4 * 8 * 8
  assert r["bytes"] == 128 + 256 + 128
  assert [o["name"] for o in r["ops"]] == ["d"]


def test_scan_flops_multiplied_by_trip_count_cpu():
  f, args, expected = _scan_matmuls()
  compiled = jax.jit(f).lower(*args).compile()
  r = hlo_stats.analyze(compiled.as_text())
  # The matmuls, plus the loop's own counter: i + 1 per step and i < N per test (L + L + 1 scalar ops).
  assert r["flops"] == expected + 2 * 5 + 1
  assert [l["trip_count"] for l in r["loops"]] == [5]
  # XLA's own cost analysis visits the loop body once: 1/5 of the work.
  assert compiled.cost_analysis()["flops"] == pytest.approx(expected / 5, rel=0.01)


def test_scan_flops_and_collectives_on_tpu(devices):
  """psum of a known array inside a 3-step scan, on 4 chips: 3 all-reduces of 4 KiB; FLOPs as the formula."""
  from jax.sharding import Mesh

  mesh = Mesh(np.array(devices).reshape(4), ("x",))
  L, M, K = 3, 128, 256

  def f(x_MK, w_LKK):
    def body(h, w):
      y = h @ w
      s = jnp.sum(y, axis=0)  # a cross-chip reduction of a [K] f32 vector, needed by the next step
      return y * s, None

    return jax.lax.scan(body, x_MK, w_LKK)[0]

  x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
  w = jax.ShapeDtypeStruct((L, K, K), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(f).lower(x, w).compile()
  r = hlo_stats.analyze(compiled.as_text())
  dot_flops = L * 2 * (M // 4) * K * K  # per chip: a quarter of the rows
  assert dot_flops <= r["flops"] <= dot_flops * 1.05  # plus the column sums and the scaling (elementwise)
  ar = r["collectives"]["all-reduce"]
  assert ar["count"] == L and ar["largest_bytes"] == K * 4 and ar["bytes"] == L * K * 4


def test_roofline_arithmetic():
  c = tpu_plan.CHIPS["v5p"]
  r = tpu_plan.roofline(c["peak_flops"] * 2.0, c["hbm_bw"] * 1.0, 0.0, "v5p", model_flops=c["peak_flops"])
  assert r["step_seconds"] == pytest.approx(2.0) and r["bound"] == "compute"
  assert r["mfu"] == pytest.approx(0.5)
  r = tpu_plan.roofline(c["peak_flops"], c["hbm_bw"] * 4.0, 0.0, "v5p")
  assert r["bound"] == "memory" and r["mfu"] == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear line
# ------------------------------------------------------------------------------------------------


def test_bad_topology_and_missing_libtpu(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="expected CHIP:SHAPE"):
    tpu_plan.chip_of("h100:8")
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  monkeypatch.setenv("PIPO_TPU_SITE", str(tmp_path))
  with pytest.raises(tpu_plan.LibTPUMissing, match="holds no libtpu"):
    tpu_plan.libtpu_path()


def test_cli_errors_are_one_line(devices):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  base = [sys.executable, "-m", "pipo_jax.memory_plan", "--config.model.preset=tiny", "--target=tpu"]
  for extra, msg in [
    (["--topology=v5p:3x3x3"], "libtpu cannot make topology"),
    (["--topology=v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=8"], "needs 8 devices, have 4"),
  ]:
    r = subprocess.run(base + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("memory_plan: ") and msg in last, r.stderr[-2000:]


def test_a_step_that_does_not_fit_is_a_plan_not_a_crash(devices):
  """A step XLA:TPU refuses for lack of HBM (the tiny model with dense [T, T] attention at 256K tokens per row)
  comes back as a plan: fits False, the temporaries XLA asked for and the HBM it had. Earlier the CLI died on this,
  and libtpu's start-up warnings printed just above read like the cause."""
  cfg = Config(
    mode="sft",
    model=ModelConfig(preset="tiny", attention_block=0),
    mesh=MeshConfig(data=1, fsdp=4, tensor=1),
    data=DataConfig(batch_size=4, max_length=262144),
  )
  p = memory_plan.plan(cfg, target="tpu", topology=TOPOLOGY)
  oom = p["out_of_memory"]
  assert p["fits"] is False and oom["program"] == "train_step"
  # Dense attention holds at least one fp32 [T, T] score matrix per head of the chip's one row (T pair slots).
  T = cfg.data.max_length // 2
  heads = resolve_model_config(ModelConfig(preset="tiny")).num_attention_heads
  assert oom["temp_bytes_needed"] >= heads * T * T * 4 > oom["hbm_usable_bytes"]
  assert 0.9 * 95 * 2**30 < oom["hbm_usable_bytes"] <= 96 * 2**30  # v5p: 95 GiB per chip, less XLA's reserve
  assert p["total_bytes"] >= p["temp_bytes"] == oom["temp_bytes_needed"]
  assert "RESOURCE_EXHAUSTED" in p["compile_error"]
  assert memory_plan.out_of_memory_report("INVALID_ARGUMENT: unexpected worker hostname", {}, cfg) is None
