"""One loader for every CLI: orbax checkpoints of this project, HF PIPO directories, plain Qwen3.5 HF dirs.

`load_model(path)` returns `(ModelConfig, params)` with the full PIPO params tree
{backbone, mtp, compressor, confidence_head}, LoRA adapters merged. Heads a checkpoint lacks (a plain
Qwen3.5 directory has no compressor or confidence head; a from-scratch model may have no MTP) are
initialised exactly as training initialises them, and the log says which.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from pipo_jax.config import Config, LoraConfig, ModelConfig, resolve_model_config
from pipo_jax.io import checkpoint as ckpt_lib
from pipo_jax.io import hf, hf_pipo
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


def config_from_saved(saved: dict, overrides: ModelConfig | None = None) -> tuple[ModelConfig, LoraConfig]:
  """(model config, lora config) from the Config JSON saved with an orbax checkpoint."""
  model = ModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved["model"].items()})
  if overrides is not None:
    for f in dataclasses.fields(ModelConfig):
      v = getattr(overrides, f.name)
      if v is not None and f.name != "preset" and v != getattr(ModelConfig(), f.name):
        model = dataclasses.replace(model, **{f.name: v})
  lora = LoraConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.get("lora", {}).items()})
  return resolve_model_config(model), lora


def load_model(path: str, overrides: ModelConfig | None = None, init_heads: bool = True) -> tuple[ModelConfig, dict]:
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
    raise FileNotFoundError(
      f"{path}: neither an orbax checkpoint (checkpoints/<step>/state) nor an HF directory (config.json + safetensors)"
    )
  if init_heads:
    params = init_missing(params, config)
  return config, params


def model_config_of(cfg: Config) -> ModelConfig:
  """The resolved model config of a run: from `checkpoint.init_from` when it is an HF dir, else the preset."""
  src = cfg.checkpoint.init_from
  if src and is_hf_dir(src):
    from pipo_jax.config import load_hf_model_config

    config = load_hf_model_config(src, cfg.model)
  elif src and is_orbax_checkpoint(src):
    config = config_from_saved(ckpt_lib.read_config(src), cfg.model)[0]
  else:
    return resolve_model_config(cfg.model)
  if config.pad_token_id is None or config.eos_token_id is None:  # a release config.json may leave them null
    tok_dir = find_tokenizer_dir(src, cfg.data.tokenizer_path if _has_tokenizer(cfg.data.tokenizer_path) else "")
    tok = None
    if tok_dir:
      from pipo_jax.data.tokenizer import load_tokenizer

      tok = load_tokenizer(tok_dir)
    config = resolve_special_ids(
      config, tok, read_generation_config(src if is_hf_dir(src) else tok_dir), where=src, need_pad=cfg.mode != "ar"
    )[0]
  return config


# ----------------------------------------------------------------------------------
# The CLI loader: model + tokenizer + special ids + sampling defaults, resolved once
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """What every CLI needs from `--checkpoint` (see `load_for_cli`).

  config: pad_token_id / eos_token_id resolved (never None when a tokenizer or an override gave them);
  tokenizer: a ChatTokenizer whose PAD / EOS agree with `config`, or None (token-id input only);
  stop_ids: ids that end generation (never PAD); generation: generation_config.json's sampling defaults;
  pipo_trained: the backbone was trained on pair latents (SFT/OPD run, or an HF dir with PIPO heads), so
  plain next-token (`ar`) decoding of it is not meaningful.
  """

  config: ModelConfig
  params: dict
  tokenizer: object | None
  stop_ids: tuple
  generation: dict
  pipo_trained: bool
  path: str
  tokenizer_dir: str


def _has_tokenizer(d: str) -> bool:
  return bool(d) and os.path.isfile(os.path.join(d, "tokenizer.json"))


def find_tokenizer_dir(checkpoint: str, tokenizer: str = "", _depth: int = 0) -> str:
  """The tokenizer directory of a checkpoint: `tokenizer` if given (must hold tokenizer.json); else the
  checkpoint directory itself (an HF dir, or a workdir holding `tokenizer/`); else, for an orbax checkpoint,
  the `data.tokenizer_path` / `checkpoint.init_from` its run was configured with (followed through chains of
  init_from, so an OPD student finds the tokenizer of the SFT run it started from). '' when none is found."""
  if tokenizer:
    if not _has_tokenizer(tokenizer):
      raise FileNotFoundError(f"--tokenizer={tokenizer}: no tokenizer.json there")
    return tokenizer
  if not checkpoint:
    return ""
  for d in (checkpoint, os.path.join(checkpoint, "tokenizer")):
    if _has_tokenizer(d):
      return d
  if _depth < 4 and is_orbax_checkpoint(checkpoint) and not is_hf_dir(checkpoint):
    saved = ckpt_lib.read_config(checkpoint) or {}
    step_dir = ckpt_lib.resolve_step_dir(checkpoint)
    workdir = os.path.dirname(os.path.dirname(step_dir))  # <workdir>/checkpoints/<step>
    if _has_tokenizer(os.path.join(workdir, "tokenizer")):
      return os.path.join(workdir, "tokenizer")
    run_cwd = _run_cwd(os.path.abspath(workdir), saved.get("workdir") or "")
    tok_path = _as_run_path((saved.get("data") or {}).get("tokenizer_path") or "", run_cwd)
    if _has_tokenizer(tok_path):
      return tok_path
    init_from = _as_run_path((saved.get("checkpoint") or {}).get("init_from") or "", run_cwd)
    if init_from and os.path.abspath(init_from) != os.path.abspath(checkpoint) and os.path.exists(init_from):
      return find_tokenizer_dir(init_from, "", _depth + 1)
  return ""


def _run_cwd(workdir_abs: str, saved_workdir: str) -> str:
  """The directory a run was started from, when its saved workdir is relative (e.g. `runs/demo/opd`) and the
  checkpoint's absolute path ends with it; '' otherwise."""
  w = os.path.normpath(saved_workdir) if saved_workdir and not os.path.isabs(saved_workdir) else ""
  return workdir_abs[: -len(w) - 1] if w and workdir_abs.endswith(os.sep + w) else ""


def _as_run_path(p: str, run_cwd: str) -> str:
  """A path saved in a run's config, as seen from here: as is when it exists, else relative to the run's cwd."""
  if not p or os.path.isabs(p) or os.path.exists(p) or not run_cwd:
    return p
  return os.path.join(run_cwd, p)


def read_generation_config(model_dir: str) -> dict:
  """Sampling defaults of generation_config.json ({} without one): temperature, top_k, top_p,
  presence_penalty (as this project's SamplingParams names them); `do_sample: false` means greedy."""
  path = os.path.join(model_dir, "generation_config.json") if model_dir else ""
  if not path or not os.path.isfile(path):
    return {}
  import json

  try:
    with open(path, encoding="utf-8") as f:
      g = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
  out = {k: g[k] for k in ("temperature", "top_k", "top_p", "presence_penalty") if g.get(k) is not None}
  if g.get("do_sample") is False:
    out["temperature"] = 0.0
  for k in ("eos_token_id", "pad_token_id"):
    if g.get(k) is not None:
      out[k] = g[k]
  return out


def _pipo_trained(path: str) -> bool:
  if not path:
    return False
  if is_orbax_checkpoint(path) and not is_hf_dir(path):
    if os.path.basename(ckpt_lib.resolve_step_dir(path)) == "0":  # `convert --from_hf`: imported, not trained
      return False
    return ((ckpt_lib.read_config(path) or {}).get("mode") or "ar") != "ar"
  import json

  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    return "compressor_type" in json.load(f)


def _first(v):
  return (v[0] if v else None) if isinstance(v, (list, tuple)) else v


def resolve_special_ids(
  config: ModelConfig,
  tok,
  generation: dict,
  pad_token_id: int | None = None,
  eos_token_id: int | None = None,
  where: str = "",
  need_pad: bool = True,
):
  """(config with pad/eos set, tokenizer agreeing with it, stop ids).

  PAD: `pad_token_id` (an explicit flag) -> config.json -> the tokenizer files (tokenizer_config.json
  `pad_token`, else `<|endoftext|>`) -> generation_config.json -> a ValueError (when `need_pad`).
  EOS likewise with `eos_token_id`. Stop ids: the tokenizer's (`<|im_end|>` and EOS) or EOS, never PAD.
  """
  pad = pad_token_id if pad_token_id is not None else config.pad_token_id
  if pad is None and tok is not None:
    pad = tok.special.pad
  if pad is None:
    pad = _first(generation.get("pad_token_id"))
  if pad is None and need_pad:
    raise ValueError(
      f"{where}: no PAD id: config.json has no pad_token_id and no tokenizer was found "
      "(give --tokenizer=DIR or --pad_token_id=N)"
    )
  eos = eos_token_id if eos_token_id is not None else config.eos_token_id
  if eos is None and tok is not None:
    eos = tok.special.eos
  if eos is None:
    eos = _first(generation.get("eos_token_id"))
  config = dataclasses.replace(config, pad_token_id=pad, eos_token_id=eos)
  if tok is not None:
    if tok.vocab_size > config.vocab_size:
      raise ValueError(
        f"{tok.path}: the tokenizer has {tok.vocab_size} ids but the model {where} only {config.vocab_size}"
      )
    if pad is not None and tok.special.pad != pad:
      logging.warning("%s: PAD id %d of the model config overrides the tokenizer's %d", where, pad, tok.special.pad)
      tok = tok.with_special(pad=pad)
    stop = set(tok.special.stop_ids) | ({eos} if eos is not None else set())
  else:
    stop = {eos} if eos is not None else set()
  return config, tok, tuple(sorted(stop - {pad}))


def load_for_cli(
  checkpoint: str = "",
  tokenizer: str = "",
  preset: str = "",
  seed: int = 0,
  overrides: ModelConfig | None = None,
  init_heads: bool = True,
  pad_token_id: int | None = None,
  eos_token_id: int | None = None,
  need_tokenizer: bool = False,
  need_pad: bool = True,
) -> LoadedModel:
  """The one loader of the CLIs: `checkpoint` (orbax workdir / step dir, HF PIPO or plain Qwen3.5 directory)
  or, without one, `preset` initialised at random with `seed`. Tokenizer: `find_tokenizer_dir`. Special ids:
  `resolve_special_ids`. Every failure is one ValueError / FileNotFoundError naming the path."""
  if checkpoint:
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f"--checkpoint={checkpoint}: no such file or directory")
    if not is_hf_dir(checkpoint) and not is_orbax_checkpoint(checkpoint):
      raise FileNotFoundError(
        f"{checkpoint}: neither an HF directory (config.json + *.safetensors) nor an orbax "
        "checkpoint (checkpoints/<step>/state/)"
      )
    try:
      config, params = load_model(checkpoint, overrides, init_heads=init_heads)
    except KeyError as e:  # a config.json that is not a Qwen3.5 one
      raise ValueError(f"{checkpoint}: not a Qwen3.5 checkpoint (missing {e})") from None
  elif preset:
    from pipo_jax.models.pipo import init_pipo_params

    config = resolve_model_config(dataclasses.replace(overrides or ModelConfig(), preset=preset))
    params = init_pipo_params(config, jax.random.PRNGKey(seed))
  else:
    raise ValueError("give --checkpoint=DIR, or --preset=NAME for a random-initialised model")
  tok_dir = find_tokenizer_dir(checkpoint, tokenizer)
  tok = None
  if tok_dir:
    from pipo_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
  elif need_tokenizer:
    raise FileNotFoundError(
      f"{checkpoint or preset}: no tokenizer.json found with the checkpoint or its run's config; pass --tokenizer=DIR"
    )
  model_dir = checkpoint if checkpoint and is_hf_dir(checkpoint) else tok_dir
  generation = read_generation_config(model_dir)
  config, tok, stop = resolve_special_ids(
    config, tok, generation, pad_token_id, eos_token_id, where=checkpoint or f"preset {preset}", need_pad=need_pad
  )
  return LoadedModel(config, params, tok, stop, generation, _pipo_trained(checkpoint), checkpoint, tok_dir)


def warn_if_pipo_in_ar(loaded: LoadedModel, mode: str) -> None:
  """Say once that plain next-token decoding of a PIPO-trained backbone is not meaningful."""
  if loaded.pipo_trained and mode == "ar":
    logging.warning(
      "%s is a PIPO checkpoint: its backbone reads pair latents, so --decode=ar (plain next-token "
      "decoding) produces text the model was not trained for; use --decode=pipo",
      loaded.path,
    )
