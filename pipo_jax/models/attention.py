"""Gated softmax attention of Qwen3.5 full-attention layers.

Axis vocabulary: B batch, T new tokens, S key slots (T without a cache, the cache length with one),
D model dim, H query heads, G kv heads, R = H/G query heads per kv head, K head dim, P rotary dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pipo_jax.config import ModelConfig
from pipo_jax.models.cache_slots import read_state, write_state
from pipo_jax.models.flash import blocked_attention
from pipo_jax.models.norms import RMSNorm, dense

# Masked scores use the most negative finite fp32 instead of -inf: a query row whose keys are all masked
# (a left-pad query) then gets a uniform softmax instead of NaN; its output is never used.
_MASK_VALUE = float(np.finfo(np.float32).min)

# A cached call with at most this many queries is a decode step (ar and pipo 1, mtp and mtp_spec 2 per row);
# on CPU it reads the cache through _cached_few_query_attention.
DECODE_QUERIES_MAX = 4


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """inv_freq_P2 [P/2] in float32, built the way HF builds it (so rounding matches).

  HF computes theta ** (arange/P) with torch's float32 pow (glibc powf: the correctly rounded result), then
  1 / that in float32. A single-ulp difference in inv_freq moves the angle at position 262143 by ~0.016 rad,
  so we reproduce it exactly: the power in float64 rounded once to float32 (numpy's own float32 pow is off by
  an ulp for some exponents), then the reciprocal in float32.
  """
  p = config.rotary_dim
  exponent = np.arange(0, p, 2, dtype=np.int64).astype(np.float32) / np.float32(p)
  power = (np.float64(config.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)
  return (np.float32(1.0) / power).astype(np.float32)


def rope_cos_sin(positions_BT: jax.Array, config: ModelConfig, dtype) -> tuple[jax.Array, jax.Array]:
  """cos_BTP, sin_BTP for 1-D NeoX RoPE; for text-only input Qwen3.5's interleaved mRoPE is bit-identical."""
  angle_BTp = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
  angle_BTP = jnp.concatenate([angle_BTp, angle_BTp], axis=-1)
  # HF casts cos/sin to the activation dtype before rotating.
  return jnp.cos(angle_BTP).astype(dtype), jnp.sin(angle_BTP).astype(dtype)


def apply_partial_rope(x_BTNK: jax.Array, cos_BTP: jax.Array, sin_BTP: jax.Array) -> jax.Array:
  """Rotate-half RoPE on the first P channels of each head (pairs (i, i+P/2)); the rest pass through."""
  p = cos_BTP.shape[-1]
  rot, rest = x_BTNK[..., :p], x_BTNK[..., p:]
  half = p // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  rot = rot * cos_BTP[:, :, None, :] + rotated * sin_BTP[:, :, None, :]
  return jnp.concatenate([rot, rest], axis=-1)


def _visible_BTS(query_slot_T: jax.Array, key_valid_BS: jax.Array) -> jax.Array:
  """Query t sees slot s iff s <= query_slot_T[t] and key_valid_BS[b, s]."""
  S = key_valid_BS.shape[1]
  return (jnp.arange(S)[None, None, :] <= query_slot_T[None, :, None]) & key_valid_BS[:, None, :]


# The two products of dense attention with hand-written gradients. Autodiff's gradient products contract the
# score-sized operand over its (t, r) rows, which XLA:CPU's dot canonicalisation serves with a transposed copy of
# the whole [T, S] matrix (dK from dS, dV from P: two per layer and training step). Here the small operand (q or
# dO, [T, K] per head) is the one contracted over its rows, so no score-sized copy is made; a TPU picks layouts
# freely either way. Dimension numbers: ((lhs contracting, rhs contracting), (lhs batch, rhs batch)).


@jax.custom_vjp
def _scores_BGTRS(q_BTGRK: jax.Array, k_BSGK: jax.Array) -> jax.Array:
  """q k^T per (b, g) -> [B, G, T, R, S]: q's free axes in q's order (t, r), the order the dot emits."""
  return jax.lax.dot_general(q_BTGRK, k_BSGK, (((4,), (3,)), ((0, 2), (0, 2))))


def _scores_fwd(q_BTGRK, k_BSGK):
  return _scores_BGTRS(q_BTGRK, k_BSGK), (q_BTGRK, k_BSGK)


def _scores_bwd(res, dscores_BGTRS):
  q_BTGRK, k_BSGK = res
  dq_BGTRK = jax.lax.dot_general(dscores_BGTRS, k_BSGK, (((4,), (1,)), ((0, 1), (0, 2))))
  dk_BGKS = jax.lax.dot_general(q_BTGRK, dscores_BGTRS, (((1, 3), (2, 3)), ((0, 2), (0, 1))))
  return jnp.transpose(dq_BGTRK, (0, 2, 1, 3, 4)), jnp.transpose(dk_BGKS, (0, 3, 1, 2))


_scores_BGTRS.defvjp(_scores_fwd, _scores_bwd)


@jax.custom_vjp
def _mix_BTGRK(probs_BGTRS: jax.Array, v_BSGK: jax.Array) -> jax.Array:
  """probs v per (b, g) -> [B, T, G, R, K]."""
  o_BGTRK = jax.lax.dot_general(probs_BGTRS, v_BSGK, (((4,), (1,)), ((0, 1), (0, 2))))
  return jnp.transpose(o_BGTRK, (0, 2, 1, 3, 4))


def _mix_fwd(probs_BGTRS, v_BSGK):
  return _mix_BTGRK(probs_BGTRS, v_BSGK), (probs_BGTRS, v_BSGK)


def _mix_bwd(res, do_BTGRK):
  probs_BGTRS, v_BSGK = res
  do_BGTRK = jnp.transpose(do_BTGRK, (0, 2, 1, 3, 4))
  dprobs_BGTRS = jax.lax.dot_general(do_BGTRK, v_BSGK, (((4,), (3,)), ((0, 1), (0, 2))))
  dv_BGKS = jax.lax.dot_general(do_BGTRK, probs_BGTRS, (((2, 3), (2, 3)), ((0, 1), (0, 1))))
  return dprobs_BGTRS, jnp.transpose(dv_BGKS, (0, 3, 1, 2))


_mix_BTGRK.defvjp(_mix_fwd, _mix_bwd)


def _dense_attention(
  q_BTGRK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, query_slot_T: jax.Array, key_valid_BS: jax.Array
) -> jax.Array:
  """Reference path: full masked [B, G, T, R, S] fp32 scores. -> o_BTGRK [B, T, G, R, K] in q's dtype.

  Query t attends to slot s iff s <= query_slot_T[t] and key_valid_BS[b, s]. On experiments/sft_step_time.py's
  config M the score layout and the two products above took XLA:CPU's attention layout copies from 126 to
  32 MiB per training step (three transposed copies of each layer's score matrix to none).
  """
  K = q_BTGRK.shape[-1]
  scores_BGTRS = _scores_BGTRS(q_BTGRK, k_BSGK).astype(jnp.float32) * np.float32(K**-0.5)
  visible_BGTRS = _visible_BTS(query_slot_T, key_valid_BS)[:, None, :, None, :]
  probs_BGTRS = jax.nn.softmax(jnp.where(visible_BGTRS, scores_BGTRS, _MASK_VALUE), axis=-1)
  return _mix_BTGRK(probs_BGTRS.astype(q_BTGRK.dtype), v_BSGK)  # softmax in fp32


def _cached_few_query_attention(q_BTGRK, k_BGKS, v_BGSK, query_slot_T, key_valid_BS) -> jax.Array:
  """_dense_attention for a decode step, reading the cache in its own layout: the scores and the outputs as
  elementwise products reduced over K and over S, in fp32. XLA:CPU fuses each product into its reduction and
  reads the cache once, in place; the einsums made it copy every full-attention layer's K and V cache into a
  transposed layout at every step, more than half of the demo teacher's batch-32 decode step
  (docs/design.md#inference-engine). -> o_BTGRK in q's dtype."""
  K = q_BTGRK.shape[-1]
  q_BGRTK1 = jnp.transpose(q_BTGRK, (0, 2, 3, 1, 4)).astype(jnp.float32)[..., None]
  scores_BGRTS = jnp.sum(q_BGRTK1 * k_BGKS[:, :, None, None].astype(jnp.float32), axis=-2) * np.float32(K**-0.5)
  visible_BGRTS = _visible_BTS(query_slot_T, key_valid_BS)[:, None, None]
  probs_BGRTS = jax.nn.softmax(jnp.where(visible_BGRTS, scores_BGRTS, _MASK_VALUE), axis=-1)
  o_BGRTK = jnp.sum(probs_BGRTS[..., None] * v_BGSK[:, :, None, None].astype(jnp.float32), axis=-2)
  return jnp.transpose(o_BGRTK, (0, 3, 1, 2, 4)).astype(q_BTGRK.dtype)


def _attend(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block: int) -> jax.Array:
  """Blocked attention for long calls (training, long prefill: never materialise [T, S], memory O(block^2) per
  head, fwd + bwd); dense for short ones (one small [T, S] tile is cheaper than a scan). K and V run in q's dtype,
  the compute dtype (a cache may be stored wider)."""
  dtype = q_BTGRK.dtype
  k_BSGK, v_BSGK = k_BSGK.astype(dtype), v_BSGK.astype(dtype)
  if block and q_BTGRK.shape[1] > block:
    return blocked_attention(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block, block)
  return _dense_attention(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS)


def _cached_attention(q_BTGRK, k_BGKS, v_BGSK, query_slot_T, key_valid_BS, block: int) -> jax.Array:
  """_attend on the cache layout (the einsums: what a TPU's matrix unit runs, at every call length)."""
  k_BSGK, v_BSGK = jnp.transpose(k_BGKS, (0, 3, 1, 2)), jnp.swapaxes(v_BGSK, 1, 2)
  return _attend(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block)


class GatedAttention(nn.Module):
  """Qwen3.5 full attention: QK-norm, partial RoPE, GQA causal softmax, sigmoid output gate.

  Params: q_proj [D, H*2K] (per-head interleaved [q_h | gate_h]), k_proj/v_proj [D, G*K], o_proj [H*K, D],
  q_norm/k_norm scale [K].
  """

  config: ModelConfig

  @nn.compact
  def __call__(
    self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array | None, cache: dict | None
  ) -> tuple[jax.Array, dict | None]:
    """x_BTD (already input-normed) -> (out_BTD, new cache).

    cache (optional): {"k_BGKS", "v_BGSK", "index" (int32 scalar: first slot to write), "valid_BS"
    (key validity *before* this call)}. The T new keys are written at slots index..index+T-1 and the queries
    attend causally by slot: query t sees slots s <= index + t that are valid.
    """
    cfg = self.config
    B, T, _ = x_BTD.shape
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    qg_BTHK2 = dense(H * 2 * K, ("embed", "heads"), cfg, "q_proj")(x_BTD).reshape(B, T, H, 2 * K)
    q_BTHK, gate_BTHK = qg_BTHK2[..., :K], qg_BTHK2[..., K:]
    k_BTGK = dense(G * K, ("embed", "kv_heads"), cfg, "k_proj")(x_BTD).reshape(B, T, G, K)
    v_BTGK = dense(G * K, ("embed", "kv_heads"), cfg, "v_proj")(x_BTD).reshape(B, T, G, K)

    q_BTHK = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, "head_dim", name="q_norm")(q_BTHK)
    k_BTGK = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, "head_dim", name="k_norm")(k_BTGK)
    cos_BTP, sin_BTP = rope_cos_sin(positions_BT, cfg, q_BTHK.dtype)
    q_BTHK = apply_partial_rope(q_BTHK, cos_BTP, sin_BTP)
    k_BTGK = apply_partial_rope(k_BTGK, cos_BTP, sin_BTP)
    q_BTHK = nn.with_logical_constraint(q_BTHK, ("batch", "length", "heads", "head_dim"))
    k_BTGK = nn.with_logical_constraint(k_BTGK, ("batch", "length", "kv_heads", "head_dim"))

    if valid_BT is None:
      valid_BT = jnp.ones((B, T), bool)
    # GQA: query head h = g*R + r reads kv head g = h // R (HF repeat_kv == repeat_interleave).
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    if cache is None:
      o_BTGRK, new_cache = _attend(q_BTGRK, k_BTGK, v_BTGK, jnp.arange(T), valid_BT, cfg.attention_block), None
    else:
      index = cache["index"]
      key_valid_BS = jax.lax.dynamic_update_slice(cache["valid_BS"], valid_BT, (0, index))
      query_slot_T = index + jnp.arange(T)
      # The cache is laid out as a decode step reads it: K as [B, G, K, S], V as [B, G, S, K] (the einsums'
      # contraction layouts, and the layouts whose products _cached_few_query_attention reduces in place).
      new_cache = dict(
        cache,
        k_BGKS=write_state(cache, "k_BGKS", jnp.transpose(k_BTGK, (0, 2, 3, 1)), (0, 0, 0, index)),
        v_BGSK=write_state(cache, "v_BGSK", jnp.swapaxes(v_BTGK, 1, 2), (0, 0, index, 0)),
        valid_BS=key_valid_BS,
        index=index + T,
      )
      k_BGKS, v_BGSK = read_state(new_cache, "k_BGKS"), read_state(new_cache, "v_BGSK")
      attention = functools.partial(_cached_attention, block=cfg.attention_block)
      if T <= DECODE_QUERIES_MAX:
        # Picked when lowering for a platform (an AOT TPU compile on a CPU host gets the einsums).
        attention = functools.partial(jax.lax.platform_dependent, cpu=_cached_few_query_attention, default=attention)
      o_BTGRK = attention(q_BTGRK, k_BGKS, v_BGSK, query_slot_T, key_valid_BS)
    o_BTF = o_BTGRK.reshape(B, T, H * K)
    # The gate multiplies the concatenated head outputs, before o_proj (as HF).
    o_BTF = o_BTF * jax.nn.sigmoid(gate_BTHK.reshape(B, T, H * K))
    o_BTF = nn.with_logical_constraint(o_BTF, ("batch", "length", "heads"))
    out_BTD = dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj")(o_BTF)
    return out_BTD, new_cache
