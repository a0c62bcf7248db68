"""Regular decoding of the (uncompressed) backbone, and the unverified native-MTP mode.

Axis vocabulary: B batch, T prompt bucket (left-padded), S cache slots, V vocabulary, D model dim.

Both modes are split into `*_prefill` (prompt -> first token(s) + loop state) and `*_decode` (a
`lax.while_loop` over steps until every row is finished or the step bound is hit), so the benchmark can time
the first token separately; `api.generate` jits the two together.

Cache sizing: every step appends at the shared cache["index"]; a row's RoPE position is the number of valid
slots it has (left pads are invalid), so rows with different prompt lengths stay exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pipo_jax.config import ModelConfig
from pipo_jax.inference import common as C
from pipo_jax.inference import sampling as smp
from pipo_jax.models.pipo import init_mtp_cache
from pipo_jax.models.qwen3_5 import positions_from_valid


def ar_prefill(
  cfg: ModelConfig, params, ids_BT, valid_BT, stop_ids_E, rng, *, sp: smp.SamplingParams, max_new: int
) -> dict:
  """Prompt -> state with the first token emitted. Cache: T + max_new slots (1 per step)."""
  B, T = ids_BT.shape
  cache = C.init_backbone_cache(cfg, params, B, T + max_new)
  h_BTD, cache = C.backbone(cfg, params, C.embed(cfg, params, ids_BT), positions_from_valid(valid_BT), valid_BT, cache)
  rng, key = jax.random.split(rng)
  out = C.init_out(B, max_new, cfg.vocab_size, cfg.pad_token_id, sp.uses_presence)
  tok_B = smp.sample(key, C.logits(cfg, params, h_BTD[:, -1]), sp, C.presence(out))
  out, _ = C.emit(out, tok_B[:, None], jnp.ones((B, 1), bool), stop_ids_E, max_new)
  out["steps_B"] = out["steps_B"] + 1
  return {"cache": cache, "last_B": tok_B, "out": out, "rng": rng, "step": jnp.zeros((), jnp.int32)}


def ar_decode(cfg: ModelConfig, params, state, stop_ids_E, *, sp: smp.SamplingParams, max_new: int) -> dict:
  """One token per step; at most max_new - 1 steps after the prefill token."""

  def cond(s):
    return jnp.any(s["out"]["active_B"]) & (s["step"] < max_new - 1)

  def body(s):
    out = s["out"]
    act_B = out["active_B"]
    pos_B1 = C.next_positions(s["cache"])[:, None]
    h_B1D, cache = C.backbone(
      cfg, params, C.embed(cfg, params, s["last_B"][:, None]), pos_B1, act_B[:, None], s["cache"]
    )
    rng, key = smp.split_keys(s["rng"], 1, not sp.greedy)
    tok_B = smp.sample(key, C.logits(cfg, params, h_B1D[:, 0]), sp, C.presence(out))
    out, _ = C.emit(out, tok_B[:, None], jnp.ones_like(act_B)[:, None], stop_ids_E, max_new)
    out["steps_B"] = out["steps_B"] + act_B
    return {"cache": cache, "last_B": tok_B, "out": out, "rng": rng, "step": s["step"] + 1}

  return jax.lax.while_loop(cond, body, state)


# ---------------------------------------------------------------------------------------------------------
# mtp: native MTP drafts a second token each step and it is always kept (unverified baseline)
# ---------------------------------------------------------------------------------------------------------


def mtp_prompt_pass(cfg, params, h_BTD, ids_BT, valid_BT, tok1_B, S: int):
  """MTP over the prompt, vLLM alignment: slot t takes (e(x_{t+1}), h_t) at RoPE position t, and the last
  slot takes e(tok1). Fills the MTP cache for the prompt (so decode-time MTP attention sees the same
  history as training). Returns (m_BD of the last slot, mtp cache with S slots)."""
  B = ids_BT.shape[0]
  next_BT = jnp.concatenate([ids_BT[:, 1:], tok1_B[:, None]], axis=1)
  m_BTD, mcache = C.mtp_only(
    cfg, params, next_BT, h_BTD, positions_from_valid(valid_BT), valid_BT, init_mtp_cache(cfg, B, S)
  )
  return m_BTD[:, -1], mcache


def mtp_prefill(
  cfg: ModelConfig, params, ids_BT, valid_BT, stop_ids_E, rng, *, sp: smp.SamplingParams, max_new: int
) -> dict:
  """Prompt -> token1 (backbone) and token2 (MTP, kept). Caches: T + max_new + 2 slots (2 per step, at most
  max_new // 2 + 1 steps)."""
  B, T = ids_BT.shape
  S = T + max_new + 2
  cache = C.init_backbone_cache(cfg, params, B, S)
  h_BTD, cache = C.backbone(cfg, params, C.embed(cfg, params, ids_BT), positions_from_valid(valid_BT), valid_BT, cache)
  rng, k1, k2 = jax.random.split(rng, 3)
  out = C.init_out(B, max_new, cfg.vocab_size, cfg.pad_token_id, sp.uses_presence)
  tok1_B = smp.sample(k1, C.logits(cfg, params, h_BTD[:, -1]), sp, C.presence(out))
  m_BD, mcache = mtp_prompt_pass(cfg, params, h_BTD, ids_BT, valid_BT, tok1_B, S)
  tok2_B = smp.sample(k2, C.logits(cfg, params, m_BD), sp, C.with_token(C.presence(out), tok1_B))
  return _mtp_emit(
    {"cache": cache, "mcache": mcache, "out": out, "rng": rng, "step": jnp.zeros((), jnp.int32)},
    tok1_B,
    tok2_B,
    out["active_B"],
    stop_ids_E,
    max_new,
  )


def _mtp_emit(s, tok1_B, tok2_B, act_B, stop_ids_E, max_new):
  tok_B2 = jnp.stack([tok1_B, tok2_B], axis=1)
  out, written_B2 = C.emit(s["out"], tok_B2, jnp.ones(tok_B2.shape, bool), stop_ids_E, max_new)
  proposed_B = written_B2[:, 1]  # the draft was reached (token1 neither stopped the row nor met the budget)
  out["steps_B"] = out["steps_B"] + act_B
  out["proposed_B"] = out["proposed_B"] + proposed_B
  out["kept_B"] = out["kept_B"] + proposed_B
  return dict(s, out=out, pair_B2=tok_B2)


def mtp_decode(cfg: ModelConfig, params, state, stop_ids_E, *, sp: smp.SamplingParams, max_new: int) -> dict:
  """Each step the backbone consumes the last two emitted tokens (o_a, o_b) at positions (n, n+1): h_{n+1}
  gives token1; the MTP consumes (e(o_b), h_n) and (e(token1), h_{n+1}) and its last slot gives token2."""

  def cond(s):  # each step emits 2 tokens per active row, so the budget ends the loop by then
    return jnp.any(s["out"]["active_B"]) & (s["step"] < max_new // 2 + 1)

  def body(s):
    out = s["out"]
    act_B = out["active_B"]
    B = act_B.shape[0]
    pos_B2 = C.next_positions(s["cache"])[:, None] + jnp.arange(2)[None]
    valid_B2 = jnp.broadcast_to(act_B[:, None], (B, 2))
    pair_B2 = s["pair_B2"]
    h_B2D, cache = C.backbone(cfg, params, C.embed(cfg, params, pair_B2), pos_B2, valid_B2, s["cache"])
    rng, k1, k2 = smp.split_keys(s["rng"], 2, not sp.greedy)
    tok1_B = smp.sample(k1, C.logits(cfg, params, h_B2D[:, 1]), sp, C.presence(out))
    mtok_B2 = jnp.stack([pair_B2[:, 1], tok1_B], axis=1)
    m_B2D, mcache = C.mtp_only(cfg, params, mtok_B2, h_B2D, pos_B2, valid_B2, s["mcache"])
    tok2_B = smp.sample(k2, C.logits(cfg, params, m_B2D[:, 1]), sp, C.with_token(C.presence(out), tok1_B))
    s = {"cache": cache, "mcache": mcache, "out": out, "rng": rng, "step": s["step"] + 1}
    return _mtp_emit(s, tok1_B, tok2_B, act_B, stop_ids_E, max_new)

  return jax.lax.while_loop(cond, body, state)
