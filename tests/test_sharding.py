"""Sharded Qwen35 on 8 fake CPU devices (data=2, fsdp=2, tensor=2) against the unsharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pipo_jax import sharding as sh
from pipo_jax.config import MeshConfig, ModelConfig, resolve_model_config
from pipo_jax.models import qwen3_5


@pytest.fixture(scope="module")
def setup():
  # HF's init scale (0.02). Larger random weights make this tiny net chaotic: fp32 reduction-order noise from
  # the different summation order of sharded matmuls then grows with depth (8e-5 at 0.2), which says nothing
  # about sharding correctness. The post-norm hidden state (O(1)) is compared as well as the logits.
  cfg = resolve_model_config(ModelConfig(preset="tiny"))
  mesh = sh.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  model = qwen3_5.Qwen35(cfg)
  x = jnp.zeros((1, 1, cfg.hidden_size))
  pos = jnp.zeros((1, 1), jnp.int32)
  params, shardings = sh.create_sharded_params(
    lambda k: model.init(k, x, pos)["params"], jax.random.PRNGKey(0), mesh=mesh
  )
  return cfg, mesh, model, params, shardings


def test_params_are_sharded_per_rules(setup):
  _, _, _, params, _ = setup
  lay = params["layers"]
  expect = {
    "embed_tokens/embedding": (params["embed_tokens"]["embedding"], P("tensor", "fsdp")),
    "lm_head/kernel": (params["lm_head"]["kernel"], P("fsdp", "tensor")),
    "norm/scale": (params["norm"]["scale"], P("fsdp")),
    "mlp/gate_proj": (lay["layer_0"]["mlp"]["gate_proj"]["kernel"], P(None, "fsdp", "tensor")),
    "mlp/down_proj": (lay["layer_0"]["mlp"]["down_proj"]["kernel"], P(None, "tensor", "fsdp")),
    "q_proj": (lay["layer_3"]["self_attn"]["q_proj"]["kernel"], P(None, "fsdp", "tensor")),
    "k_norm": (lay["layer_3"]["self_attn"]["k_norm"]["scale"], P(None, None)),
    "in_proj_qkv": (lay["layer_1"]["linear_attn"]["in_proj_qkv"]["kernel"], P(None, "fsdp", "tensor")),
    "conv1d": (lay["layer_1"]["linear_attn"]["conv1d"]["kernel"], P(None, None, "tensor")),
    "A_log": (lay["layer_2"]["linear_attn"]["A_log"], P(None, "tensor")),
  }
  for name, (arr, spec) in expect.items():
    assert arr.sharding.spec == spec, (name, arr.sharding.spec)
  # Really split: a gate_proj shard holds 1/(fsdp*tensor) of the kernel.
  g = lay["layer_0"]["mlp"]["gate_proj"]["kernel"]
  assert g.addressable_shards[0].data.size * 4 == g.size


def test_sharded_forward_equals_unsharded(setup):
  cfg, mesh, model, params, _ = setup

  def fwd(p, ids):
    v = {"params": p}
    h, _ = model.apply(
      v, model.apply(v, ids, method=model.embed), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    )
    return h, model.apply(v, h, method=model.logits)

  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 70)).astype(np.int32)
  with sh.use_rules(mesh):
    got = jax.jit(fwd)(params, sh.shard_batch(ids, mesh))
  assert got[1].sharding.spec[0] == ("data", "fsdp")
  ref = jax.jit(fwd)(jax.device_get(params), ids)
  for name, a, b in zip(("hidden", "logits"), got, ref):
    err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    print(f"sharded vs unsharded {name}: max|diff| = {err:.3g} (scale {float(np.abs(b).max()):.3g})")
    assert err <= 1e-5


def test_non_dividing_axis_is_a_clear_error(setup):
  cfg, _, model, _, _ = setup
  mesh = sh.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, cfg.hidden_size)), jnp.zeros((1, 1), jnp.int32))[
      "params"
    ]
  )
  with pytest.raises(ValueError) as e:
    sh.param_shardings(abstract, mesh)
  msg = str(e.value)
  # Hv = 4 value heads cannot be split 8 ways.
  assert "layers/layer_0/linear_attn/in_proj_b/kernel: dimension 2 ('gdn_heads', size 4)" in msg
  assert "mesh axis 'tensor' (size 8)" in msg


def test_make_mesh_fills_and_validates():
  assert dict(sh.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 12 devices"):
    sh.make_mesh(MeshConfig(data=3, fsdp=2, tensor=2))


def test_hf_load_onto_mesh(setup, tmp_path):
  """Import straight onto the param shardings: the exported tensors of the sharded params load back equal
  and already sharded."""
  from safetensors.numpy import save_file

  from pipo_jax.io import hf

  cfg, mesh, _, params, _ = setup
  tensors = hf.backbone_to_hf_tensors(params, cfg)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(__import__("json").dumps(cfg.to_hf_dict()))
  got = hf.load_qwen3_5(str(tmp_path), shardings=sh.param_shardings(qwen3_5.boxed_backbone_params(cfg), mesh))
  for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(params)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_training_gradients_equal_data_parallel(tmp_path):
  """The tiny LoRA SFT step's gradients (the trainer's own state, loss and accumulation) on data=2, fsdp=2,
  tensor=2 equal data=8's up to fp32 reduction order. A Dense written as a 2-D matmul over flattened token axes
  once made the SPMD partitioner return a compressor kernel gradient 57 % off on the first mesh (same loss)."""
  import dataclasses

  from pipo_jax import optim
  from pipo_jax import trainer as trainer_lib
  from pipo_jax.config import Config

  R = dataclasses.replace
  c0 = Config()
  base = R(
    c0,
    mode="sft",
    workdir=str(tmp_path),
    model=R(c0.model, preset="tiny"),
    data=R(c0.data, max_length=64, batch_size=8, max_pad_ratio=0.25),
    lora=R(c0.lora, rank=8, alpha=16.0),
    optim=R(c0.optim, grad_accum_steps=2),
    loss=R(c0.loss, logits_chunk=64),
    train=R(c0.train, num_steps=4),
  )
  grads = {}
  for name, mesh in {"data": MeshConfig(data=8), "data_fsdp_tensor": MeshConfig(data=2, fsdp=2, tensor=2)}.items():
    cfg = R(base, mesh=mesh)
    tr = trainer_lib.Trainer(cfg)
    data = tr.data_pipeline()
    state = tr.build_state()
    loss_fn = tr.loss_fn()
    with sh.use_rules(tr.mesh):
      batch, _ = tr.next_batch(data, state, 0)
      g = jax.jit(
        lambda st, b: optim.accumulate_gradients(loss_fn, st.trainable, st.frozen, b, st.rng, 2)[0]  # noqa: B023
      )(state, batch)
    grads[name] = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(g)}
  ref, got = grads["data"], grads["data_fsdp_tensor"]
  assert ref.keys() == got.keys() and any("compressor" in k for k in ref)
  for k in ref:
    scale = float(np.abs(ref[k]).max())
    assert float(np.abs(got[k] - ref[k]).max()) <= 1e-5 * max(scale, 1e-6), k


def test_sharded_lm_head_loss_keeps_rows_on_their_shard():
  """The chunked cross entropy on a batch-sharded mesh (fsdp 4 x tensor 2, head sharded embed -> fsdp, vocab ->
  tensor): loss and gradients equal the unsharded ones, and the compiled program moves no logits block between
  chips. Before the chunks kept their rows, every [C, V / tensor] fp32 logits chunk was all-reduced over fsdp."""
  from pipo_jax import hlo_stats, losses

  mesh = sh.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  B, T, D, V, chunk = 8, 64, 32, 512, 64
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  h_BTD = jax.random.normal(k1, (B, T, D), jnp.float32)
  W_DV = 0.3 * jax.random.normal(k2, (D, V), jnp.float32)
  y_BT = jax.random.randint(k3, (B, T), 0, V).at[:, -5:].set(losses.IGNORE_INDEX)

  def loss_and_grads(h, W, y):
    return jax.value_and_grad(lambda h, W: losses.chunked_cross_entropy(h, W, y, chunk)[0], (0, 1))(h, W)

  want_loss, (want_dh, want_dW) = jax.jit(loss_and_grads)(h_BTD, W_DV, y_BT)
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  args = (put(h_BTD, P(("data", "fsdp"))), put(W_DV, P("fsdp", "tensor")), put(y_BT, P(("data", "fsdp"))))
  with sh.use_rules(mesh):
    compiled = jax.jit(loss_and_grads).lower(*args).compile()
    loss, (dh, dW) = compiled(*args)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dW, want_dW, rtol=1e-4, atol=1e-6)

  stats = hlo_stats.analyze(compiled.as_text())
  logits_chunk_bytes = (chunk // 4) * (V // 2) * 4  # one shard's [C, V / tensor] fp32 block, the smallest it could be
  in_loop = [c for c in stats["largest_collectives"] if c["times"] > 1 and c["bytes"] >= logits_chunk_bytes]
  assert not in_loop, in_loop
  # What does cross chips: the head, gathered along embed once, and dW ([D, V / tensor] fp32) reduced once.
  big = [c for c in stats["largest_collectives"] if c["bytes"] >= logits_chunk_bytes]
  assert [c["times"] for c in big] == [1] * len(big) and len(big) <= 2, big
  assert max(c["bytes"] for c in big) <= D * (V // 2) * 4
