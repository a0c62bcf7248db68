"""mtp_spec: native-MTP self-speculative decoding, verified by the backbone (exact speculative sampling).

Axis vocabulary: B batch, T prompt bucket, S cache slots, V vocabulary, D model dim.

Loop invariant at the start of a step, per row: the backbone cache holds x_0..x_{n-1}; x_n (last emitted)
is pending; the MTP cache holds slots 0..n-1 with (e(x_{t+1}), h_t); d is the MTP draft for x_{n+1}, drawn
from q_BV (the draft's sampling distribution; carried only when sampling).

Step:
  1. verify: backbone on [x_n, d] at positions (n, n+1) -> p1 (for x_{n+1}) and p2 (for x_{n+2}).
  2. accept d with probability min(1, p1(d) / q(d)); else x_{n+1} ~ norm(max(0, p1 - q)). On accept, a bonus
     token b ~ p2 is emitted too. Greedy: accept iff d is the argmax of p1, and x_{n+1} is that argmax either
     way: identical to ar.
  3. rollback of rejected rows: the KV slot of d is marked invalid in valid_BS (positions are per row: the
     number of valid slots, so the next token of that row reuses position n+1). Gated-DeltaNet conv and
     recurrent states cannot be un-applied, so the cache (init_cache(rollback=True)) keeps them one token
     behind, with the last token's update pending; rejected rows set rollback_B and the next step drops it.
     Nothing is recomputed and no state is copied.
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
from pipo_jax.models.qwen3_5 import positions_from_valid


def spec_prefill(
  cfg: ModelConfig, params, ids_BT, valid_BT, stop_ids_E, rng, *, sp: smp.SamplingParams, max_new: int
) -> dict:
  """Prompt -> x_n (emitted) and the first draft d ~ q (not emitted)."""
  B, T = ids_BT.shape
  S = T + 2 * max_new + 2
  cache = C.init_backbone_cache(cfg, params, B, S, rollback=True)
  h_BTD, cache = C.backbone(cfg, params, C.embed(cfg, params, ids_BT), positions_from_valid(valid_BT), valid_BT, cache)
  rng, k1, k2 = jax.random.split(rng, 3)
  out = C.init_out(B, max_new, cfg.vocab_size, cfg.pad_token_id, sp.uses_presence)
  tok_B = smp.sample(k1, C.logits(cfg, params, h_BTD[:, -1]), sp, C.presence(out))
  out, _ = C.emit(out, tok_B[:, None], jnp.ones((B, 1), bool), stop_ids_E, max_new)
  out["steps_B"] = out["steps_B"] + 1
  m_BD, mcache = mtp_prompt_pass(cfg, params, h_BTD, ids_BT, valid_BT, tok_B, S)
  state = {"cache": cache, "mcache": mcache, "last_B": tok_B, "out": out, "rng": rng, "step": jnp.zeros((), jnp.int32)}
  return dict(state, **_draft(k2, cfg, params, m_BD, sp, C.presence(out)))


def _draft(key, cfg: ModelConfig, params, m_BD, sp: smp.SamplingParams, presence_BV) -> dict:
  """The next draft from the MTP output: {"draft_B"}, plus its distribution "q_BV" when sampling (greedy
  verification compares ids only, so the [B, V] one-hot is neither built nor carried)."""
  logits_BV = C.logits(cfg, params, m_BD)
  if sp.greedy:
    return {"draft_B": smp.sample(key, logits_BV, sp, presence_BV)}
  q_BV = smp.probs(logits_BV, sp, presence_BV)
  return {"draft_B": smp.sample_from_probs(key, q_BV, sp.greedy), "q_BV": q_BV}


def _verify(key_u, key_r, logits_BV, d_B, q_BV, sp: smp.SamplingParams, presence_BV):
  """Exact speculative sampling of x_{n+1} given the draft d ~ q -> (accept_B, x1_B)."""
  if sp.greedy:
    x1_B = smp.sample(key_r, logits_BV, sp, presence_BV)
    return x1_B == d_B, x1_B
  B = d_B.shape[0]
  rows = jnp.arange(B)
  p1_BV = smp.probs(logits_BV, sp, presence_BV)
  p1_d, q_d = p1_BV[rows, d_B], q_BV[rows, d_B]
  accept_B = jax.random.uniform(key_u, (B,)) * q_d < p1_d  # u < p/q without dividing (q(d) > 0: d ~ q)
  resid_BV = jnp.maximum(p1_BV - q_BV, 0.0)
  resid_sum_B1 = jnp.sum(resid_BV, axis=-1, keepdims=True)
  # p1 == q makes the residual empty, but then accept_B is certain; fall back to p1 to stay well defined.
  resid_BV = jnp.where(resid_sum_B1 > 0, resid_BV / jnp.maximum(resid_sum_B1, 1e-30), p1_BV)
  r_B = smp.sample_from_probs(key_r, resid_BV, sp.greedy)
  return accept_B, jnp.where(accept_B, d_B, r_B)


def spec_decode(cfg: ModelConfig, params, state, stop_ids_E, *, sp: smp.SamplingParams, max_new: int) -> dict:
  def cond(s):
    return jnp.any(s["out"]["active_B"]) & (s["step"] < max_new)

  def body(s):
    out = s["out"]
    act_B = out["active_B"]
    B = act_B.shape[0]
    cache0 = s["cache"]
    base_B = C.next_positions(cache0)
    pos_B2 = base_B[:, None] + jnp.arange(2)[None]
    valid_B2 = jnp.broadcast_to(act_B[:, None], (B, 2))
    x_B, d_B = s["last_B"], s["draft_B"]

    # 1. verify
    h_B2D, cache = C.backbone(cfg, params, C.embed(cfg, params, jnp.stack([x_B, d_B], 1)), pos_B2, valid_B2, cache0)
    logits_B2V = C.logits(cfg, params, h_B2D)

    # 2. accept / resample / bonus
    rng, k_u, k_r, k_b, k_d = smp.split_keys(s["rng"], 4, not sp.greedy)
    accept_B, x1_B = _verify(k_u, k_r, logits_B2V[:, 0], d_B, s.get("q_BV"), sp, C.presence(out))
    pres1_BV = C.with_token(C.presence(out), x1_B)
    b_B = smp.sample(k_b, logits_B2V[:, 1], sp, pres1_BV)

    tok_B2, allowed_B2 = jnp.stack([x1_B, b_B], axis=1), jnp.stack([jnp.ones_like(act_B), accept_B], axis=1)
    out, _ = C.emit(out, tok_B2, allowed_B2, stop_ids_E, max_new)
    out["steps_B"] = out["steps_B"] + act_B
    out["proposed_B"] = out["proposed_B"] + act_B
    out["kept_B"] = out["kept_B"] + (act_B & accept_B)

    # 3. rollback of rejected rows: d's KV slot invalid, d's pending DeltaNet update dropped next step
    keep2_B = act_B & accept_B
    valid_BS = jax.lax.dynamic_update_slice(cache["valid_BS"], keep2_B[:, None], (0, cache0["index"] + 1))
    cache = dict(cache, valid_BS=valid_BS, rollback_B=act_B & ~accept_B)

    # 4. MTP slots and the next draft
    mtok_B2 = jnp.stack([x1_B, b_B], axis=1)
    mvalid_B2 = jnp.stack([act_B, keep2_B], axis=1)
    m_B2D, mcache = C.mtp_only(cfg, params, mtok_B2, h_B2D, pos_B2, mvalid_B2, s["mcache"])
    m_BD = jnp.where(accept_B[:, None], m_B2D[:, 1], m_B2D[:, 0])
    pres_next_BV = None if pres1_BV is None else jnp.where(accept_B[:, None], C.with_token(pres1_BV, b_B), pres1_BV)
    last_B = jnp.where(accept_B, b_B, x1_B)
    nxt = {"cache": cache, "mcache": mcache, "last_B": last_B, "out": out, "rng": rng, "step": s["step"] + 1}
    return dict(nxt, **_draft(k_d, cfg, params, m_BD, sp, pres_next_BV))

  return jax.lax.while_loop(cond, body, state)
