"""Matmul FLOPs per decode step, for the upper bound of the PIPO speed-up over regular decoding.

A matmul of [m, k] x [k, n] costs 2mkn. Elementwise work, norms and softmax are ignored (they are small
next to the projections). `ctx` is the number of key slots a full-attention layer reads.
"""

from __future__ import annotations

from pipo_jax.config import FULL, ModelConfig


def attention_layer(cfg: ModelConfig, ctx: int) -> int:
  D, H, G, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  proj = 2 * D * (2 * H * K) + 2 * 2 * D * (G * K) + 2 * H * K * D  # q (with gate), k, v, o
  return proj + 2 * 2 * ctx * H * K  # scores and weighted values


def gdn_layer(cfg: ModelConfig) -> int:
  D, Hv, dk, dv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
  C = cfg.linear_conv_dim
  proj = 2 * D * C + 2 * D * Hv * dv + 2 * 2 * D * Hv + 2 * Hv * dv * D  # qkv, z, b, a, out
  recur = 3 * 2 * Hv * dk * dv  # S^T k, the rank-1 write, S^T q (one token)
  return proj + 2 * cfg.linear_conv_kernel_dim * C + recur


def mlp(cfg: ModelConfig) -> int:
  return 3 * 2 * cfg.hidden_size * cfg.intermediate_size


def backbone_token(cfg: ModelConfig, ctx: int) -> int:
  """One token through every backbone layer (no LM head)."""
  total = 0
  for t in cfg.layer_types:
    total += (attention_layer(cfg, ctx) if t == FULL else gdn_layer(cfg)) + mlp(cfg)
  return total


def lm_head(cfg: ModelConfig) -> int:
  return 2 * cfg.hidden_size * cfg.vocab_size


def compressor(cfg: ModelConfig) -> int:
  D = cfg.hidden_size
  kind = cfg.compressor_type
  if kind == "linear":
    return 2 * 2 * D * D
  if kind in ("mlp", "mlp_residual"):
    return 2 * 2 * D * 2 * D + 2 * 2 * D * D
  return 2 * D * D + 2 * 2 * D  # gated: the (a - b) projection and two gates


def mtp_layer(cfg: ModelConfig, ctx: int) -> int:
  return 2 * 2 * cfg.hidden_size * cfg.hidden_size + attention_layer(cfg, ctx) + mlp(cfg)


def confidence_head(cfg: ModelConfig) -> int:
  D = cfg.hidden_size
  return 2 * 2 * D * D + 2 * D


def per_step(cfg: ModelConfig, ctx_tokens: int) -> dict:
  """FLOPs per decode step at an uncompressed context of ctx_tokens (pipo attends over ctx_tokens / 2 pairs)."""
  ar = backbone_token(cfg, ctx_tokens) + lm_head(cfg)
  pipo_p1 = compressor(cfg) + backbone_token(cfg, ctx_tokens // 2) + lm_head(cfg)
  pipo_p2 = mtp_layer(cfg, ctx_tokens // 2) + confidence_head(cfg) + lm_head(cfg)
  return {
    "ar": ar,
    "pipo_tau_ge_1": pipo_p1,
    "pipo_tau_lt_1": pipo_p1 + pipo_p2,
    # upper bounds of pipo/ar effective-token speed-up at equal FLOP throughput
    "bound_tau_ge_1": ar / pipo_p1,  # 1 token per step
    "bound_tau_lt_1_all_kept": 2 * ar / (pipo_p1 + pipo_p2),  # 2 tokens per step
    "bound_tau_lt_1_none_kept": ar / (pipo_p1 + pipo_p2),
  }
