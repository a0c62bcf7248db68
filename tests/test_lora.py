import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from toy_tree import D, R, toy_params

from pipo_jax.config import LoraConfig
from pipo_jax.models import lora

CFG = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
# one compiled program instead of an eager dispatch (and compile) per kernel shape
_init = jax.jit(lambda p, k: lora.init_lora(p, CFG, k))


def test_only_targeted_kernels_get_adapters_with_stacked_axes():
  params = toy_params()
  ad = _init(params, jax.random.PRNGKey(1))
  paths = set(lora.adapter_paths(ad))
  attn = {f"self_attn/{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  mlp = {f"mlp/{n}" for n in ("gate_proj", "up_proj", "down_proj")}
  expected = (
    {f"backbone/layers/layer_0/{m}" for m in mlp}
    | {f"backbone/layers/layer_1/{m}" for m in attn | mlp}
    | {f"mtp/layer/{m}" for m in attn | mlp}
  )
  assert paths == expected  # GDN in_proj_qkv/out_proj, mtp/fc, compressor, heads untouched
  q = ad["backbone"]["layers"]["layer_1"]["self_attn"]["q_proj"]
  assert q["a"].shape == (R, D, 4) and q["b"].shape == (R, 4, 16)
  mq = ad["mtp"]["layer"]["self_attn"]["q_proj"]
  assert mq["a"].shape == (D, 4) and mq["b"].shape == (4, 16)
  # PEFT's kaiming_uniform(a=sqrt(5)) bound 1/sqrt(in); B exactly zero
  assert float(jnp.abs(q["a"]).max()) <= 1 / np.sqrt(D) and float(jnp.abs(q["a"]).std()) > 0.05
  assert not np.any(np.asarray(q["b"]))
  # stacked layers get independent A
  assert not np.allclose(q["a"][0], q["a"][1])


def test_init_leaves_params_and_outputs_unchanged():
  params = toy_params()
  ad = _init(params, jax.random.PRNGKey(1))
  out = jax.jit(lambda p, a: lora.apply_lora(p, a, CFG))(params, ad)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(out)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = jnp.ones((3, D))
  w = params["mtp"]["layer"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(x @ w, x @ out["mtp"]["layer"]["mlp"]["up_proj"]["kernel"])


def test_hand_checked_alpha_over_r_scaling():
  params = {"blk": {"q_proj": {"kernel": jnp.eye(2)}}}
  ad = {"blk": {"q_proj": {"a": jnp.array([[1.0], [2.0]]), "b": jnp.array([[3.0, 4.0]])}}}
  cfg = LoraConfig(rank=1, alpha=2.0, dropout=0.0, targets=("q_proj",))
  # W + (2/1) * [[1],[2]] @ [[3,4]] = I + 2 * [[3,4],[6,8]]
  got = lora.apply_lora(params, ad, cfg)["blk"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got), np.array([[7.0, 8.0], [12.0, 17.0]]))
  assert lora.scale(LoraConfig(rank=64, alpha=128.0)) == 2.0


def test_merge_equals_on_the_fly_and_activation_path():
  params = toy_params()
  ad = _init(params, jax.random.PRNGKey(1))
  # give B non-zero values so the delta matters
  g = np.random.default_rng(3)
  ad = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.asarray(g.standard_normal(x.shape), jnp.float32) if p[-1].key == "b" else x, ad
  )
  merged = jax.jit(lambda p, a: lora.materialize(dict(p, **{lora.LORA_KEY: a}), CFG))(params, ad)  # export's merge
  fly = jax.jit(lambda p, a: lora.apply_lora(p, a, CFG, rng=jax.random.PRNGKey(0), deterministic=True))(params, ad)
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(fly)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # PEFT's activation form x W + s (x A) B, computed independently, per stacked layer
  x = jnp.asarray(g.standard_normal((3, D)), jnp.float32)
  blk = ad["backbone"]["layers"]["layer_1"]["mlp"]["up_proj"]
  w = params["backbone"]["layers"]["layer_1"]["mlp"]["up_proj"]["kernel"]
  wm = merged["backbone"]["layers"]["layer_1"]["mlp"]["up_proj"]["kernel"]
  for r in range(R):
    ref = x @ w[r] + 2.0 * (x @ blk["a"][r]) @ blk["b"][r]
    np.testing.assert_allclose(np.asarray(x @ wm[r]), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_rank_dropout_masks_whole_rank_components():
  params = {"q_proj": {"kernel": jnp.zeros((2, 2))}}
  ad = {"q_proj": {"a": jnp.array([[1.0, 10.0], [0.0, 0.0]]), "b": jnp.array([[1.0, 0.0], [0.0, 1.0]])}}
  cfg = LoraConfig(rank=2, alpha=2.0, dropout=0.5, targets=("q_proj",))
  seen = set()
  drop = jax.jit(lambda k: lora.apply_lora(params, ad, cfg, rng=k, deterministic=False)["q_proj"]["kernel"])
  for i in range(40):
    d = np.asarray(drop(jax.random.PRNGKey(i)))
    seen.add((float(d[0, 0]), float(d[0, 1])))
  # scale 1, keep-prob 0.5 -> kept components doubled: each of rank 0 (1.0) and rank 1 (10.0) is 0 or 2x
  assert seen <= {(0.0, 0.0), (2.0, 0.0), (0.0, 20.0), (2.0, 20.0)} and len(seen) == 4
  det = lora.apply_lora(params, ad, cfg, deterministic=True)["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(det), np.array([[1.0, 10.0], [0.0, 0.0]]))
  with pytest.raises(ValueError, match="rng"):
    lora.apply_lora(params, ad, cfg, deterministic=False)


def test_logical_axes_follow_kernel():
  assert lora.lora_axes_for_kernel(("layers", "embed", "heads")) == {
    "a": ("layers", "embed", None),
    "b": ("layers", None, "heads"),
  }
  got = lora.lora_axes_for_kernel(P(None, "fsdp", "tensor"))
  assert got == {"a": P(None, "fsdp", None), "b": P(None, None, "tensor")}
  params = toy_params()
  ad = _init(params, jax.random.PRNGKey(1))
  axes = jax.tree_util.tree_map(lambda x: ("layers", "embed", "mlp")[-x.ndim :] if x.ndim else (), params)
  la = lora.lora_logical_axes(axes, ad)
  assert la["backbone"]["layers"]["layer_0"]["mlp"]["up_proj"] == {
    "a": ("layers", "embed", None),
    "b": ("layers", None, "mlp"),
  }
  assert la["mtp"]["layer"]["mlp"]["up_proj"] == {"a": ("embed", None), "b": (None, "mlp")}


def test_materialize_and_grad_flow():
  params = toy_params()
  ad = _init(params, jax.random.PRNGKey(1))
  full = dict(params, lora=ad)
  base, got = lora.split_params(full)
  assert got is ad and "lora" not in base

  def f(a):
    p = lora.materialize(dict(params, lora=a), CFG)
    return jnp.sum(p["mtp"]["layer"]["mlp"]["up_proj"]["kernel"] ** 2)

  g = jax.jit(jax.grad(f))(ad)["mtp"]["layer"]["mlp"]["up_proj"]
  # dL/dB = s A^T dL/dW != 0 while dL/dA = s dL/dW B^T = 0 at B = 0 (as in PEFT)
  assert float(jnp.abs(g["b"]).sum()) > 0 and float(jnp.abs(g["a"]).sum()) == 0.0


def test_lora_shardings_from_kernel_shardings():
  from jax.sharding import Mesh, NamedSharding

  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
  params = toy_params()
  ad = _init(params, jax.random.PRNGKey(1))
  shard = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(None, "fsdp") if x.ndim == 3 else P()), params)
  ls = lora.lora_shardings(shard, ad)
  up = ls["backbone"]["layers"]["layer_0"]["mlp"]["up_proj"]
  assert up["a"].spec == P(None, "fsdp", None) and up["b"].spec == P(None, None, None)
  placed = jax.device_put(ad["backbone"]["layers"]["layer_0"]["mlp"]["up_proj"]["a"], up["a"])
  assert placed.sharding.shard_shape(placed.shape) == (R, D // 2, 4)
