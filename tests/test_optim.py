import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_tree import D, leaf_paths, toy_loss, toy_params

from pipo_jax import optim
from pipo_jax.config import LoraConfig, OptimConfig, TrainConfig
from pipo_jax.models import lora


def test_schedule_hand_computed():
  cfg = OptimConfig(learning_rate=1e-4, warmup_ratio=0.1, min_lr_ratio=0.1)
  s = optim.make_schedule(cfg, total_steps=20)  # W = ceil(2.0) = 2, decay over 18 steps
  got = [float(s(i)) for i in (0, 1, 2, 11, 20, 25)]
  want = [0.0, 0.5e-4, 1e-4, 1e-4 * (0.1 + 0.9 * 0.5), 1e-5, 1e-5]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # ceil: 5% of 30 steps = 1.5 -> 2 warmup steps
  assert optim.warmup_steps(OptimConfig(warmup_ratio=0.05), 30) == 2
  s0 = optim.make_schedule(OptimConfig(learning_rate=2.0, warmup_ratio=0.0, min_lr_ratio=0.0), 4)
  np.testing.assert_allclose(
    [float(s0(i)) for i in range(5)], [2.0, 1.0 + np.cos(np.pi / 4), 1.0, 1.0 - np.cos(np.pi / 4), 0.0], atol=1e-6
  )


def _trained(mask, prefix=""):
  out = set()
  for k, v in mask.items():
    if isinstance(v, dict):
      out |= _trained(v, prefix + k + "/")
    elif v:
      out.add(prefix + k)
  return out


def test_trainable_mask_prefixes_full_and_lora():
  params = toy_params()
  mask = optim.trainable_mask(params, TrainConfig(), lora_active=False)
  got = _trained(mask)
  assert "mtp/fc/kernel" in got and "compressor/mlp_0/bias" in got and "confidence_head/fc2/kernel" in got
  assert "mtp/layer/self_attn/q_norm/scale" in got and "mtp/layer/self_attn/q_proj/kernel" not in got
  assert not any(p.startswith("backbone") for p in got)
  assert len(got) == 4 + 2 + 2 + 4 + 3  # mtp fc+3 norms, 2 layer norms, q/k norm, 4 compressor, 3 conf head

  full = _trained(optim.trainable_mask(params, TrainConfig(full_finetune=True, trainable=()), False))
  assert full == set(leaf_paths(params)) - {"backbone/embed_tokens/embedding", "backbone/lm_head/kernel"}

  with pytest.raises(ValueError, match=r"\['mtp/nope', 'compressor/mlp'\]"):
    optim.trainable_mask(params, TrainConfig(trainable=("mtp/fc", "mtp/nope", "compressor/mlp")), False)

  ad = lora.init_lora(params, LoraConfig(rank=2), jax.random.PRNGKey(0))
  with_lora = dict(params, lora=ad)
  lm = _trained(optim.trainable_mask(with_lora, TrainConfig(trainable=("compressor",)), True))
  assert lm == {p for p in leaf_paths(with_lora) if p.startswith("lora/") or p.startswith("compressor/")}
  with pytest.raises(ValueError, match="contradict"):
    optim.trainable_mask(with_lora, TrainConfig(full_finetune=True), True)
  with pytest.raises(ValueError, match="no 'lora'"):
    optim.trainable_mask(params, TrainConfig(), True)


def test_partition_combine_round_trip():
  params = toy_params()
  mask = optim.trainable_mask(params, TrainConfig(), False)
  tr, fr = optim.partition(params, mask)
  assert set(tr) == {"mtp", "compressor", "confidence_head"} and "compressor" not in fr
  back = optim.combine(tr, fr)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)))


def _loss_fn(params, batch, rng):
  del rng
  loss = toy_loss(params, batch["x"], batch["y"])
  return loss, {"aux": loss * 2}


def _batch(n, seed=0):
  g = np.random.default_rng(seed)
  return {"x": jnp.asarray(g.standard_normal((n, D)), jnp.float32), "y": jnp.asarray(g.standard_normal(n), jnp.float32)}


def test_frozen_params_have_no_state_and_stay_bit_identical():
  params = toy_params()
  mask = optim.trainable_mask(params, TrainConfig(), False)
  cfg = OptimConfig(learning_rate=1e-2, warmup_ratio=0.0)
  state = optim.TrainState.create(params, mask, optim.make_optimizer(cfg, 10), jax.random.PRNGKey(0))
  # every optimizer-state array is a count or shaped like a trainable leaf: mu and nu, nothing else
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
  assert n_state == 2 * optim.count_params(state.trainable)
  assert optim.count_params(state.trainable) < optim.count_params(params) // 3
  step = jax.jit(optim.make_train_step(_loss_fn, 1, optim.make_schedule(cfg, 10)))
  frozen0 = jax.tree_util.tree_map(np.asarray, state.frozen)
  train0 = jax.tree_util.tree_map(np.asarray, state.trainable)
  for i in range(3):
    state, metrics = step(state, _batch(4, i))
  assert int(state.step) == 3
  for a, b in zip(jax.tree_util.tree_leaves(frozen0), jax.tree_util.tree_leaves(state.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  moved = [
    not np.array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(train0), jax.tree_util.tree_leaves(state.trainable))
  ]
  assert all(moved)
  assert set(metrics) == {"loss", "aux", "grad_norm", "learning_rate", "nonfinite"}
  assert not bool(metrics["nonfinite"])  # the non-finite guard (pipo_jax/guards.py) let every step through


def test_gradient_accumulation_equals_big_batch():
  params = toy_params()
  mask = optim.trainable_mask(params, TrainConfig(), False)
  cfg = OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, grad_clip_norm=0.05)  # clipping active too
  tx = optim.make_optimizer(cfg, 10)
  s_big = optim.TrainState.create(params, mask, tx, jax.random.PRNGKey(0))
  s_acc = s_big
  big = _batch(8, 7)
  micro = jax.tree_util.tree_map(lambda x: x.reshape(4, 2, *x.shape[1:]), big)
  step1 = jax.jit(optim.make_train_step(_loss_fn, 1))
  step4 = jax.jit(optim.make_train_step(_loss_fn, 4))
  for _ in range(2):
    s_big, m_big = step1(s_big, big)
    s_acc, m_acc = step4(s_acc, micro)
  assert float(m_big["grad_norm"]) > 0.05  # the clip was binding
  np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_big["grad_norm"]), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(s_big.trainable), jax.tree_util.tree_leaves(s_acc.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_clipping_and_weight_decay_hand_checked():
  cfg = OptimConfig(learning_rate=0.1, warmup_ratio=0.0, weight_decay=0.1, b1=0.9, grad_clip_norm=1.0)
  tx = optim.make_optimizer(cfg, total_steps=1000)
  params = {"m": {"kernel": jnp.ones((1, 2))}, "v": {"scale": jnp.ones((2,))}}
  state = optim.TrainState.create(params, jax.tree_util.tree_map(lambda _: True, params), tx, jax.random.PRNGKey(0))
  grads = {"m": {"kernel": jnp.array([[3.0, 4.0]])}, "v": {"scale": jnp.zeros(2)}}  # global norm 5
  new = state.apply_gradients(grads)
  mu = new.opt_state[1][0].mu
  # clipped to norm 1 -> [0.6, 0.8]; first moment = (1 - b1) * clipped
  np.testing.assert_allclose(np.asarray(mu["m"]["kernel"]), [[0.06, 0.08]], rtol=1e-6)
  # zero gradient: Adam update 0, so only decoupled decay acts, and only on the matrix: 1 - 0.1*0.1
  np.testing.assert_array_equal(np.asarray(new.trainable["v"]["scale"]), [1.0, 1.0])
  zero = jax.tree_util.tree_map(jnp.zeros_like, grads)
  z = state.apply_gradients(zero)
  np.testing.assert_allclose(np.asarray(z.trainable["m"]["kernel"]), [[0.99, 0.99]], rtol=1e-6)
