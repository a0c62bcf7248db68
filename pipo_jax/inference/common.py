"""Pieces shared by the decode loops: model calls on the PIPO params tree and the output tracker.

Axis vocabulary: B batch, T prompt tokens, N raw output slots, M max_new_tokens, V vocabulary, D model dim.

Output tracker `out` (a dict pytree carried through `lax.while_loop`):
  raw_BN        int32 every emitted slot in order, PAD slots included (pipo token2 PADs) and written as
                PAD_SLOT (-1): ids alone cannot mark them, PAD may equal EOS; unused slots = PAD id
  raw_len_B     int32 slots written
  count_B       int32 emitted tokens (non-PAD slots); `max_new_tokens` bounds this
  active_B      bool  still generating (False after a stop id or when count reaches max_new_tokens)
  presence_BV   bool  tokens emitted so far; only when sampling applies a presence penalty (`presence(out)`)
  steps_B, proposed_B, kept_B  int32 per-row statistics (see GenerateResult)

A decode step's slots are appended by one `emit` call (one scatter into raw_BN, one into presence_BV): on a
small model every op of the token loop costs about a microsecond whatever its size (docs/design.md#inference-engine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pipo_jax.config import ModelConfig
from pipo_jax.models.pipo import PipoModel
from pipo_jax.models.qwen3_5 import init_cache, run_unstacked, unstack_layers

# -- model calls (params is the full PIPO tree: backbone / mtp / compressor / confidence_head) ---------------


def _apply(cfg: ModelConfig, params: dict, fn, *args):
  return PipoModel(cfg).apply({"params": params}, *args, method=fn)


def embed(cfg, params, ids_BT):
  return _apply(cfg, params, lambda m, i: m.backbone.embed(i), ids_BT)


# -- the decode layout: layers split per repeat once, outside the token loop ------------------------------


def decode_layout(cfg: ModelConfig, params: dict) -> dict:
  """params with the backbone's stacked layers split per repeat ("layers_by_repeat", in place of "layers"),
  which every model call below then runs unrolled (qwen3_5.run_unstacked says why). Used on CPU; a TPU fuses
  the per-layer slice of a stacked weight into its matmul, so it keeps the scan."""
  if "layers_by_repeat" in params["backbone"]:
    return params
  backbone = {k: v for k, v in params["backbone"].items() if k != "layers"}
  backbone["layers_by_repeat"] = unstack_layers(params["backbone"]["layers"], cfg.layer_pattern()[1])
  return dict(params, backbone=backbone)


def init_backbone_cache(cfg: ModelConfig, params: dict, batch: int, max_len: int, rollback: bool = False) -> dict:
  """init_cache in the layout of `params`: per-repeat layer caches for the decode layout."""
  cache = init_cache(cfg, batch, max_len, rollback=rollback)
  if "layers_by_repeat" in params["backbone"]:
    cache["layers"] = unstack_layers(cache["layers"], cfg.layer_pattern()[1])
  return cache


def backbone(cfg, params, x_BTD, pos_BT, valid_BT, cache):
  """Uncompressed backbone step -> (h_BTD, cache)."""
  if "layers_by_repeat" not in params["backbone"]:
    return _apply(cfg, params, lambda m, *a: m.backbone(*a), x_BTD, pos_BT, valid_BT, cache)
  layer_params = params["backbone"]["layers_by_repeat"]
  x_BTD, cache = run_unstacked(cfg, layer_params, x_BTD, pos_BT, valid_BT, cache)
  return _apply(cfg, params, lambda m, x: m.backbone.norm(x), x_BTD), cache


def logits(cfg, params, h_BD):
  """h [..., D] -> fp32 logits [..., V]."""
  return _apply(cfg, params, lambda m, h: m.logits(h), h_BD).astype(jnp.float32)


def mtp(cfg, params, tok_BJ, h_BJD, pos_BJ, valid_BJ, cache):
  """Native MTP layer on (e(tok), h) -> (m_BJD, conf_logit_BJ, cache). The confidence logit is cheap
  next to the layer; modes that do not gate simply ignore it (XLA drops the dead computation)."""
  return _apply(cfg, params, lambda m, *a: m.mtp_slots(*a), tok_BJ, h_BJD, pos_BJ, valid_BJ, cache)


def mtp_only(cfg, params, tok_BJ, h_BJD, pos_BJ, valid_BJ, cache):
  """Native MTP layer without the confidence head -> (m_BJD, cache)."""

  def f(m, t, h, p, v, c):
    return m.mtp(m.backbone.embed(t), h, p, v, c)

  return _apply(cfg, params, f, tok_BJ, h_BJD, pos_BJ, valid_BJ, cache)


def pairs(cfg, params, ids_BT, pos_BL, valid_BL, cache):
  """Compressed backbone on token pairs (T = 2L) -> (h_BLD, cache)."""
  if "layers_by_repeat" not in params["backbone"]:
    return _apply(cfg, params, lambda m, *a: m.backbone_pairs(*a), ids_BT, pos_BL, valid_BL, cache)
  return backbone(cfg, params, _apply(cfg, params, lambda m, i: m.compress(i), ids_BT), pos_BL, valid_BL, cache)


def next_positions(cache: dict) -> jax.Array:
  """Per-row RoPE position of the next token: the number of valid slots already in the cache [B]."""
  return jnp.sum(cache["valid_BS"], axis=-1).astype(jnp.int32)


# -- output tracker -------------------------------------------------------------------------------------


PAD_SLOT = -1  # raw_BN's mark of a PAD slot (finalize turns it back into the PAD id and raw_is_pad)


def _filler(pad_id: int | None) -> int:
  """The id of unused slots: the PAD id, or any id (0) for ar/mtp on a config without one."""
  return 0 if pad_id is None else pad_id


def init_out(batch: int, num_slots: int, vocab: int, pad_id: int | None, presence: bool) -> dict:
  """An empty tracker; presence: keep the emitted-token sets (only a presence penalty reads them)."""
  B, N = batch, num_slots
  pad_id = _filler(pad_id)
  z = jnp.zeros((B,), jnp.int32)
  out = {
    "raw_BN": jnp.full((B, N), pad_id, jnp.int32),
    "raw_len_B": z,
    "count_B": z,
    "active_B": jnp.ones((B,), bool),
    "steps_B": z,
    "proposed_B": z,
    "kept_B": z,
  }
  if presence:
    out["presence_BV"] = jnp.zeros((B, vocab), bool)
  return out


def presence(out: dict) -> jax.Array | None:
  """The tracker's emitted-token sets [B, V], or None when sampling does not read them."""
  return out.get("presence_BV")


def with_token(presence_BV: jax.Array | None, tok_B: jax.Array) -> jax.Array | None:
  """presence_BV with tok_B marked (a token emitted within the step, before the tracker has it)."""
  if presence_BV is None:
    return None
  return presence_BV.at[jnp.arange(tok_B.shape[0]), tok_B].set(True)


def emit(
  out: dict,
  tok_BK: jax.Array,
  allowed_BK: jax.Array,
  stop_ids_E: jax.Array,
  max_new: int,
  pad_slot_BK: jax.Array | None = None,
) -> tuple[dict, jax.Array]:
  """Append a step's K slots per row, in order: slot k is written where the row is still active after slots
  0..k-1 and `allowed_BK[:, k]`. -> (out, written_BK).

  A non-PAD slot counts toward max_new_tokens, is recorded for the presence penalty and stops the row when
  it is a stop id (the stop token itself is kept; later slots of the step are dropped). A PAD slot is written
  to the raw stream only. stop_ids_E int32 [E] (entries < 0 are unused).
  """
  B, N = out["raw_BN"].shape
  K = tok_BK.shape[1]
  pad_BK = jnp.zeros((B, K), bool) if pad_slot_BK is None else pad_slot_BK
  active_B, count_B, len_B = out["active_B"], out["count_B"], out["raw_len_B"]
  written, idx, real = [], [], []
  for k in range(K):  # K is 1 or 2: a few [B] vectors, which XLA fuses
    do_B = active_B & allowed_BK[:, k]
    real_B = do_B & ~pad_BK[:, k]
    stop_B = real_B & jnp.any(tok_BK[:, k, None] == stop_ids_E[None, :], axis=-1)
    idx.append(jnp.where(do_B, len_B, N))  # N is out of range: mode="drop" skips the write
    written.append(do_B)
    real.append(real_B)
    count_B = count_B + real_B
    len_B = len_B + do_B
    active_B = active_B & ~stop_B & (count_B < max_new)
  written_BK, idx_BK, real_BK = (jnp.stack(a, axis=1) for a in (written, idx, real))
  rows_BK = jnp.broadcast_to(jnp.arange(B)[:, None], (B, K))
  new = dict(
    out,
    raw_BN=out["raw_BN"].at[rows_BK, idx_BK].set(jnp.where(pad_BK, PAD_SLOT, tok_BK), mode="drop"),
    raw_len_B=len_B,
    count_B=count_B,
    active_B=active_B,
  )
  if "presence_BV" in out:
    V = out["presence_BV"].shape[-1]
    new["presence_BV"] = out["presence_BV"].at[rows_BK, jnp.where(real_BK, tok_BK, V)].set(True, mode="drop")
  return new, written_BK


def finalize(out: dict, max_new: int, pad_id: int | None, phase2_runs=None) -> dict:
  """Tracker -> the arrays of GenerateResult (tokens compacted without PAD slots, statistics)."""
  B, N = out["raw_BN"].shape
  pad_id = _filler(pad_id)
  is_pad_BN = out["raw_BN"] == PAD_SLOT
  raw_BN = jnp.where(is_pad_BN, pad_id, out["raw_BN"])
  keep_BN = (jnp.arange(N)[None, :] < out["raw_len_B"][:, None]) & ~is_pad_BN
  dest_BN = jnp.where(keep_BN, jnp.cumsum(keep_BN, axis=-1) - 1, max_new)
  rows_BN = jnp.broadcast_to(jnp.arange(B)[:, None], (B, N))
  tokens_BM = jnp.full((B, max_new), pad_id, jnp.int32).at[rows_BN, dest_BN].set(raw_BN, mode="drop")
  slots_B = out["raw_len_B"]
  pad_slots_B = slots_B - out["count_B"]
  return {
    "tokens": tokens_BM,
    "num_tokens": out["count_B"],
    "raw": raw_BN,
    "raw_is_pad": is_pad_BN,
    "raw_len": slots_B,
    "steps": out["steps_B"],
    "tokens_emitted": out["count_B"],
    "drafts_proposed": out["proposed_B"],
    "drafts_kept": out["kept_B"],
    "pad_ratio": pad_slots_B / jnp.maximum(slots_B, 1).astype(jnp.float32),
    "phase2_runs": jnp.asarray(0 if phase2_runs is None else phase2_runs, jnp.int32),
  }
