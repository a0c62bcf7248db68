"""Blocked (flash-style) attention == the dense path, forward and gradient; both == a brute-force softmax (full
causal with a left pad, and a cached multi-query step); the dense path's gradient == autodiff of the plain
softmax; O(block) compiled memory; a decode step's attention on the cache layout (both platforms' forms) == a
brute-force softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.models import attention
from pipo_jax.models.flash import blocked_attention

TOL = 1e-5


def _inputs(rng, B, T, S, G, R, K):
  q = jnp.asarray(rng.randn(B, T, G, R, K), jnp.float32)
  k = jnp.asarray(rng.randn(B, S, G, K), jnp.float32)
  v = jnp.asarray(rng.randn(B, S, G, K), jnp.float32)
  return q, k, v


def _check(q, k, v, query_slot_T, key_valid_BS, block_q, block_k):
  """Forward and d(loss)/d(q, k, v) on the query rows that see at least one valid key (the only rows the model
  uses: a left-pad query's output is dense-mean vs blocked-zero, both never read)."""
  S = k.shape[1]
  seen_BT = ((jnp.arange(S)[None, None, :] <= query_slot_T[None, :, None]) & key_valid_BS[:, None, :]).any(-1)
  w = jnp.asarray(np.random.RandomState(7).randn(*q.shape), jnp.float32) * seen_BT[:, :, None, None, None]

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  dense = lambda q, k, v: attention._dense_attention(q, k, v, query_slot_T, key_valid_BS)
  blocked = lambda q, k, v: blocked_attention(q, k, v, query_slot_T, key_valid_BS, block_q, block_k)
  o_d, o_b = jax.jit(dense)(q, k, v), jax.jit(blocked)(q, k, v)
  m = np.asarray(seen_BT)[:, :, None, None, None]
  err = float(np.abs(np.where(m, np.asarray(o_d) - np.asarray(o_b), 0)).max())
  assert np.isfinite(np.asarray(o_b)).all()
  g_d = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2)))(q, k, v)
  g_b = jax.jit(jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2)))(q, k, v)
  gerr = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(g_d, g_b))
  print(f"  forward max|blocked - dense| = {err:.2e}, grad max = {gerr:.2e}")
  assert err <= TOL and gerr <= TOL, (err, gerr)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (8, 32)])
def test_blocked_equals_dense_causal_gqa_ragged(block_q, block_k):
  """T = 70 (not a multiple of any block), GQA with 3 query heads per kv head, no padding."""
  rng = np.random.RandomState(0)
  B, T, G, R, K = 2, 70, 2, 3, 8
  q, k, v = _inputs(rng, B, T, T, G, R, K)
  _check(q, k, v, jnp.arange(T), jnp.ones((B, T), bool), block_q, block_k)


def test_blocked_equals_dense_left_padding():
  """Row 0 left-padded by 23 (its pad queries see no valid key), row 1 by 0."""
  rng = np.random.RandomState(1)
  B, T, G, R, K = 2, 53, 1, 4, 8
  q, k, v = _inputs(rng, B, T, T, G, R, K)
  valid = np.ones((B, T), bool)
  valid[0, :23] = False
  _check(q, k, v, jnp.arange(T), jnp.asarray(valid), 16, 16)


def test_blocked_equals_dense_cached_multi_token_step():
  """A 37-token step written at cache slots 20..56 of a 96-slot cache (slots past 57 empty) with left-padded
  prefill slots: queries at slots index..index+T-1 against all S slots."""
  rng = np.random.RandomState(2)
  B, T, S, G, R, K, index = 2, 37, 96, 2, 2, 8, 20
  q, k, v = _inputs(rng, B, T, S, G, R, K)
  valid = np.zeros((B, S), bool)
  valid[:, : index + T] = True
  valid[1, :5] = False  # left pad of row 1's prompt
  _check(q, k, v, index + jnp.arange(T), jnp.asarray(valid), 16, 16)


def _temp_bytes(fn, *args):
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def test_compiled_temp_memory_is_o_block():
  """Forward + backward at T = 4096 with tiny heads, inside a 2-step scan like the layer stack (its slots and
  key validity are loop-invariant: JAX's scan partial eval would hoist every mask tile out of the loop, O(T^2),
  without flash.py's optimisation barrier). Dense keeps [T, T] fp32 scores / probabilities per step; blocked
  (256) keeps O(T) residuals and O(256^2) tiles."""
  B, T, G, R, K = 1, 4096, 1, 2, 8
  q = jax.ShapeDtypeStruct((B, T, G, R, K), jnp.float32)
  kv = jax.ShapeDtypeStruct((B, T, G, K), jnp.float32)
  slot, valid = jnp.arange(T), jnp.ones((B, T), bool)

  def grad_of(attn):
    def loss(q, k, v):
      def layer(q, _):
        return attn(q, k, v), None

      return jnp.sum(jax.lax.scan(layer, q, None, length=2)[0] ** 2)

    return jax.grad(loss, argnums=(0, 1, 2))

  dense = _temp_bytes(grad_of(lambda q, k, v: attention._dense_attention(q, k, v, slot, valid)), q, kv, kv)
  blocked = _temp_bytes(grad_of(lambda q, k, v: blocked_attention(q, k, v, slot, valid, 256, 256)), q, kv, kv)
  print(
    f"\nT=4096 fwd+bwd (2 scanned layers) temp bytes: dense {dense:,} ({dense / 2**20:.1f} MiB), "
    f"blocked(256) {blocked:,} ({blocked / 2**20:.2f} MiB), ratio {dense / blocked:.0f}x"
  )
  # Dense: at least R x T x T fp32 probabilities (128 MiB); blocked must be at least 20x smaller.
  assert dense >= R * T * T * 4
  assert blocked * 20 <= dense


def test_gated_attention_uses_blocked_path_and_matches_dense():
  """The module: attention_block=16 (blocked for T=40 > 16) vs 0 (dense), same params, with a left pad."""
  import dataclasses

  from pipo_jax.config import ModelConfig, resolve_model_config

  cfg = resolve_model_config(ModelConfig(preset="tiny"))
  B, T = 2, 40
  x = jnp.asarray(np.random.RandomState(3).randn(B, T, cfg.hidden_size), jnp.float32)
  valid = np.ones((B, T), bool)
  valid[1, :6] = False
  pos = jnp.maximum(jnp.cumsum(jnp.asarray(valid), -1) - 1, 0)
  dense_mod = attention.GatedAttention(dataclasses.replace(cfg, attention_block=0))
  blocked_mod = attention.GatedAttention(dataclasses.replace(cfg, attention_block=16))
  params = dense_mod.init(jax.random.PRNGKey(0), x, pos, jnp.asarray(valid), None)
  jaxpr = str(jax.make_jaxpr(lambda p: blocked_mod.apply(p, x, pos, jnp.asarray(valid), None))(params))
  assert "custom_vjp" in jaxpr
  o_d, _ = dense_mod.apply(params, x, pos, jnp.asarray(valid), None)
  o_b, _ = blocked_mod.apply(params, x, pos, jnp.asarray(valid), None)
  err = float(np.abs(np.where(valid[..., None], np.asarray(o_d - o_b), 0)).max())
  print(f"GatedAttention blocked vs dense max|diff| = {err:.2e}")
  assert err <= TOL


def _brute_force_attention(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS):
  """Per (row, query, head): softmax over the visible slots, in float64 numpy (zero where a query sees no slot)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BTGRK, k_BSGK, v_BSGK))
  B, T, G, R, K = q.shape
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      seen = [s for s in range(k.shape[1]) if s <= int(query_slot_T[t]) and bool(key_valid_BS[b, s])]
      if not seen:
        continue
      for g in range(G):
        for r in range(R):
          scores = np.array([q[b, t, g, r] @ k[b, s, g] for s in seen]) / np.sqrt(K)
          p = np.exp(scores - scores.max())
          out[b, t, g, r] = (p / p.sum()) @ v[b, seen, g]
  return out


@pytest.mark.parametrize(
  "T,S,index,pad", [(13, 13, 0, 4), (5, 17, 7, 2)], ids=["full_causal_left_pad", "cached_5_queries"]
)
def test_dense_and_blocked_equal_brute_force(T, S, index, pad):
  """The training / prefill forms against the float64 brute force on the query rows that see a key: row 0
  left-padded by `pad` slots, row 1 not; queries at slots index..index+T-1 (the cached form when S > T)."""
  rng = np.random.RandomState(4)
  B, G, R, K = 2, 2, 3, 8
  q, k, v = _inputs(rng, B, T, S, G, R, K)
  valid = np.zeros((B, S), bool)
  valid[:, : index + T] = True
  valid[0, :pad] = False
  slots = index + jnp.arange(T)
  ref = _brute_force_attention(q, k, v, np.asarray(slots), valid)
  seen_BT = np.array([[any(valid[b, : index + t + 1]) for t in range(T)] for b in range(B)])
  assert (~seen_BT).sum() == max(pad - index, 0)  # row 0's pad queries of the full causal case see nothing
  for name, fn in (
    ("dense", attention._dense_attention),
    ("blocked", lambda *a: blocked_attention(*a, 4, 8)),
  ):
    got = np.asarray(jax.jit(fn)(q, k, v, slots, jnp.asarray(valid)))
    err = np.abs(got - ref)[seen_BT].max()
    print(f"  {name}: max|attention - float64 brute force| = {err:.2e}")
    assert err <= TOL, (name, err)


def test_dense_gradient_equals_autodiff_of_the_plain_softmax():
  """_dense_attention's hand-written products (custom VJPs ordering the gradient dots) against JAX autodiff of the
  textbook masked softmax(q k^T / sqrt(K)) v, on a GQA causal call with a left pad."""
  rng = np.random.RandomState(5)
  B, T, G, R, K = 2, 19, 2, 3, 8
  q, k, v = _inputs(rng, B, T, T, G, R, K)
  valid = np.ones((B, T), bool)
  valid[1, :4] = False
  slots, w = jnp.arange(T), jnp.asarray(rng.randn(B, T, G, R, K), jnp.float32)
  visible_BTS = (np.arange(T)[None, None, :] <= np.arange(T)[None, :, None]) & valid[:, None, :]
  w = w * jnp.asarray(visible_BTS.any(-1))[:, :, None, None, None]  # pad queries' outputs are never read

  def plain(q, k, v):
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, k) / np.sqrt(K)
    probs = jax.nn.softmax(jnp.where(jnp.asarray(visible_BTS)[:, None, None], scores, -1e30), axis=-1)
    return jnp.einsum("bgrts,bsgk->btgrk", probs, v)

  def grads(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)

  got = grads(lambda q, k, v: attention._dense_attention(q, k, v, slots, jnp.asarray(valid)))
  for name, a, b in zip("qkv", got, grads(plain)):
    err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    print(f"  d{name}: max|hand-written - autodiff| = {err:.2e}")
    assert err <= TOL, (name, err)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_decode_step_attention_on_the_cache_layout(T):
  """A decode step's attention read from the cache layout (K [B, G, K, S], V [B, G, S, K]): CPU's elementwise
  products reduced in place and the einsums a TPU runs, against a brute-force softmax; slots past the step and
  invalid slots (a left pad, a rolled-back draft) hidden."""
  rng = np.random.RandomState(3)
  B, S, G, R, K = 3, 11, 2, 3, 8
  q, k, v = _inputs(rng, B, T, S, G, R, K)
  valid = np.ones((B, S), bool)
  valid[0, :3] = False  # left pad
  valid[1, 5] = False  # a rejected draft's slot
  index = 6  # the step's queries sit at slots 6..6+T-1; later slots hold garbage that must stay hidden
  slots = jnp.arange(T) + index
  ref = _brute_force_attention(q, k, v, np.asarray(slots), valid)
  k_BGKS, v_BGSK = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)
  for fn in (attention._cached_few_query_attention, lambda *a: attention._cached_attention(*a, block=0)):
    got = jax.jit(fn)(q, k_BGKS, v_BGSK, slots, jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)
