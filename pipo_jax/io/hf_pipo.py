"""PIPO checkpoints in Hugging Face format: the heads' name mapping, a safetensors writer, and export.

Layout of an exported directory (docs/formats.md#hugging-face-export, the key layout of a merged reference PIPO
checkpoint, so the reference's loaders and transformers read it):
  model.language_model.*      the backbone (text tower) -- exactly what transformers' Qwen3_5ForCausalLM
                              loads (5.x strips `language_model.` on load)
  lm_head.weight              only when untied
  mtp.*                       native Qwen3.5 MTP layout (15 tensors)
  compressor.*                linear: compressor.linear.{weight,bias}; mlp / mlp_residual:
                              compressor.mlp.{0,2}.{weight,bias}; gated: compressor.{alpha,beta}.{weight,bias},
                              compressor.diff.weight
  confidence_head.*           norm.weight [2D], fc1.weight [D, 2D], fc2.weight [1, D]
  config.json                 flat qwen3_5_text config + compressor_type, mtp_num_hidden_layers, pad_token_id
  tokenizer files             copied from the source model directory when given
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from pipo_jax import cli, guards
from pipo_jax.config import ModelConfig
from pipo_jax.io.hf import _open_shards, backbone_to_hf_tensors, mtp_to_hf_tensors

HEAD_PREFIXES = ("compressor.", "confidence_head.")
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "generation_config.json",
  "chat_template.jinja",
)
_SHARD_BYTES = 4 << 30


# ---------------------------------------------------------------------------------------------------
# Heads: our params <-> HF names
# ---------------------------------------------------------------------------------------------------


def _head_hf_name(top: str, path: tuple) -> str:
  """('mlp_0', 'kernel') under 'compressor' -> 'compressor.mlp.0.weight'."""
  *mods, leaf = path
  mods = [m.replace("mlp_", "mlp.") for m in mods]
  leaf = "weight" if leaf in ("kernel", "scale") else leaf
  return ".".join([top] + mods + [leaf])


def heads_to_hf_tensors(params: dict) -> dict[str, np.ndarray]:
  """compressor / confidence_head params -> {HF name: torch-layout array} (Dense kernels transposed)."""
  out = {}
  for top in ("compressor", "confidence_head"):
    if top not in params:
      continue
    for path, value in traverse_util.flatten_dict(nn.meta.unbox(params[top])).items():
      arr = np.asarray(jax.device_get(value))
      out[_head_hf_name(top, path)] = np.ascontiguousarray(arr.T if path[-1] == "kernel" else arr)
  return out


def heads_from_hf(model_dir: str, abstract_heads: dict) -> dict | None:
  """Read compressor.* / confidence_head.* into the layout of `abstract_heads` ({'compressor': ...,
  'confidence_head': ...} of ShapeDtypeStructs). None when the directory has no head tensors at all;
  a partial or mis-shaped set raises one error naming every problem."""
  shards = _open_shards(model_dir)
  present = {n for n in shards if n.startswith(HEAD_PREFIXES)}
  if not present:
    return None
  out, problems, used = {}, [], set()
  for top, tree in abstract_heads.items():
    flat = {}
    for path, spec in traverse_util.flatten_dict(tree).items():
      name = _head_hf_name(top, path)
      want = tuple(reversed(spec.shape)) if path[-1] == "kernel" else tuple(spec.shape)
      if name not in shards:
        problems.append(f"missing {name} (expected {list(want)})")
        continue
      arr = shards[name].get(name)
      if tuple(arr.shape) != want:
        problems.append(f"mis-shaped {name}: checkpoint {list(arr.shape)}, expected {list(want)}")
        continue
      used.add(name)
      flat[path] = np.asarray(arr.T if path[-1] == "kernel" else arr).astype(spec.dtype)
    out[top] = traverse_util.unflatten_dict(flat) if flat else {}
  problems += [f"unexpected {n}" for n in sorted(present - used)]
  if problems:
    raise ValueError(
      f"{model_dir}: PIPO head tensors do not match config (compressor_type?):\n  " + "\n  ".join(problems)
    )
  return out


# ---------------------------------------------------------------------------------------------------
# safetensors writer (ours: the numpy API of safetensors has no bfloat16)
# ---------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
  np.dtype(np.float32): "F32",
  np.dtype(np.float16): "F16",
  np.dtype(ml_dtypes.bfloat16): "BF16",
  np.dtype(np.int32): "I32",
  np.dtype(np.int64): "I64",
}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], progress: cli.Progress | None = None) -> None:
  header, offset = {}, 0
  names = sorted(tensors)
  for name in names:
    arr = tensors[name]
    if arr.dtype not in _DTYPE_NAMES:
      raise ValueError(f"{name}: cannot write dtype {arr.dtype} to safetensors")
    header[name] = {
      "dtype": _DTYPE_NAMES[arr.dtype],
      "shape": list(arr.shape),
      "data_offsets": [offset, offset + arr.nbytes],
    }
    offset += arr.nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name in names:
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
      if progress is not None:
        progress.update()


def write_sharded(out_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = _SHARD_BYTES) -> list:
  """One model.safetensors, or model-0000i-of-0000n.safetensors + index when over max_shard_bytes."""
  total = sum(a.nbytes for a in tensors.values())
  progress = cli.Progress(len(tensors), f"write {out_dir} ({total / 2**30:.2f} GiB)", "tensors")
  if total <= max_shard_bytes:
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, progress)
    return ["model.safetensors"]
  groups, cur, size = [], {}, 0
  for name in sorted(tensors):
    if cur and size + tensors[name].nbytes > max_shard_bytes:
      groups.append(cur)
      cur, size = {}, 0
    cur[name] = tensors[name]
    size += tensors[name].nbytes
  groups.append(cur)
  files, weight_map = [], {}
  for i, group in enumerate(groups):
    fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    write_safetensors(os.path.join(out_dir, fname), group, progress)
    files.append(fname)
    weight_map.update({n: fname for n in group})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  return files


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


def to_hf_tensors(params: dict, config: ModelConfig, vlm_prefix: bool = True) -> dict[str, np.ndarray]:
  """All tensors of a (LoRA-merged) PIPO or plain params tree, in the reference's merged-checkpoint keys."""
  tensors = backbone_to_hf_tensors(params["backbone"], config)
  if vlm_prefix:
    tensors = {
      ("model.language_model." + n[len("model.") :] if n.startswith("model.") else n): v for n, v in tensors.items()
    }
  if params.get("mtp"):
    tensors.update(mtp_to_hf_tensors(params["mtp"]))
  tensors.update(heads_to_hf_tensors(params))
  return tensors


def export_hf(
  params: dict,
  config: ModelConfig,
  out_dir: str,
  tokenizer_dir: str = "",
  max_shard_bytes: int = _SHARD_BYTES,
  overwrite: bool = False,
  require_tokenizer: bool = True,
) -> list:
  """Write an HF directory for `params` (must hold no LoRA adapters: merge first). Returns file names.

  Guarded and atomic: non-finite params are refused before anything is written; a non-empty `out_dir` needs
  `overwrite`; without a tokenizer (`tokenizer_dir` lacking tokenizer.json) the export is refused unless
  `require_tokenizer=False`. The directory is written to a temporary sibling, read back and validated
  (`validate_hf_dir`: every tensor's name, shape, dtype and finiteness, config.json, tokenizer), and only then
  renamed into place, so `out_dir` never holds a half-written or mixed export (no stale index file
  beside new shards).
  """
  if "lora" in params:
    raise ValueError("export_hf needs merged params; call pipo_jax.models.lora.materialize first")
  guards.assert_finite(params, f"export to {out_dir} refused")
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} is not empty: pass --overwrite to replace it")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a directory")
  has_tok = bool(tokenizer_dir) and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json"))
  if require_tokenizer and not has_tok:
    raise FileNotFoundError(
      f"no tokenizer.json to export (tokenizer dir {tokenizer_dir!r}): give --tokenizer_dir or "
      "pass --allow_missing_tokenizer to export the weights alone"
    )
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tensors = to_hf_tensors(params, config)
    files = _write_hf_dir(params, tensors, config, tmp, tokenizer_dir if has_tok else "", max_shard_bytes)
    validate_hf_dir(
      tmp, {n: (a.dtype, a.shape) for n, a in tensors.items()}, config, require_tokenizer=require_tokenizer
    )
    del tensors
    if os.path.exists(out_dir):
      old = f"{out_dir}.old-{os.getpid()}"
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return files


def _write_hf_dir(
  params: dict, tensors: dict, config: ModelConfig, out_dir: str, tokenizer_dir: str, max_shard_bytes: int
) -> list:
  os.makedirs(out_dir, exist_ok=True)
  is_pipo = "compressor" in params
  files = write_sharded(out_dir, tensors, max_shard_bytes)
  hf_config = config.to_hf_dict("Qwen3_5ForCausalPIPO" if is_pipo else "Qwen3_5ForCausalLM")
  if not is_pipo:
    hf_config.pop("compressor_type")
  if not params.get("mtp"):
    hf_config["mtp_num_hidden_layers"] = 0
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(out_dir, name))
        files.append(name)
  return files


def validate_hf_dir(model_dir: str, expected: dict, config: ModelConfig, require_tokenizer: bool = True) -> None:
  """Read an exported directory back: every expected tensor present with its dtype and shape and finite (one
  memory-mapped tensor at a time), no extra tensor, config.json giving `config`'s architecture, tokenizer.json
  present when required. Raises ValueError naming the first problem."""
  from pipo_jax.config import _ARCH_FIELDS, load_hf_model_config

  shards = _open_shards(model_dir)
  missing = sorted(set(expected) - set(shards))
  extra = sorted(set(shards) - set(expected))
  if missing or extra:
    raise ValueError(
      f"{model_dir}: read back {len(missing)} tensors missing ({missing[:3]}), {len(extra)} unexpected ({extra[:3]})"
    )
  progress = cli.Progress(len(expected), f"validate {model_dir}", "tensors")
  for name, (dtype, shape) in expected.items():
    progress.update()
    arr = shards[name].get(name)
    if arr.dtype != dtype or tuple(arr.shape) != tuple(shape):
      raise ValueError(f"{model_dir}: {name} reads back as {arr.dtype}{list(arr.shape)}, wrote {dtype}{list(shape)}")
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16:
      if not np.isfinite(arr.astype(np.float32)).all():
        raise ValueError(f"{model_dir}: {name} reads back with non-finite values")
  back = load_hf_model_config(model_dir)
  diff = [
    k
    for k in _ARCH_FIELDS
    if k not in ("compressor_random_init", "compressor_type", "mtp_num_hidden_layers", "pad_token_id")
    and getattr(back, k) != getattr(config, k)
  ]
  if diff:
    raise ValueError(f"{model_dir}: config.json reads back with other {diff}")
  if require_tokenizer and not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
    raise ValueError(f"{model_dir}: tokenizer.json missing after the copy")
