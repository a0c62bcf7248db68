"""Hugging Face Qwen3.5 checkpoints <-> pipo_jax params (import here; export helpers for the exporter).

Import reads one or many safetensors shards tensor by tensor through a memory map and places each parameter
directly onto its target sharding, so the host never holds two copies of the model: a scanned parameter is
assembled as one stacked [R, ...] host array (one parameter at a time) and then handed to
`jax.make_array_from_callback`, which also works when a process only addresses part of the mesh.

Name mapping (torch Linear weights are [out, in]; our Dense kernels are [in, out]):
  model.embed_tokens.weight [V, D]      <-> embed_tokens/embedding
  model.norm.weight                     <-> norm/scale
  lm_head.weight [V, D]                 <-> lm_head/kernel (transposed; absent when tied)
  model.layers.{i}.<a>.<b>.weight       <-> layers/layer_{i % P}/<a>/<b>/{kernel|scale}[i // P], P = group len
  model.layers.{i}.linear_attn.conv1d.weight [C, 1, W] <-> .../linear_attn/conv1d/kernel [W, C]
  model.layers.{i}.linear_attn.{A_log,dt_bias} <-> same names (A_log kept as the log; the model takes -exp)
  mtp.fc.weight, mtp.{pre_fc_norm_embedding,pre_fc_norm_hidden,norm}.weight, mtp.layers.0.<...>
                                        <-> mtp/{fc/kernel, <norm>/scale, layer/<DecoderLayer params>}
Accepted prefixes: `model.language_model.` (the official VLM checkpoints) and `model.`; `model.visual.*`
is skipped (counted in the log).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from absl import logging
from flax import traverse_util

from pipo_jax import cli
from pipo_jax import config as config_lib
from pipo_jax.config import ModelConfig
from pipo_jax.models import qwen3_5
from pipo_jax.models.pipo import abstract_mtp_params

# ---------------------------------------------------------------------------------------------------
# safetensors reading (our own header parser: the numpy API of safetensors cannot return BF16)
# ---------------------------------------------------------------------------------------------------

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


class _SafetensorsFile:
  """Memory-mapped safetensors file: `entries[name] = (dtype str, shape)`, `get(name)` a zero-copy view."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self._data_start = 8 + n
    self._header = header
    self.entries = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    self._mmap = None

  def get(self, name: str) -> np.ndarray:
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    info = self._header[name]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    buf = self._mmap[self._data_start + start : self._data_start + end]
    return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _open_shards(model_dir: str) -> dict[str, _SafetensorsFile]:
  """name -> file holding it, from model.safetensors.index.json or the *.safetensors files present."""
  index_path = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{model_dir}: no *.safetensors files (and no model.safetensors.index.json)")
  by_name = {}
  for fname in files:
    shard = _SafetensorsFile(os.path.join(model_dir, fname))
    for name in shard.entries:
      by_name[name] = shard
  return by_name


# ---------------------------------------------------------------------------------------------------
# Name and layout mapping
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One param leaf: its HF tensor names (one per stacked repeat, or a single one) and the layout kind."""

  path: tuple
  hf_names: tuple
  kind: str  # "linear" (transpose), "conv" ([C,1,W] <-> [W,C]) or "same"
  stacked: bool


def _kind(rel_path: tuple) -> str:
  if rel_path[-2:] == ("conv1d", "kernel"):
    return "conv"
  if rel_path[-1] == "kernel":
    return "linear"
  return "same"


def _hf_rel_name(rel_path: tuple) -> str:
  """Our path inside a layer/module -> HF dotted name (kernel/scale/embedding -> weight)."""
  *mods, leaf = rel_path
  if leaf in ("kernel", "scale", "embedding"):
    leaf = "weight"
  return ".".join(list(mods) + [leaf])


def hf_to_ours(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return w.T
  if kind == "conv":
    return w[:, 0, :].T
  return w


def ours_to_hf(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return w.T
  if kind == "conv":
    return w.T[:, None, :]
  return w


def _backbone_leaves(param_paths, config: ModelConfig) -> list[_Leaf]:
  group, repeats = config.layer_pattern()
  leaves = []
  for path in param_paths:
    if path[0] == "layers":
      j = int(re.fullmatch(r"layer_(\d+)", path[1]).group(1))
      rel = path[2:]
      names = tuple(f"model.layers.{r * len(group) + j}.{_hf_rel_name(rel)}" for r in range(repeats))
      leaves.append(_Leaf(path, names, _kind(rel), True))
    elif path[0] == "lm_head":
      leaves.append(_Leaf(path, ("lm_head.weight",), "linear", False))
    else:
      leaves.append(_Leaf(path, (f"model.{_hf_rel_name(path)}",), _kind(path), False))
  return leaves


def _mtp_leaves(param_paths) -> list[_Leaf]:
  leaves = []
  for path in param_paths:
    if path[0] == "layer":
      name = f"mtp.layers.0.{_hf_rel_name(path[1:])}"
    else:
      name = f"mtp.{_hf_rel_name(path)}"
    leaves.append(_Leaf(path, (name,), _kind(path), False))
  return leaves


def _canonical_name(name: str) -> str | None:
  """Strip the VLM prefix; None for tensors we skip (the vision tower)."""
  if name.startswith("model.visual.") or name.startswith("visual."):
    return None
  if name.startswith("model.language_model."):
    return "model." + name[len("model.language_model.") :]
  return name


# ---------------------------------------------------------------------------------------------------
# Abstract params
# ---------------------------------------------------------------------------------------------------


def abstract_backbone_params(config: ModelConfig):
  """ShapeDtypeStruct tree of the (unboxed) backbone params."""
  return nn.meta.unbox(qwen3_5.boxed_backbone_params(config))


# ---------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedCheckpoint:
  config: ModelConfig
  params: Any  # backbone params tree (goes under params["backbone"])
  mtp: Any | None  # MTP params in our layout, or None when the checkpoint has no mtp.* tensors


def _expected_hf_shape(leaf: _Leaf, shape: tuple) -> tuple:
  per = shape[1:] if leaf.stacked else shape
  if leaf.kind == "linear":
    return tuple(reversed(per))
  if leaf.kind == "conv":
    return (per[1], 1, per[0])
  return tuple(per)


def _check(leaves, shapes_by_leaf, available: dict, what: str) -> list[str]:
  problems = []
  for leaf in leaves:
    want = _expected_hf_shape(leaf, shapes_by_leaf[leaf.path])
    for name in leaf.hf_names:
      if name not in available:
        problems.append(f"missing {name} (expected shape {list(want)}, for {what}/{'/'.join(leaf.path)})")
      elif tuple(available[name]) != want:
        problems.append(f"mis-shaped {name}: checkpoint {list(available[name])}, expected {list(want)}")
  return problems


def _load_leaves(leaves, abstract_flat, shardings_flat, read: Callable[[str], np.ndarray], what: str = "load"):
  out = {}
  progress = cli.Progress(len(leaves), what, "params")  # a 9B import reads for minutes
  for leaf in leaves:
    spec = abstract_flat[leaf.path]
    np_dtype = np.dtype(spec.dtype)
    host = np.empty(spec.shape, np_dtype)
    if leaf.stacked:
      for r, name in enumerate(leaf.hf_names):
        host[r] = hf_to_ours(read(name), leaf.kind).astype(np_dtype)
    else:
      host[...] = hf_to_ours(read(leaf.hf_names[0]), leaf.kind).astype(np_dtype)
    sharding = shardings_flat[leaf.path]
    out[leaf.path] = jax.make_array_from_callback(spec.shape, sharding, lambda idx, h=host: h[idx])
    del host
    progress.update()
  return traverse_util.unflatten_dict(out)


def _default_shardings(abstract):
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(lambda _: dev, abstract)


def load_qwen3_5(
  model_dir: str,
  overrides: ModelConfig | None = None,
  shardings: Any = None,
  mtp_shardings: Any = None,
  ignore_prefixes: tuple = (),
) -> LoadedCheckpoint:
  """Load an HF Qwen3.5 directory (text-only or VLM layout, tied or untied, sharded or not).

  overrides: ModelConfig whose non-None arch fields and numerics fields (dtype, param_dtype, scan_layers,
    remat, gdn_chunk_size) win over config.json.
  shardings: pytree of jax.sharding.Sharding matching the backbone params (e.g. from
    pipo_jax.sharding.param_shardings); default: the first local device. mtp_shardings likewise for MTP.
  ignore_prefixes: tensor-name prefixes read by someone else (e.g. the PIPO heads, hf_pipo.HEAD_PREFIXES);
    they are neither loaded nor reported as unexpected.
  Raises ValueError listing every missing, unexpected or mis-shaped tensor at once.
  """
  config = config_lib.load_hf_model_config(model_dir, overrides)
  files = _open_shards(model_dir)
  available, source = {}, {}
  skipped = 0
  for raw, shard in files.items():
    name = _canonical_name(raw)
    if name is not None and ignore_prefixes and name.startswith(tuple(ignore_prefixes)):
      continue
    if name is None:
      skipped += 1
      continue
    available[name] = shard.entries[raw][1]
    source[name] = (shard, raw)

  abstract = abstract_backbone_params(config)
  abstract_flat = traverse_util.flatten_dict(abstract)
  leaves = _backbone_leaves(abstract_flat, config)
  shapes = {p: tuple(a.shape) for p, a in abstract_flat.items()}
  problems = _check(leaves, shapes, available, "backbone")
  expected = {n for leaf in leaves for n in leaf.hf_names}

  mtp_names = sorted(n for n in available if n.startswith("mtp."))
  mtp_leaves = mtp_abstract_flat = None
  if mtp_names:
    mtp_abstract_flat = traverse_util.flatten_dict(abstract_mtp_params(config))
    mtp_leaves = _mtp_leaves(mtp_abstract_flat)
    problems += _check(mtp_leaves, {p: tuple(a.shape) for p, a in mtp_abstract_flat.items()}, available, "mtp")
    expected |= {n for leaf in mtp_leaves for n in leaf.hf_names}
  # rotary inv_freq buffers are not parameters; old exporters sometimes wrote them.
  unexpected = sorted(n for n in available if n not in expected and not n.endswith("rotary_emb.inv_freq"))
  problems += [f"unexpected {n} {list(available[n])}" for n in unexpected]
  if problems:
    raise ValueError(
      f"{model_dir}: checkpoint does not match the config ({len(problems)} problems):\n  " + "\n  ".join(problems)
    )
  if skipped:
    logging.info("%s: skipped %d vision-tower tensors", model_dir, skipped)

  def read(name):
    shard, raw = source[name]
    return shard.get(raw)

  if shardings is None:
    shardings = _default_shardings(abstract)
  params = _load_leaves(
    leaves, abstract_flat, traverse_util.flatten_dict(shardings), read, f"import {model_dir} backbone"
  )
  mtp = None
  if mtp_leaves is not None:
    if mtp_shardings is None:
      mtp_shardings = _default_shardings(traverse_util.unflatten_dict(mtp_abstract_flat))
    mtp = _load_leaves(
      mtp_leaves, mtp_abstract_flat, traverse_util.flatten_dict(mtp_shardings), read, f"import {model_dir} MTP"
    )
  return LoadedCheckpoint(config, params, mtp)


# ---------------------------------------------------------------------------------------------------
# Export (inverse mapping, reused by the PIPO exporter)
# ---------------------------------------------------------------------------------------------------


def _to_host(a) -> np.ndarray:
  return np.asarray(jax.device_get(a))


def backbone_to_hf_tensors(params, config: ModelConfig) -> dict[str, np.ndarray]:
  """Our backbone params -> {HF name (text-only `model.` prefix): torch-layout array}. No lm_head when tied."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  out = {}
  for leaf in _backbone_leaves(flat, config):
    value = _to_host(flat[leaf.path])
    if leaf.stacked:
      for r, name in enumerate(leaf.hf_names):
        out[name] = np.ascontiguousarray(ours_to_hf(value[r], leaf.kind))
    else:
      out[leaf.hf_names[0]] = np.ascontiguousarray(ours_to_hf(value, leaf.kind))
  return out


def mtp_to_hf_tensors(mtp_params) -> dict[str, np.ndarray]:
  """MTP params in our layout -> {`mtp.*` HF name: torch-layout array}."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(mtp_params))
  return {
    leaf.hf_names[0]: np.ascontiguousarray(ours_to_hf(_to_host(flat[leaf.path]), leaf.kind))
    for leaf in _mtp_leaves(flat)
  }
