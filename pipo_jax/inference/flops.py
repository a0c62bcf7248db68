"""Matmul FLOPs per decode step, for the upper bound of the PIPO speed-up over regular decoding.

A matmul of [m, k] x [k, n] costs 2mkn. Elementwise work, norms and softmax are ignored (they are small
next to the projections). `ctx` is the number of key slots a full-attention layer reads.
"""

from __future__ import annotations

from pipo_jax import flop_model as fm
from pipo_jax.config import FULL, ModelConfig

# Projection counts come from the training FLOP model's kernel tables (pipo_jax/flop_model.py): one list of shapes.


def attention_layer(cfg: ModelConfig, ctx: int) -> int:
  H, K = cfg.num_attention_heads, cfg.head_dim
  return fm.per_token(fm.attention_kernels(cfg)) + 2 * 2 * ctx * H * K  # q (with gate), k, v, o; scores and values


def gdn_layer(cfg: ModelConfig) -> int:
  Hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
  recur = 3 * 2 * Hv * dk * dv  # S^T k, the rank-1 write, S^T q (one token: the recurrent form)
  return fm.per_token(fm.gdn_kernels(cfg)) + 2 * cfg.linear_conv_kernel_dim * cfg.linear_conv_dim + recur


def mlp(cfg: ModelConfig) -> int:
  return fm.per_token(fm.mlp_kernels(cfg))


def backbone_token(cfg: ModelConfig, ctx: int) -> int:
  """One token through every backbone layer (no LM head)."""
  total = 0
  for t in cfg.layer_types:
    total += (attention_layer(cfg, ctx) if t == FULL else gdn_layer(cfg)) + mlp(cfg)
  return total


def lm_head(cfg: ModelConfig) -> int:
  return fm.lm_head_per_token(cfg)


def compressor(cfg: ModelConfig) -> int:
  return fm.per_token(fm.compressor_kernels(cfg))


def mtp_layer(cfg: ModelConfig, ctx: int) -> int:
  return fm.mtp_fc_per_token(cfg) + attention_layer(cfg, ctx) + mlp(cfg)


def confidence_head(cfg: ModelConfig) -> int:
  return fm.per_token(fm.confidence_kernels(cfg))


def per_step(cfg: ModelConfig, ctx_tokens: int) -> dict:
  """FLOPs per decode step at an uncompressed context of ctx_tokens (pipo attends over ctx_tokens / 2 pairs)."""
  ar = backbone_token(cfg, ctx_tokens) + lm_head(cfg)
  pipo_p1 = compressor(cfg) + backbone_token(cfg, ctx_tokens // 2) + lm_head(cfg)
  pipo_p2 = mtp_layer(cfg, ctx_tokens // 2) + lm_head(cfg)  # at tau <= 0 the confidence head does not run
  gate = confidence_head(cfg)
  return {
    "ar": ar,
    "pipo_tau_ge_1": pipo_p1,
    "pipo_tau_le_0": pipo_p1 + pipo_p2,
    "pipo_tau_lt_1": pipo_p1 + pipo_p2 + gate,
    # upper bounds of pipo/ar effective-token speed-up at equal FLOP throughput
    "bound_tau_ge_1": ar / pipo_p1,  # 1 token per step
    "bound_tau_lt_1_all_kept": 2 * ar / (pipo_p1 + pipo_p2 + gate),  # 2 tokens per step, gated
    "bound_tau_le_0": 2 * ar / (pipo_p1 + pipo_p2),  # every draft kept, no gate
    "bound_tau_lt_1_none_kept": ar / (pipo_p1 + pipo_p2 + gate),
  }
