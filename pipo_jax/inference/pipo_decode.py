"""PIPO decoding: compressed prefill, then two phases per step (docs/method.md#decoding; where it differs from
the reference: docs/method.md#mtp-cache-at-prefill, docs/method.md#stop-at-prefill,
docs/method.md#threshold-semantics, docs/method.md#pad-never-sampled).

Axis vocabulary: B batch, T prompt bucket, L prompt pairs, S cache slots (pairs), V vocabulary, D model dim,
N raw output slots (2 per step: token1, token2-or-PAD).

Prefill (one pass):
  * each row gets a parity PAD after its prompt when odd, then is left-padded in whole pairs;
  * backbone_pairs over the L prompt pairs at compressed positions 0..L_r-1 -> h_0..h_{L-1};
    token1 ~ W h_{L-1} (PAD masked);
  * MTP over the prompt with the training alignment: slot j takes (e(x_{2j+2}), h_j) at position j for
    j = 0..L-2, then slot L-1 takes (e(token1), h_{L-1}) -> token2, gated by the confidence head. The MTP
    cache thus holds exactly the teacher-forced states the head saw in training, and the first output
    pair already carries a draft. A stop id as token1 is detected here.
Decode step k (compressed position p = L_r + k - 1 per row):
  phase 1: backbone on the last emitted pair (token1, token2-or-PAD) -> h_p -> token1 (PAD masked);
  phase 2: MTP + confidence on (e(token1), h_p) at position p -> token2, or PAD.
Threshold tau (traced, one compilation serves every value): tau <= 0 keeps every token2 (the decode loop then
skips the confidence head, whose answer is known); tau >= 1 skips phase 2 entirely (`phase2_runs` counts
executions: prefill included); otherwise token2 is replaced by PAD where sigmoid(conf) < tau (strict).
Random-PAD control (`random_pad`, traced, None = off): token2 is replaced by PAD by an independent coin flip
with that probability instead of by the confidence gate (the paper's Fig. 6 "Random" baseline; phase 2 and the
confidence head still run, so its cost matches the gated decode; the caller passes tau < 1).
Stopping: a stop id as token1 ends the row and drops token2; a stop id as token2 ends it (kept).
`max_new_tokens` counts emitted non-PAD tokens. PAD is masked when sampling token1 and token2, so a
PAD in the raw stream always means a gated (or skipped) token2.
Cache sizing: 1 pair slot per step, L + max_new in all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pipo_jax.config import ModelConfig
from pipo_jax.inference import common as C
from pipo_jax.inference import sampling as smp
from pipo_jax.models.pipo import init_mtp_cache, pair_valid
from pipo_jax.models.qwen3_5 import positions_from_valid


def pair_layout(ids_BT, valid_BT, pad_id: int):
  """Left-padded prompts -> (ids_BT2, valid_BT2) with T2 = T rounded up to even, each row's prompt followed by
  one parity PAD when its length is odd and left-padded so that pairs align. The parity PAD is a real
  (valid) token, as in training and serving (docs/method.md#pad-rules)."""
  B, T = ids_BT.shape
  T2 = T + T % 2
  n_B = jnp.sum(valid_BT, axis=-1).astype(jnp.int32)
  n2_B = n_B + n_B % 2
  s_T2 = jnp.arange(T2)
  q_BT2 = s_T2[None, :] - (T2 - n2_B)[:, None]  # index into the row's real tokens (< 0: left pad)
  src_BT2 = jnp.clip(T - n_B[:, None] + q_BT2, 0, T - 1)
  real_BT2 = (q_BT2 >= 0) & (q_BT2 < n_B[:, None])
  ids2 = jnp.where(real_BT2, jnp.take_along_axis(ids_BT, src_BT2, axis=1), pad_id)
  return ids2.astype(jnp.int32), q_BT2 >= 0


# The token loops pipo_decode compiles, indexed by phase2_case(tau).
PHASE2_LOOPS = ("off", "ungated", "gated")


def phase2_case(tau):
  """Which of PHASE2_LOOPS a threshold runs (tau a float or a traced scalar): phase 2 off for tau >= 1,
  every draft kept without the confidence head for tau <= 0, gated otherwise."""
  return jnp.where(tau >= 1.0, 0, jnp.where(tau <= 0.0, 1, 2))


def _phase2(
  cfg,
  params,
  key,
  tok1_BJ,
  h_BJD,
  pos_BJ,
  valid_BJ,
  mcache,
  tau,
  presence_BV,
  sp,
  forced2_B,
  random_pad=None,
  gated: bool = True,
):
  """MTP + confidence on the slots; token2 from the last slot, gated by tau (or by a coin flip: random_pad).
  gated=False (the caller knows tau <= 0): every token2 is kept and the confidence head does not run (conf 0).
  Returns (token2 or PAD [B], is_pad_slot [B], logits2_BV, conf_B, mcache)."""
  tok1_B = tok1_BJ[:, -1]
  B = tok1_B.shape[0]
  if gated:
    m_BJD, conf_BJ, mcache = C.mtp(cfg, params, tok1_BJ, h_BJD, pos_BJ, valid_BJ, mcache)
    conf_B = conf_BJ[:, -1]
  else:
    m_BJD, mcache = C.mtp_only(cfg, params, tok1_BJ, h_BJD, pos_BJ, valid_BJ, mcache)
    conf_B = jnp.zeros((B,), jnp.float32)
  logits2_BV = C.logits(cfg, params, m_BJD[:, -1])
  pres_BV = C.with_token(presence_BV, tok1_B)  # token1 is already emitted in this completion
  if forced2_B is None:
    # PAD is banned here too: the MTP is never trained to emit it, so a PAD token2 only ever means "gated".
    tok2_B = smp.sample(key, logits2_BV, sp, pres_BV, ban_id=cfg.pad_token_id)
    if not gated:
      keep_B = jnp.ones((B,), bool)
    elif random_pad is not None:
      # fold_in leaves `key` (token2's sample) untouched, so the control differs from the gate only in the PADs.
      u_B = jax.random.uniform(jax.random.fold_in(key, 1), (B,))
      keep_B = u_B >= random_pad
    else:
      keep_B = jax.nn.sigmoid(conf_B) >= tau  # PAD where sigmoid(conf) < tau (strict)
  else:
    tok2_B, keep_B = forced2_B, jnp.ones((B,), bool)
  tok2_B = jnp.where(keep_B, tok2_B, cfg.pad_token_id)
  return tok2_B, tok2_B == cfg.pad_token_id, logits2_BV, conf_B, mcache


def _skipped_phase2(cfg, B: int, mcache):
  """What phase 2 returns when tau >= 1 skips it: token2 = PAD, no logits, no confidence, mcache unchanged."""
  return (
    jnp.full((B,), cfg.pad_token_id, jnp.int32),
    jnp.ones((B,), bool),
    jnp.zeros((B, cfg.vocab_size), jnp.float32),
    jnp.zeros((B,), jnp.float32),
    mcache,
  )


def _phase2_cond(
  cfg, params, key, tok1_BJ, h_BJD, pos_BJ, valid_BJ, mcache, tau, presence_BV, sp, forced2_B, random_pad=None
):
  """Phase 2 under lax.cond(tau < 1): with tau >= 1 neither the MTP layer, the confidence head nor the second
  LM head runs, and token2 is PAD."""

  def run(mc):
    return _phase2(cfg, params, key, tok1_BJ, h_BJD, pos_BJ, valid_BJ, mc, tau, presence_BV, sp, forced2_B, random_pad)

  run2 = tau < 1.0
  return run2, jax.lax.cond(run2, run, lambda mc: _skipped_phase2(cfg, tok1_BJ.shape[0], mc), mcache)


def _emit_pair(out, tok1_B, tok2_B, pad2_B, stop_ids_E, max_new):
  """Append a step's (token1, token2-or-PAD) -> (out, reached_B: token1 left the row active, so its token2
  slot was written; with phase 2 run, that is a proposed draft)."""
  tok_B2 = jnp.stack([tok1_B, tok2_B], axis=1)
  pad_B2 = jnp.stack([jnp.zeros_like(pad2_B), pad2_B], axis=1)
  out, written_B2 = C.emit(out, tok_B2, jnp.ones(tok_B2.shape, bool), stop_ids_E, max_new, pad_slot_BK=pad_B2)
  return out, written_B2[:, 1]


def _record(trace, k, logits1_BV, logits2_BV, conf_B):
  if trace is None:
    return None
  return {
    "logits1": trace["logits1"].at[:, k].set(logits1_BV),
    "logits2": trace["logits2"].at[:, k].set(logits2_BV),
    "conf": trace["conf"].at[:, k].set(conf_B),
  }


def pipo_prefill(
  cfg: ModelConfig,
  params,
  ids_BT,
  valid_BT,
  stop_ids_E,
  rng,
  tau,
  *,
  sp: smp.SamplingParams,
  max_new: int,
  forced_BN: jax.Array | None = None,
  trace: bool = False,
  random_pad: jax.Array | None = None,
) -> dict:
  """Prompt -> state with the first pair emitted. forced_BN (tests): the raw stream to teacher-force instead
  of sampling (slot 2k = token1 of step k, 2k+1 = token2; gating off). trace: record per-step logits."""
  B = ids_BT.shape[0]
  pad = cfg.pad_token_id
  ids2, valid2 = pair_layout(ids_BT, valid_BT, pad)
  L = ids2.shape[1] // 2
  S = L + max_new + 1
  pvalid_BL = pair_valid(valid2)
  ppos_BL = positions_from_valid(pvalid_BL)
  h_BLD, cache = C.pairs(cfg, params, ids2, ppos_BL, pvalid_BL, C.init_backbone_cache(cfg, params, B, S))
  rng, k1, k2 = jax.random.split(rng, 3)
  out = C.init_out(B, 2 * max_new, cfg.vocab_size, pad, sp.uses_presence)
  logits1_BV = C.logits(cfg, params, h_BLD[:, -1])
  tok1_B = smp.sample(k1, logits1_BV, sp, C.presence(out), ban_id=pad)
  if forced_BN is not None:
    tok1_B = forced_BN[:, 0]

  mcache0 = init_mtp_cache(cfg, B, S)
  tok1_BL = jnp.concatenate([ids2[:, 2::2], tok1_B[:, None]], axis=1)

  run2, (tok2_B, pad2_B, logits2_BV, conf_B, mcache) = _phase2_cond(
    cfg,
    params,
    k2,
    tok1_BL,
    h_BLD,
    ppos_BL,
    pvalid_BL,
    mcache0,
    tau,
    C.presence(out),
    sp,
    None if forced_BN is None else forced_BN[:, 1],
    random_pad,
  )
  out, proposed_B = _emit_pair(out, tok1_B, tok2_B, pad2_B, stop_ids_E, max_new)
  proposed_B = proposed_B & run2
  out["steps_B"] = out["steps_B"] + 1
  out["proposed_B"] = out["proposed_B"] + proposed_B
  out["kept_B"] = out["kept_B"] + (proposed_B & ~pad2_B)
  tr = None
  if trace:
    V = cfg.vocab_size
    tr = {"logits1": jnp.zeros((B, max_new, V)), "logits2": jnp.zeros((B, max_new, V)), "conf": jnp.zeros((B, max_new))}
    tr = _record(tr, 0, logits1_BV, logits2_BV, conf_B)
  return {
    "cache": cache,
    "mcache": mcache,
    "pair_B2": jnp.stack([tok1_B, tok2_B], 1),
    "out": out,
    "rng": rng,
    "step": jnp.zeros((), jnp.int32),
    "phase2_runs": run2.astype(jnp.int32),
    "trace": tr,
    "forced": forced_BN,
  }


def pipo_decode(
  cfg: ModelConfig,
  params,
  state,
  stop_ids_E,
  tau,
  *,
  sp: smp.SamplingParams,
  max_new: int,
  random_pad: jax.Array | None = None,
) -> dict:
  """Decode steps until every row is done; at most max_new - 1 steps after the prefill (each step emits
  at least one token). Which phase 2 runs is decided once, outside the token loop: none (tau >= 1), ungated
  (tau <= 0: every token2 is kept, so the confidence head is skipped) or gated. One loop per case is compiled
  and lax.switch picks one, so no step pays for a conditional around the MTP cache (on the demo model on CPU
  that cond cost 14 us of a 316 us step). A random-PAD control or a recorded trace always takes the gated loop
  (the control must cost what the gate costs; the trace records the confidences)."""
  pad = cfg.pad_token_id

  def cond(s):
    return jnp.any(s["out"]["active_B"]) & (s["step"] < max_new - 1)

  def body(s, phase2: str):
    out = s["out"]
    act_B = out["active_B"]
    B = act_B.shape[0]
    k = s["step"] + 1  # index of this step's output pair (0 was the prefill)
    forced = s["forced"]
    pos_B1 = C.next_positions(s["cache"])[:, None]
    # phase 1
    h_B1D, cache = C.pairs(cfg, params, s["pair_B2"], pos_B1, act_B[:, None], s["cache"])
    rng, k1, k2 = smp.split_keys(s["rng"], 2, not sp.greedy or random_pad is not None)
    logits1_BV = C.logits(cfg, params, h_B1D[:, 0])
    tok1_B = smp.sample(k1, logits1_BV, sp, C.presence(out), ban_id=pad)
    if forced is not None:
      tok1_B = forced[:, 2 * k]
    # phase 2
    run2 = jnp.asarray(phase2 != "off")
    if phase2 != "off":
      forced2_B = None if forced is None else forced[:, 2 * k + 1]
      tok1_B1, valid_B1 = tok1_B[:, None], act_B[:, None]
      phase2_out = _phase2(
        cfg,
        params,
        k2,
        tok1_B1,
        h_B1D,
        pos_B1,
        valid_B1,
        s["mcache"],
        tau,
        C.presence(out),
        sp,
        forced2_B,
        random_pad,
        gated=phase2 == "gated",
      )
      tok2_B, pad2_B, logits2_BV, conf_B, mcache = phase2_out
    else:
      tok2_B, pad2_B, logits2_BV, conf_B, mcache = _skipped_phase2(cfg, B, s["mcache"])
    out, proposed_B = _emit_pair(out, tok1_B, tok2_B, pad2_B, stop_ids_E, max_new)
    proposed_B = proposed_B & run2
    out["steps_B"] = out["steps_B"] + act_B
    out["proposed_B"] = out["proposed_B"] + proposed_B
    out["kept_B"] = out["kept_B"] + (proposed_B & ~pad2_B)
    return {
      "cache": cache,
      "mcache": mcache,
      "pair_B2": jnp.stack([tok1_B, tok2_B], 1),
      "out": out,
      "rng": rng,
      "step": s["step"] + 1,
      "phase2_runs": s["phase2_runs"] + run2.astype(jnp.int32),
      "trace": _record(s["trace"], k, logits1_BV, logits2_BV, conf_B),
      "forced": forced,
    }

  def loop(phase2: str):
    return lambda s: jax.lax.while_loop(cond, lambda x: body(x, phase2), s)

  if random_pad is not None or state["trace"] is not None:
    return jax.lax.cond(phase2_case(tau) == 0, loop("off"), loop("gated"), state)
  return jax.lax.switch(phase2_case(tau), [loop(kind) for kind in PHASE2_LOOPS], state)
