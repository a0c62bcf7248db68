"""Model and tokenizer loading for the generation CLIs (flag-free, so several CLIs can import it)."""

from __future__ import annotations

import os

import jax

from pipo_jax.config import ModelConfig, resolve_model_config


def load(checkpoint: str, preset: str, seed: int = 0):
  """(config, params): a checkpoint through pipo_jax.loading.load_model, or a random-initialised preset
  (compressor / heads at their training init)."""
  if checkpoint:
    from pipo_jax.loading import load_model
    return load_model(checkpoint)
  if not preset:
    raise ValueError("give --checkpoint, or --preset=NAME --init=random")
  from pipo_jax.models.pipo import init_pipo_params
  cfg = resolve_model_config(ModelConfig(preset=preset))
  return cfg, init_pipo_params(cfg, jax.random.PRNGKey(seed))


def load_tokenizer_or_none(path: str):
  """The ChatTokenizer of a directory holding tokenizer.json, else None."""
  if not path or not os.path.exists(os.path.join(path, "tokenizer.json")):
    return None
  from pipo_jax.data.tokenizer import load_tokenizer
  return load_tokenizer(path)
