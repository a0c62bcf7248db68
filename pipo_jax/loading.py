"""One loader for every CLI: orbax checkpoints of this project, HF PIPO directories, plain Qwen3.5 HF dirs.

`load_model(path)` returns `(ModelConfig, params)` with the full PIPO params tree
{backbone, mtp, compressor, confidence_head}, LoRA adapters merged. Heads a checkpoint lacks (a plain
Qwen3.5 directory has no compressor or confidence head; a from-scratch model may have no MTP) are
initialised exactly as training initialises them, and the log says which.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
from absl import logging

from pipo_jax import checkpoint as ckpt_lib
from pipo_jax import hf, hf_pipo
from pipo_jax.config import Config, LoraConfig, ModelConfig, resolve_model_config
from pipo_jax.models import lora as lora_lib
from pipo_jax.models.pipo import abstract_pipo_params, init_pipo_params


def is_orbax_checkpoint(path: str) -> bool:
  try:
    ckpt_lib.resolve_step_dir(path)
    return True
  except FileNotFoundError:
    return False


def is_hf_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json"))


def init_missing(params: dict, config: ModelConfig, seed: int = 0) -> dict:
  """Fill the PIPO heads a checkpoint does not have with their training-time init."""
  missing = [k for k in ("mtp", "compressor", "confidence_head") if not params.get(k)]
  if not missing:
    return params
  fresh = init_pipo_params(config, jax.random.PRNGKey(seed))
  logging.info("initialising PIPO modules absent from the checkpoint: %s", missing)
  return dict(params, **{k: fresh[k] for k in missing})


def config_from_saved(saved: dict, overrides: Optional[ModelConfig] = None) -> tuple[ModelConfig, LoraConfig]:
  """(model config, lora config) from the Config JSON saved with an orbax checkpoint."""
  model = ModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved["model"].items()})
  if overrides is not None:
    for f in dataclasses.fields(ModelConfig):
      v = getattr(overrides, f.name)
      if v is not None and f.name != "preset" and v != getattr(ModelConfig(), f.name):
        model = dataclasses.replace(model, **{f.name: v})
  lora = LoraConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.get("lora", {}).items()})
  return resolve_model_config(model), lora


def load_model(path: str, overrides: Optional[ModelConfig] = None, init_heads: bool = True) -> tuple[ModelConfig, dict]:
  """(config, params) from an orbax workdir / step dir, or an HF (PIPO or plain Qwen3.5) directory."""
  if is_orbax_checkpoint(path) and not is_hf_dir(path):
    saved = ckpt_lib.read_config(path)
    if saved is None:
      raise ValueError(f"{path}: checkpoint was saved without its config; cannot rebuild the model")
    config, lora_cfg = config_from_saved(saved, overrides)
    params = ckpt_lib.restore_params(path)
    params = lora_lib.materialize(params, lora_cfg)
  elif is_hf_dir(path):
    loaded = hf.load_qwen3_5(path, overrides, ignore_prefixes=hf_pipo.HEAD_PREFIXES)
    config = loaded.config
    params = {"backbone": loaded.params}
    if loaded.mtp is not None:
      params["mtp"] = loaded.mtp
    abstract = abstract_pipo_params(config)
    heads = hf_pipo.heads_from_hf(path, {k: abstract[k] for k in ("compressor", "confidence_head")})
    if heads is not None:
      params.update(heads)
  else:
    raise FileNotFoundError(f"{path}: neither an orbax checkpoint (checkpoints/<step>/state) nor an HF "
                            f"directory (config.json + safetensors)")
  if init_heads:
    params = init_missing(params, config)
  return config, params


def model_config_of(cfg: Config) -> ModelConfig:
  """The resolved model config of a run: from `checkpoint.init_from` when it is an HF dir, else the preset."""
  src = cfg.checkpoint.init_from
  if src and is_hf_dir(src):
    from pipo_jax.config import load_hf_model_config
    return load_hf_model_config(src, cfg.model)
  if src and is_orbax_checkpoint(src):
    return config_from_saved(ckpt_lib.read_config(src), cfg.model)[0]
  return resolve_model_config(cfg.model)
