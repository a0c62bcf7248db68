"""Gated DeltaNet (linear attention) layer of Qwen3.5, as HF transformers computes it.

Axis vocabulary: B batch, T new tokens, D model dim, C conv channels (= 2*Hk*dk + Hv*dv, the q|k|v
channels), W conv kernel width (K_conv), Hk key heads, H value heads (Hv), K key head dim (dk), V value head
dim (dv), N chunks, L chunk length, i/j positions inside a chunk.

Logical axes used here besides the common ones: 'gdn_qkv' (the C conv channels), 'gdn_heads' (Hv, the
per-head gate projections and A_log/dt_bias), 'gdn_value' (Hv*dv, z and the out_proj input), 'conv_width'.

The whole delta-rule kernel runs in fp32 with HIGHEST matmul precision: the recurrent state accumulates
over the whole sequence, so reduced-precision passes would compound (HF keeps it fp32 too).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pipo_jax.config import ModelConfig
from pipo_jax.models.cache_slots import read_state, write_state
from pipo_jax.models.norms import GatedRMSNorm, dense, logical_param
from pipo_jax.models.triangular import unit_lower_solve

_HI = jax.lax.Precision.HIGHEST
# Decode steps of up to this many tokens (a verify pair, an MTP draft pair) run few_token_delta_rule: one read
# of the state for all tokens and one rank-T update. The chunked form's padding, decay matrix and triangular
# solve cost more there, and the token-by-token rule passes over the state six times per token.
FEW_TOKEN_MAX = 4


def _einsum(spec, *ops):
  return jnp.einsum(spec, *ops, precision=_HI)


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum x^2 + eps) over the last axis; eps inside the root, fixed at 1e-6 (as HF)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def torch_softplus(x: jax.Array) -> jax.Array:
  """PyTorch's softplus (threshold 20: identity above), so g matches HF bit for bit in the common range."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def recurrent_gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV):
  """Token-by-token delta rule: decay, delta write, then read. All inputs fp32.

  Returns (o_BTHV, final state_BHKV). The definition the other forms are tested against.
  """

  def step(S_BHKV, inputs):
    q, k, v, g, beta = inputs
    S_BHKV = S_BHKV * jnp.exp(g)[..., None, None]
    u_BHV = beta[..., None] * (v - _einsum("bhkv,bhk->bhv", S_BHKV, k))
    S_BHKV = S_BHKV + k[..., :, None] * u_BHV[..., None, :]
    return S_BHKV, _einsum("bhkv,bhk->bhv", S_BHKV, q)

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH))
  state_BHKV, o_TBHV = jax.lax.scan(step, state_BHKV, xs)
  return jnp.moveaxis(o_TBHV, 0, 1), state_BHKV


def few_token_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV, applied: int | None = None):
  """The delta rule for a few tokens (a decode step) in closed form: one read of the state for all of them and
  one rank-T update, instead of the token-by-token rule's six passes over the state per token (decay written
  out, read for the delta, rank-1 update written, read for the output). All inputs fp32.

  With gam_t = g_1 + ... + g_t (the log decay since the call started) and S_0 the state before it:
    u_t = beta_t (v_t - e^gam_t S_0^T k_t - sum_{s<t} e^(gam_t - gam_s) (k_s . k_t) u_s)
    o_t = e^gam_t S_0^T q_t + sum_{s<=t} e^(gam_t - gam_s) (k_s . q_t) u_s
    S_n = e^gam_n S_0 + sum_{s<=n} e^(gam_n - gam_s) k_s u_s^T
  (unrolling the recurrence S_t = e^g_t S_{t-1} + k_t u_t^T, u_t = beta_t (v_t - e^g_t S_{t-1}^T k_t)).
  Returns (o_BTHV, S_n with n = `applied` tokens (default all T), u_BTHV): a rollback cache applies T - 1
  and keeps the last token's (g, k, u) pending (apply_token_update).
  """
  T = q_BTHK.shape[1]
  n = T if applied is None else applied
  gam_BHT = jnp.moveaxis(jnp.cumsum(g_BTH, axis=1), 1, -1)
  k_BHTK, q_BHTK, v_BHTV = (jnp.moveaxis(a, 1, 2) for a in (k_BTHK, q_BTHK, v_BTHV))
  kq_BHXK = jnp.concatenate([k_BHTK, q_BHTK], axis=2)  # X = 2T rows: k_1..k_T, q_1..q_T
  read_BHXV = _einsum("bhkv,bhxk->bhxv", state_BHKV, kq_BHXK)  # S_0^T k_t, S_0^T q_t: the one read of S_0
  # k_t . k_s and q_t . k_s: 2T^2 short dot products, as one elementwise reduction that XLA fuses
  dots_BHXT = jnp.sum(kq_BHXK[..., :, None, :] * k_BHTK[..., None, :, :], axis=-1)
  # e^(gam_t - gam_s) for s <= t (masked before exp: gam_t - gam_s > 0 above the diagonal)
  i = np.arange(T)
  decay_BHTT = jnp.exp(jnp.where(i[:, None] >= i[None, :], gam_BHT[..., :, None] - gam_BHT[..., None, :], -jnp.inf))
  start_BHT1 = jnp.exp(gam_BHT)[..., None]
  beta_BHT1 = jnp.moveaxis(beta_BTH, 1, -1)[..., None]
  u: list[jax.Array] = []
  for t in range(T):  # T <= FEW_TOKEN_MAX: a few [B, H, V] vectors
    acc_BHV = v_BHTV[:, :, t] - start_BHT1[:, :, t] * read_BHXV[:, :, t]
    for j in range(t):
      acc_BHV = acc_BHV - (decay_BHTT[:, :, t, j] * dots_BHXT[:, :, t, j])[..., None] * u[j]
    u.append(beta_BHT1[:, :, t] * acc_BHV)
  u_BHTV = jnp.stack(u, axis=2)
  mix_BHTT = decay_BHTT * dots_BHXT[:, :, T:]  # causal (s <= t): the mask sits in the decay
  o_BHTV = start_BHT1 * read_BHXV[:, :, T:] + _einsum("bhts,bhsv->bhtv", mix_BHTT, u_BHTV)
  if n == 0:
    new_BHKV = state_BHKV
  else:
    weight_BHS1 = decay_BHTT[:, :, n - 1, :n, None]  # e^(gam_n - gam_s)
    update_BHKV = _einsum("bhsk,bhsv->bhkv", weight_BHS1 * k_BHTK[:, :, :n], u_BHTV[:, :, :n])
    new_BHKV = start_BHT1[:, :, n - 1, :, None] * state_BHKV + update_BHKV
  return jnp.moveaxis(o_BHTV, 2, 1), new_BHKV, jnp.moveaxis(u_BHTV, 2, 1)


def apply_token_update(state_BHKV, g_BH, k_BHK, u_BHV):
  """exp(g) * state + k u^T: a pending token update (few_token_delta_rule's u of the last token) made real."""
  return state_BHKV * jnp.exp(g_BH)[..., None, None] + k_BHK[..., :, None] * u_BHV[..., None, :]


def chunked_gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV, chunk: int):
  """Chunked parallel delta rule, continuing from state_BHKV. All inputs fp32.

  Returns (o_BTHV, final state_BHKV). T is zero-padded to a multiple of the chunk; zero padding at the end
  leaves outputs and the final state exact. Chunks lead every intermediate ([N, B, H, L, ...]): the scan over
  them then reads its inputs and stacks its outputs in place, where a [B, H, N, ...] order made XLA copy each
  of them chunk-major and back, forward and backward (config M of experiments/sft_step_time.py: all layout
  copies of a training step 260 -> 176 MiB).
  """
  B, T, H, K = k_BTHK.shape
  V = v_BTHV.shape[-1]
  L = min(chunk, T)  # a short multi-token step need not pad to a full chunk; results agree to fp32 rounding
  pad = (-T) % L
  N = (T + pad) // L

  def to_chunks(a):  # [B, T, H, ...] -> [N, B, H, L, ...]
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    a = a.reshape((B, N, L) + a.shape[2:])
    return jnp.transpose(a, (1, 0, 3, 2) + tuple(range(4, a.ndim)))

  q, k, v, g, beta = (to_chunks(a) for a in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH))
  gam_NBHL = jnp.cumsum(g, axis=-1)  # cumulative log-decay inside each chunk
  i = jnp.arange(L)
  causal_ij = i[:, None] >= i[None, :]
  strict_ij = i[:, None] > i[None, :]
  # Mask *before* exp: above the diagonal gam_i - gam_j > 0 can reach 1e4 and exp would overflow to inf,
  # and inf * 0 is NaN.
  diff_NBHij = gam_NBHL[..., :, None] - gam_NBHL[..., None, :]
  decay_NBHij = jnp.exp(jnp.where(causal_ij, diff_NBHij, -jnp.inf))

  kk_NBHij = _einsum("nbhik,nbhjk->nbhij", k, k)
  lower_NBHij = jnp.where(strict_ij, beta[..., :, None] * kk_NBHij * decay_NBHij, 0.0)
  # One unit-lower-triangular solve gives both U = (I+L)^-1 diag(beta) V and W = (I+L)^-1 diag(beta e^gam) K
  # (matmul-only: lax.linalg.triangular_solve deadlocks XLA's CPU thread pool, see models/triangular.py).
  rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(gam_NBHL))[..., None] * k], axis=-1)
  sol = unit_lower_solve(lower_NBHij, rhs)
  u_NBHLV, w_NBHLK = sol[..., :V], sol[..., V:]

  qk_NBHij = jnp.where(causal_ij, _einsum("nbhik,nbhjk->nbhij", q, k) * decay_NBHij, 0.0)
  q_dec = q * jnp.exp(gam_NBHL)[..., None]
  gam_last_NBH = gam_NBHL[..., -1]
  # exp(gam_C - gam_i) rather than exp(gam_C)/exp(gam_i): the latter is 0/0 for strong decays.
  k_dec = k * jnp.exp(gam_last_NBH[..., None] - gam_NBHL)[..., None]

  def step(S_BHKV, xs):
    u, w, qd, qk, kd, glast = xs
    v_new = u - _einsum("bhlk,bhkv->bhlv", w, S_BHKV)
    o = _einsum("bhlk,bhkv->bhlv", qd, S_BHKV) + _einsum("bhij,bhjv->bhiv", qk, v_new)
    S_BHKV = jnp.exp(glast)[..., None, None] * S_BHKV + _einsum("bhlk,bhlv->bhkv", kd, v_new)
    return S_BHKV, o

  xs = (u_NBHLV, w_NBHLK, q_dec, qk_NBHij, k_dec, gam_last_NBH)
  state_BHKV, o_NBHLV = jax.lax.scan(step, state_BHKV, xs)
  o_BTHV = jnp.transpose(o_NBHLV, (1, 0, 3, 2, 4)).reshape(B, N * L, H, V)[:, :T]
  return o_BTHV, state_BHKV


class CausalConv(nn.Module):
  """Depthwise causal conv over the last W-1 inputs, no bias. Param `kernel` [W, C] (kernel[j, c] is torch
  conv1d.weight[c, 0, j]; tap W-1 multiplies the current token, cross-correlation as in torch).

  Written as a sum of W shifted products over [cached W-1 pre-activation inputs | new inputs], so prefill,
  single-step and multi-token decode are the same code.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTC: jax.Array, prev_BWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_BTC pre-activation, prev_BWC the previous W-1 inputs) -> (silu(conv)_BTC, new prev_BWC)."""
    cfg = self.config
    W, C = cfg.linear_conv_kernel_dim, x_BTC.shape[-1]
    kernel_WC = logical_param(
      self, "kernel", nn.initializers.normal(cfg.initializer_range), ("conv_width", "gdn_qkv"), (W, C), cfg.param_dtype
    )
    T = x_BTC.shape[1]
    ext_BXC = jnp.concatenate([prev_BWC.astype(x_BTC.dtype), x_BTC], axis=1)  # X = T + W - 1
    ext32 = ext_BXC.astype(jnp.float32)
    acc_BTC = sum(ext32[:, j : j + T] * kernel_WC[j].astype(jnp.float32) for j in range(W))
    return jax.nn.silu(acc_BTC).astype(x_BTC.dtype), ext_BXC[:, T:]


def _a_log_init(key, shape, dtype=jnp.float32):
  # A ~ U(0.01, 16) as HF 5.24 initialises it; the param stores log(A).
  return jnp.log(jax.random.uniform(key, shape, dtype, 0.01, 16.0))


class GatedDeltaNet(nn.Module):
  """Qwen3.5 `linear_attn`. Params: in_proj_qkv [D, C], in_proj_z [D, Hv*dv], in_proj_b/in_proj_a [D, Hv],
  conv1d/kernel [W, C], A_log [Hv] (always fp32; the model computes -exp(A_log)), dt_bias [Hv],
  norm/scale [dv] (plain scale), out_proj [Hv*dv, D].
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None, cache: dict | None) -> tuple[jax.Array, dict | None]:
    """x_BTD (already input-normed) -> (out_BTD, new cache).

    cache (optional): {"conv_BWC": last W-1 pre-activation q|k|v inputs, "state_BHKV": fp32 recurrent state,
    ...other keys passed through}. Pads (valid_BT False) are zeroed here, which keeps left padding exact;
    pads in the middle of a sequence would still decay the state, so don't make them.

    Rollback (a cache from init_cache(..., rollback=True), used by speculative decoding): the states are kept
    one token behind. conv_BWC / state_BHKV hold the states before the last token of the call, which stays
    pending: its conv input "pend_x_BC" and its update (pend_g_BH, pend_k_BHK, pend_u_BHV), state' =
    exp(g) state + k u^T. The next call applies the pending token first, except in rows where "rollback_B"
    [B] is set: those resume from before it. A rejected last token (a draft) is thus undone by a flag, with
    no second pass and no extra state copy. A call longer than FEW_TOKEN_MAX (a prefill) leaves an
    identity update pending (g = 0, k = u = 0) and only the conv input, so it cannot be rolled back.
    """
    cfg = self.config
    B, T, _ = x_BTD.shape
    Hk, H, K, V = (
      cfg.linear_num_key_heads,
      cfg.linear_num_value_heads,
      cfg.linear_key_head_dim,
      cfg.linear_value_head_dim,
    )
    W = cfg.linear_conv_kernel_dim
    if valid_BT is not None:
      x_BTD = x_BTD * valid_BT[..., None].astype(x_BTD.dtype)

    mixed_BTC = dense(cfg.linear_conv_dim, ("embed", "gdn_qkv"), cfg, "in_proj_qkv")(x_BTD)
    z_BTHV = dense(H * V, ("embed", "gdn_value"), cfg, "in_proj_z")(x_BTD).reshape(B, T, H, V)
    b_BTH = dense(H, ("embed", "gdn_heads"), cfg, "in_proj_b")(x_BTD)
    a_BTH = dense(H, ("embed", "gdn_heads"), cfg, "in_proj_a")(x_BTD)

    if cache is None:
      prev_BWC = jnp.zeros((B, W - 1, cfg.linear_conv_dim), mixed_BTC.dtype)
      state_BHKV = jnp.zeros((B, H, K, V), jnp.float32)
    else:
      prev_BWC, state_BHKV = read_state(cache, "conv_BWC"), read_state(cache, "state_BHKV")
    rollback = cache is not None and "pend_u_BHV" in cache
    if rollback:  # make the previous call's pending token real, except where it was rolled back
      keep_B = ~cache["rollback_B"]
      pend = {k: read_state(cache, k) for k in ("pend_x_BC", "pend_g_BH", "pend_k_BHK", "pend_u_BHV")}
      shifted_BWC = jnp.concatenate([prev_BWC[:, 1:], pend["pend_x_BC"][:, None].astype(prev_BWC.dtype)], axis=1)
      prev_BWC = jnp.where(keep_B[:, None, None], shifted_BWC, prev_BWC)
      updated_BHKV = apply_token_update(state_BHKV, pend["pend_g_BH"], pend["pend_k_BHK"], pend["pend_u_BHV"])
      state_BHKV = jnp.where(keep_B[:, None, None, None], updated_BHKV, state_BHKV)
    conv_BTC, new_prev_BWC = CausalConv(cfg, name="conv1d")(mixed_BTC, prev_BWC)
    conv_BTC = nn.with_logical_constraint(conv_BTC, ("batch", "length", "gdn_qkv"))

    kd = cfg.linear_key_dim
    q_BTHK = conv_BTC[..., :kd].reshape(B, T, Hk, K).astype(jnp.float32)
    k_BTHK = conv_BTC[..., kd : 2 * kd].reshape(B, T, Hk, K).astype(jnp.float32)
    v_BTHV = conv_BTC[..., 2 * kd :].reshape(B, T, H, V).astype(jnp.float32)
    # Scale after the l2norm (as HF); value head h reads key head h // (H/Hk): repeat_interleave.
    q_BTHK = jnp.repeat(l2norm(q_BTHK) * np.float32(K**-0.5), H // Hk, axis=2)
    k_BTHK = jnp.repeat(l2norm(k_BTHK), H // Hk, axis=2)

    a_log = logical_param(self, "A_log", _a_log_init, ("gdn_heads",), (H,), jnp.float32)
    dt_bias = logical_param(self, "dt_bias", nn.initializers.ones_init(), ("gdn_heads",), (H,), cfg.param_dtype)
    beta_BTH = jax.nn.sigmoid(b_BTH.astype(jnp.float32))
    g_BTH = -jnp.exp(a_log.astype(jnp.float32)) * torch_softplus(
      a_BTH.astype(jnp.float32) + dt_bias.astype(jnp.float32)
    )

    pending = None
    if rollback:
      o_BTHV, state_BHKV, pending = self._rollback_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV)
      # the conv window before the last token (the token itself is pending)
      new_prev_BWC = jnp.concatenate([prev_BWC.astype(mixed_BTC.dtype), mixed_BTC], axis=1)[:, T - 1 : T + W - 2]
      pending["pend_x_BC"] = mixed_BTC[:, -1]
    elif T <= FEW_TOKEN_MAX and cache is not None:
      o_BTHV, state_BHKV, _ = few_token_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV)
    else:
      o_BTHV, state_BHKV = chunked_gated_delta_rule(
        q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV, cfg.gdn_chunk_size
      )
    # HF casts the kernel output back to the model dtype before the gated norm.
    y_BTHV = GatedRMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(o_BTHV.astype(x_BTD.dtype), z_BTHV)
    y_BTF = nn.with_logical_constraint(y_BTHV.reshape(B, T, H * V), ("batch", "length", "gdn_value"))
    out_BTD = dense(cfg.hidden_size, ("gdn_value", "embed"), cfg, "out_proj")(y_BTF)
    if cache is None:
      return out_BTD, None
    updates = {"conv_BWC": new_prev_BWC, "state_BHKV": state_BHKV, **(pending or {})}
    return out_BTD, dict(cache, **{k: write_state(cache, k, v, (0,) * v.ndim) for k, v in updates.items()})

  def _rollback_rule(self, q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV):
    """The delta rule for a rollback cache -> (o_BTHV, state before the last token, its pending update)."""
    T = q_BTHK.shape[1]
    if T > FEW_TOKEN_MAX:  # a prefill: run everything, leave an identity update pending
      o_BTHV, state_BHKV = chunked_gated_delta_rule(
        q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV, self.config.gdn_chunk_size
      )
      zero = jnp.zeros_like
      return (
        o_BTHV,
        state_BHKV,
        {"pend_g_BH": zero(g_BTH[:, 0]), "pend_k_BHK": zero(k_BTHK[:, 0]), "pend_u_BHV": zero(v_BTHV[:, 0])},
      )
    o_BTHV, state_BHKV, u_BTHV = few_token_delta_rule(
      q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV, applied=T - 1
    )
    return o_BTHV, state_BHKV, {"pend_g_BH": g_BTH[:, -1], "pend_k_BHK": k_BTHK[:, -1], "pend_u_BHV": u_BTHV[:, -1]}
