"""mtp_spec: native-MTP self-speculative decoding, verified by the backbone (exact speculative sampling).

Axis vocabulary: B batch, T prompt bucket, S cache slots, V vocabulary, D model dim.

Loop invariant at the start of a step, per row: the backbone cache holds x_0..x_{n-1}; x_n (last emitted)
is pending; the MTP cache holds slots 0..n-1 with (e(x_{t+1}), h_t); d is the MTP draft for x_{n+1}, drawn
from q_BV (the draft's sampling distribution, one-hot when greedy).

Step:
  1. verify: backbone on [x_n, d] at positions (n, n+1) -> p1 (for x_{n+1}) and p2 (for x_{n+2}).
  2. accept d with probability min(1, p1(d) / q(d)); else x_{n+1} ~ norm(max(0, p1 - q)). On accept, a bonus
     token b ~ p2 is emitted too. Greedy: p1, q one-hot, so the result is argmax p1 either way: identical to ar.
  3. rollback of rejected rows: the KV slot of d is marked invalid in valid_BS (positions are per row: the
     number of valid slots, so the next token of that row reuses position n+1). Gated-DeltaNet conv and
     recurrent states cannot be un-applied, so the pre-step cache is kept and, only when some active row
     rejected (lax.cond), the backbone re-runs x_n alone from it; those rows take the linear-layer states of
     that pass. Its attention K/V for x_n equal the verify pass's (same input and position), so they are not
     touched.
  4. MTP on (e(x_{n+1}), h_n) at n and (e(b), h_{n+1}) at n+1 (the second slot invalid when rejected); the
     next draft comes from the last valid slot.
Cache sizing: 2 slots per step, T + 2 * max_new in all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pipo_jax.config import ModelConfig
from pipo_jax.inference import common as C
from pipo_jax.inference import sampling as smp
from pipo_jax.inference.ar import mtp_prompt_pass
from pipo_jax.models.qwen3_5 import init_cache, positions_from_valid

_LINEAR_STATE_KEYS = ("conv_BWC", "state_BHKV")


def spec_prefill(
  cfg: ModelConfig, params, ids_BT, valid_BT, stop_ids_E, rng, *, sp: smp.SamplingParams, max_new: int
) -> dict:
  """Prompt -> x_n (emitted) and the first draft d ~ q (not emitted)."""
  B, T = ids_BT.shape
  S = T + 2 * max_new + 2
  cache = init_cache(cfg, B, S)
  h_BTD, cache = C.backbone(cfg, params, C.embed(cfg, params, ids_BT), positions_from_valid(valid_BT), valid_BT, cache)
  rng, k1, k2 = jax.random.split(rng, 3)
  out = C.init_out(B, max_new, cfg.vocab_size, cfg.pad_token_id)
  tok_B = smp.sample(k1, C.logits(cfg, params, h_BTD[:, -1]), sp, out["presence_BV"])
  out = C.emit(out, tok_B, jnp.ones((B,), bool), stop_ids_E, max_new)
  out["steps_B"] = out["steps_B"] + 1
  m_BD, mcache = mtp_prompt_pass(cfg, params, h_BTD, ids_BT, valid_BT, tok_B, S)
  q_BV = smp.probs(C.logits(cfg, params, m_BD), sp, out["presence_BV"])
  draft_B = smp.sample_from_probs(k2, q_BV, sp.greedy)
  return {
    "cache": cache,
    "mcache": mcache,
    "last_B": tok_B,
    "draft_B": draft_B,
    "q_BV": q_BV,
    "out": out,
    "rng": rng,
    "step": jnp.zeros((), jnp.int32),
  }


def _select_linear_states(take_a_B, a: dict, b: dict) -> dict:
  """Per row, linear-layer states from cache `a` where take_a_B, else from `b`; everything else from `b`.
  Layer-cache leaves carry a leading [R] (scanned repeats) axis, so the batch axis is 1."""

  def sel(path, xa, xb):
    if path[-1].key in _LINEAR_STATE_KEYS:
      m = take_a_B.reshape((1, -1) + (1,) * (xa.ndim - 2))
      return jnp.where(m, xa, xb)
    return xb

  return dict(b, layers=jax.tree_util.tree_map_with_path(sel, a["layers"], b["layers"]))


def spec_decode(cfg: ModelConfig, params, state, stop_ids_E, *, sp: smp.SamplingParams, max_new: int) -> dict:
  def cond(s):
    return jnp.any(s["out"]["active_B"]) & (s["step"] < max_new)

  def body(s):
    out = s["out"]
    act_B = out["active_B"]
    B = act_B.shape[0]
    rows = jnp.arange(B)
    cache0 = s["cache"]
    base_B = C.next_positions(cache0)
    pos_B2 = base_B[:, None] + jnp.arange(2)[None]
    valid_B2 = jnp.broadcast_to(act_B[:, None], (B, 2))
    x_B, d_B, q_BV = s["last_B"], s["draft_B"], s["q_BV"]

    # 1. verify
    h_B2D, cache2 = C.backbone(cfg, params, C.embed(cfg, params, jnp.stack([x_B, d_B], 1)), pos_B2, valid_B2, cache0)
    logits_B2V = C.logits(cfg, params, h_B2D)
    p1_BV = smp.probs(logits_B2V[:, 0], sp, out["presence_BV"])

    # 2. accept / resample / bonus
    rng, k_u, k_r, k_b, k_d = jax.random.split(s["rng"], 5)
    p1_d, q_d = p1_BV[rows, d_B], q_BV[rows, d_B]
    if sp.greedy:
      accept_B = p1_d >= 1.0  # one-hot p1 and q: accept iff the draft is the argmax
    else:
      u_B = jax.random.uniform(k_u, (B,))
      accept_B = u_B * q_d < p1_d  # u < p/q without dividing (q(d) > 0 since d was drawn from q)
    resid_BV = jnp.maximum(p1_BV - q_BV, 0.0)
    resid_sum_B1 = jnp.sum(resid_BV, axis=-1, keepdims=True)
    # p1 == q makes the residual empty, but then accept_B is certain; fall back to p1 to stay well defined.
    resid_BV = jnp.where(resid_sum_B1 > 0, resid_BV / jnp.maximum(resid_sum_B1, 1e-30), p1_BV)
    r_B = smp.sample_from_probs(k_r, resid_BV, sp.greedy)
    x1_B = jnp.where(accept_B, d_B, r_B)
    pres1_BV = out["presence_BV"].at[rows, x1_B].set(True)
    b_B = smp.sample(k_b, logits_B2V[:, 1], sp, pres1_BV)

    out = C.emit(out, x1_B, jnp.ones_like(act_B), stop_ids_E, max_new)
    out = C.emit(out, b_B, accept_B, stop_ids_E, max_new)
    out["steps_B"] = out["steps_B"] + act_B
    out["proposed_B"] = out["proposed_B"] + act_B
    out["kept_B"] = out["kept_B"] + (act_B & accept_B)

    # 3. rollback: slot of d invalid for rejected rows; linear states recomputed from x_n alone
    keep2_B = act_B & accept_B
    idx = cache0["index"]
    cache2 = dict(cache2, valid_BS=jax.lax.dynamic_update_slice(cache2["valid_BS"], keep2_B[:, None], (0, idx + 1)))
    rejected_B = act_B & ~accept_B

    def rollback(c2):
      _, c1 = C.backbone(cfg, params, C.embed(cfg, params, x_B[:, None]), base_B[:, None], act_B[:, None], cache0)
      return _select_linear_states(rejected_B, c1, c2)

    cache = jax.lax.cond(jnp.any(rejected_B), rollback, lambda c2: c2, cache2)

    # 4. MTP slots and the next draft
    mtok_B2 = jnp.stack([x1_B, b_B], axis=1)
    mvalid_B2 = jnp.stack([act_B, keep2_B], axis=1)
    m_B2D, mcache = C.mtp_only(cfg, params, mtok_B2, h_B2D, pos_B2, mvalid_B2, s["mcache"])
    m_BD = jnp.where(accept_B[:, None], m_B2D[:, 1], m_B2D[:, 0])
    pres_next_BV = jnp.where(accept_B[:, None], pres1_BV.at[rows, b_B].set(True), pres1_BV)
    q_next_BV = smp.probs(C.logits(cfg, params, m_BD), sp, pres_next_BV)
    d_next_B = smp.sample_from_probs(k_d, q_next_BV, sp.greedy)
    last_B = jnp.where(accept_B, b_B, x1_B)
    return {
      "cache": cache,
      "mcache": mcache,
      "last_B": last_B,
      "draft_B": d_next_B,
      "q_BV": q_next_BV,
      "out": out,
      "rng": rng,
      "step": s["step"] + 1,
    }

  return jax.lax.while_loop(cond, body, state)
