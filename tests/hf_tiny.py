"""Tiny random HF Qwen3.5 models for the parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

LIN, FULL = "linear_attention", "full_attention"


def make_hf_model(layer_types, tie: bool, seed: int = 0):
  """A random Qwen3_5ForCausalLM with every 1-D param perturbed by 0.1*N(0,1) (exercises the (1+w) norms,
  the plain-scale gated norm, dt_bias and A_log)."""
  cfg = transformers.Qwen3_5TextConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=len(layer_types),
    layer_types=list(layer_types),
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    max_position_embeddings=512,
    tie_word_embeddings=tie,
    rope_parameters={
      "rope_type": "default",
      "rope_theta": 1e7,
      "partial_rotary_factor": 0.25,
      "mrope_section": [1, 1, 0],
      "mrope_interleaved": True,
    },
  )
  torch.manual_seed(seed)
  model = transformers.Qwen3_5ForCausalLM(cfg).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def write_jsonl(path, records):
  import json

  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
