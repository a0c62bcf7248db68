"""Typed configuration for every pipo_jax entry point.

One top-level dataclass, `Config`, is exposed to the CLIs through
`ml_collections.config_flags.DEFINE_config_dataclass`, so every field can be set
from a flagfile or the command line as `--config.section.field=value`.

Model architecture fields are Optional: `None` means "take it from the preset named
by `model.preset`, or from the checkpoint's config.json". `resolve_model_config`
turns such a partial config into a fully specified one; model code only ever sees
resolved configs.
"""

# No `from __future__ import annotations`: config_flags needs real field types.

import dataclasses
import json
import os
from typing import Any

import numpy as np

LINEAR = "linear_attention"
FULL = "full_attention"


# ----------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
  """Qwen3.5 dense text backbone plus the PIPO heads.

  Field names follow the HF `qwen3_5_text` config.json where one exists.
  """

  preset: str | None = "tiny"  # a key of PRESETS, or None when read from a checkpoint
  vocab_size: int | None = None
  hidden_size: int | None = None
  intermediate_size: int | None = None
  num_hidden_layers: int | None = None
  layer_types: tuple | None = None  # of LINEAR / FULL; None -> every 4th layer full
  full_attention_interval: int | None = None
  num_attention_heads: int | None = None
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  linear_num_key_heads: int | None = None
  linear_num_value_heads: int | None = None
  linear_key_head_dim: int | None = None
  linear_value_head_dim: int | None = None
  linear_conv_kernel_dim: int | None = None
  rope_theta: float | None = None
  partial_rotary_factor: float | None = None
  rms_norm_eps: float | None = None
  tie_word_embeddings: bool | None = None
  max_position_embeddings: int | None = None
  initializer_range: float | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  # MTP head: number of MTP decoder layers (Qwen3.5 ships 1; 0 disables the head).
  mtp_num_hidden_layers: int | None = None
  # PIPO heads.
  compressor_type: str | None = None  # linear | mlp | gated | mlp_residual
  compressor_random_init: bool | None = None  # ablation: skip the identity-style init
  # Numerics and compilation (not part of HF config.json).
  dtype: str = "float32"  # compute dtype of matmuls: float32 | bfloat16
  param_dtype: str = "float32"  # storage dtype of params
  scan_layers: bool = True  # scan over repeating layer groups (compile time independent of depth)
  remat: str = "none"  # none | full | dots: rematerialisation policy per layer group
  gdn_chunk_size: int = 64  # Gated DeltaNet chunk length in the parallel (prefill) form
  # Full attention runs blocked (flash-style online softmax, models/flash.py) with this query/key block when a
  # call has more than this many new tokens: O(block^2) score memory instead of O(T x S). 0 = always dense.
  attention_block: int = 512

  # -- derived quantities (valid on resolved configs) --------------------------------
  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def linear_key_dim(self) -> int:
    return self.linear_num_key_heads * self.linear_key_head_dim

  @property
  def linear_value_dim(self) -> int:
    return self.linear_num_value_heads * self.linear_value_head_dim

  @property
  def linear_conv_dim(self) -> int:
    return 2 * self.linear_key_dim + self.linear_value_dim

  def layer_pattern(self) -> tuple[tuple, int]:
    """(group, repeats): the shortest prefix `group` with layer_types == group * repeats."""
    types = tuple(self.layer_types)
    n = len(types)
    for period in range(1, n + 1):
      if n % period == 0 and types == types[:period] * (n // period):
        return types[:period], n // period
    raise AssertionError("unreachable")

  def to_hf_dict(self, architecture: str = "Qwen3_5ForCausalLM") -> dict:
    """A flat `qwen3_5_text` config.json dict (PIPO fields included)."""
    d = {
      "architectures": [architecture],
      "model_type": "qwen3_5_text",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_hidden_layers,
      "layer_types": list(self.layer_types),
      "full_attention_interval": self.full_attention_interval,
      "num_attention_heads": self.num_attention_heads,
      "num_key_value_heads": self.num_key_value_heads,
      "head_dim": self.head_dim,
      "linear_num_key_heads": self.linear_num_key_heads,
      "linear_num_value_heads": self.linear_num_value_heads,
      "linear_key_head_dim": self.linear_key_head_dim,
      "linear_value_head_dim": self.linear_value_head_dim,
      "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "rms_norm_eps": self.rms_norm_eps,
      "tie_word_embeddings": self.tie_word_embeddings,
      "max_position_embeddings": self.max_position_embeddings,
      "initializer_range": self.initializer_range,
      "rope_parameters": {
        "rope_type": "default",
        "rope_theta": self.rope_theta,
        "partial_rotary_factor": self.partial_rotary_factor,
        "mrope_section": _mrope_section(self.rotary_dim),
        "mrope_interleaved": True,
      },
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
      "mtp_num_hidden_layers": self.mtp_num_hidden_layers,
      "compressor_type": self.compressor_type,
      "use_cache": True,
      "dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
    }
    return d


def _mrope_section(rotary_dim: int) -> list:
  """T/H/W split of rotary_dim/2 frequency slots as Qwen ships it ([11, 11, 10] for 32)."""
  half = rotary_dim // 2
  t = h = round(half * 11 / 32)
  return [t, h, half - t - h]


_ARCH_FIELDS = [
  f.name
  for f in dataclasses.fields(ModelConfig)
  if f.name not in ("preset", "dtype", "param_dtype", "scan_layers", "remat", "gdn_chunk_size", "attention_block")
]

_COMMON = dict(
  rope_theta=10_000_000.0,
  partial_rotary_factor=0.25,
  rms_norm_eps=1e-6,
  linear_conv_kernel_dim=4,
  initializer_range=0.02,
  mtp_num_hidden_layers=1,
  compressor_type="mlp",
  compressor_random_init=False,
  full_attention_interval=4,
)


def _preset(**kw) -> dict:
  d = dict(_COMMON)
  d.update(kw)
  return d


# Values of the released models' config.json; tiny ones for tests and CPU runs.
PRESETS: dict[str, dict] = {
  "qwen3_5_4b": _preset(
    vocab_size=248320,
    hidden_size=2560,
    intermediate_size=9216,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=262144,
    eos_token_id=248044,
    pad_token_id=248044,
  ),
  "qwen3_5_9b": _preset(
    vocab_size=248320,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    tie_word_embeddings=False,
    max_position_embeddings=262144,
    eos_token_id=248044,
    pad_token_id=248044,
  ),
  # The 4B layer structure (32 layers, 3:1 hybrid, all head counts and head dims) at
  # reduced width and vocabulary: for CPU speed measurements.
  "qwen3_5_4b_narrow": _preset(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=262144,
    eos_token_id=1,
    pad_token_id=1,
  ),
  # The tiny test model (tests, CPU runs).
  "tiny": _preset(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    eos_token_id=1,
    pad_token_id=1,
  ),
  # The CPU miniature's teacher (experiments/demo.sh): hybrid [lin, full, lin, full] at a width a 2-core CPU
  # trains in minutes. Two full-attention layers rather than Qwen3.5's 3:1: the task's first worked line
  # copies the question, and with one full layer in four the model kept miscopying it (17 % avg@4 after
  # 500 steps). Vocab 128 covers the synthetic task's character tokenizer (pad <|endoftext|> = 1, eos
  # <|im_end|> = 3, as pipo_jax/data/synthetic.py numbers them).
  "demo_teacher": _preset(
    vocab_size=128,
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=4,
    layer_types=(LINEAR, FULL, LINEAR, FULL),
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    eos_token_id=3,
    pad_token_id=1,
  ),
  # A tiny model whose layer pattern is not 3:1 (and not periodic in 4).
  "tiny_mixed": _preset(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    layer_types=(LINEAR, FULL, LINEAR, LINEAR, FULL),
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    eos_token_id=1,
    pad_token_id=1,
  ),
}


def default_layer_types(num_layers: int, interval: int) -> tuple:
  return tuple(FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers))


def resolve_model_config(cfg: ModelConfig, base: dict | None = None) -> ModelConfig:
  """Fill every None architecture field from `base` (e.g. a checkpoint's config) or the preset.

  Explicit (non-None) fields of `cfg` always win. Raises ValueError naming what is missing.
  """
  if base is None:
    if cfg.preset is None:
      base = {}
    elif cfg.preset not in PRESETS:
      raise ValueError(f"model.preset={cfg.preset!r} is unknown; choose one of {sorted(PRESETS)}")
    else:
      base = PRESETS[cfg.preset]
  values = {}
  for name in _ARCH_FIELDS:
    v = getattr(cfg, name)
    values[name] = base.get(name) if v is None else v
  if values["full_attention_interval"] is None:
    values["full_attention_interval"] = 4
  if values["layer_types"] is None and values["num_hidden_layers"] is not None:
    values["layer_types"] = default_layer_types(values["num_hidden_layers"], values["full_attention_interval"])
  for k, v in _COMMON.items():
    if values.get(k) is None:
      values[k] = v
  missing = [k for k, v in values.items() if v is None and k not in ("eos_token_id", "pad_token_id")]
  if missing:
    raise ValueError(f"model config is missing {missing}: set model.preset or give a checkpoint with config.json")
  values["layer_types"] = tuple(values["layer_types"])
  if len(values["layer_types"]) != values["num_hidden_layers"]:
    raise ValueError(
      f"model.layer_types has {len(values['layer_types'])} entries but num_hidden_layers={values['num_hidden_layers']}"
    )
  bad = [t for t in values["layer_types"] if t not in (LINEAR, FULL)]
  if bad:
    raise ValueError(f"model.layer_types holds unknown types {sorted(set(bad))}; expected {LINEAR!r} or {FULL!r}")
  if values["compressor_type"] not in ("linear", "mlp", "gated", "mlp_residual"):
    raise ValueError(f"model.compressor_type={values['compressor_type']!r}: expected linear|mlp|gated|mlp_residual")
  for name in ("dtype", "param_dtype"):
    if getattr(cfg, name) not in ("float32", "bfloat16"):
      raise ValueError(f"model.{name}={getattr(cfg, name)!r}: expected float32 or bfloat16")
  if cfg.remat not in ("none", "full", "dots"):
    raise ValueError(f"model.remat={cfg.remat!r}: expected none|full|dots")
  return dataclasses.replace(cfg, **values)


def model_config_from_hf(hf: dict, overrides: ModelConfig | None = None) -> ModelConfig:
  """Read an HF config.json dict: top-level `qwen3_5` with nested `text_config`, or flat text."""
  text = hf.get("text_config", hf) if isinstance(hf.get("text_config"), dict) else hf
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
  base: dict[str, Any] = {k: text.get(k) for k in _ARCH_FIELDS if k in text}
  base["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 10_000_000.0))
  base["partial_rotary_factor"] = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
  # Tying may be written at the top level only (the VLM wrapper) or in both places.
  if "tie_word_embeddings" not in text and "tie_word_embeddings" in hf:
    base["tie_word_embeddings"] = hf["tie_word_embeddings"]
  if base.get("tie_word_embeddings") is None:
    base["tie_word_embeddings"] = False
  for key in ("mtp_num_hidden_layers", "compressor_type", "pad_token_id", "eos_token_id"):
    if base.get(key) is None and hf.get(key) is not None:
      base[key] = hf[key]
  if isinstance(base.get("eos_token_id"), list):
    base["eos_token_id"] = base["eos_token_id"][0]
  if base.get("mtp_num_hidden_layers") is None:
    base["mtp_num_hidden_layers"] = 0
  cfg = overrides if overrides is not None else ModelConfig(preset=None)
  return resolve_model_config(dataclasses.replace(cfg, preset=None), base=base)


def load_hf_model_config(model_dir: str, overrides: ModelConfig | None = None) -> ModelConfig:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: an HF model directory needs config.json")
  with open(path) as f:
    return model_config_from_hf(json.load(f), overrides)


# ----------------------------------------------------------------------------------
# Everything else
# ----------------------------------------------------------------------------------


def to_dict(cfg) -> dict:
  """A config dataclass as plain JSON values (tuples become lists, anything else JSON lacks a string): what a
  checkpoint stores under config/ and `loading.config_from_saved` reads back."""
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


@dataclasses.dataclass
class MeshConfig:
  """Device mesh axes; their product must equal the device count (-1: fill with what is left)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass
class DataConfig:
  train_path: str = ""  # JSONL file, or a directory written by the TFDS builder
  eval_path: str = ""
  tokenizer_path: str = ""  # directory with tokenizer.json; default: the model checkpoint
  format: str = "auto"  # auto | messages | prompt_response | tokens
  max_length: int = 512  # fixed sequence length of a batch (after PAD insertion)
  batch_size: int = 8  # global batch (sequences per optimiser micro-step, all processes)
  overlong: str = "truncate"  # truncate | drop
  skip_malformed: bool = False  # skip (and count) malformed JSONL lines instead of raising
  max_pad_ratio: float = 0.25  # SFT random PAD insertion, ratio ~ U(0, max_pad_ratio) per sequence
  # "split": the reference's (a, b) -> (a, PAD), (b, PAD), pairing of the rest kept; "gate": (a, PAD) as a
  # rejected draft, b opens the next pair (the shift inference produces). See data/pairs.py.
  pad_insertion: str = "split"
  # "gate" only: 0 places PADs uniformly; mix in (0, 1] leans them towards the drafts a gate would reject, by the
  # records' `draft_difficulty` (python -m pipo_jax.draft_difficulty): chance x ((1 - mix) + mix * d / mean d).
  pad_difficulty_mix: float = 0.0
  think_mask_tokens: int = 2  # response tokens left unsupervised (the `<think>\n` opener)
  seed: int = 0
  num_epochs: int = 0  # 0 = repeat forever (train.num_steps ends the run)
  worker_count: int = 0  # grain worker processes (0 = in-process)


@dataclasses.dataclass
class OptimConfig:
  learning_rate: float = 1e-4
  warmup_ratio: float = 0.05
  min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  grad_accum_steps: int = 1


@dataclasses.dataclass
class LoraConfig:
  rank: int = 0  # 0 = no LoRA (train the `trainable` modules and, with full_finetune, everything)
  alpha: float = 128.0
  dropout: float = 0.05
  targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits_chunk_layout(rows: int, length: int, chunk: int) -> tuple[int, int]:
  """(positions per row in a chunk, number of chunks) of an LM-head loss over `rows` rows of `length` tokens cut
  into chunks of about `chunk` tokens: C = ceil(chunk / rows) positions of every row (clipped to [1, length]),
  K = ceil(length / C). losses.chunk_tokens cuts them so; flop_model counts the padded rows * K * C positions."""
  per_row = max(1, min(-(-int(chunk) // rows), length))
  return per_row, -(-length // per_row)


@dataclasses.dataclass
class LossConfig:
  backbone_weight: float = 1.0
  mtp_weight: float = 1.0
  conf_weight: float = 1.0
  conf_detach_inputs: bool = True
  # Tokens per LM-head chunk (ceil(chunk / rows) positions of every row): logits memory O(chunk x vocab).
  logits_chunk: int = 2048
  native_mtp_weight: float = 0.0  # mode=ar: auxiliary native-MTP loss (predict token t+2)


@dataclasses.dataclass
class CheckpointConfig:
  every_steps: int = 100
  keep: int = 3
  async_save: bool = True
  init_from: str = ""  # HF directory or orbax checkpoint to start from (params only)
  # Frozen base weights in each save: "auto" = only when there is no init_from to rebuild them from
  # (checkpoints then hold trainable params, optimizer state, RNG, step and data state plus a fingerprint of
  # the base: a 9B LoRA save shrinks from 40.1 GB to 3.5 GB, see experiments/checkpoint_bytes.py), "always",
  # or "never" (the base is rebuilt from init_from, or from train.seed when there is none).
  save_frozen: str = "auto"
  # Config fields ('section.field') a resumed run may change although they alter data order or the LR
  # schedule (e.g. "train.num_steps" to extend a run). Resume refuses any other such change, naming it.
  allow_changes: tuple = ()


@dataclasses.dataclass
class SamplingConfig:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0
  presence_penalty: float = 0.0
  seed: int = 0


OPD_DIVERGENCES = ("sampled", "topk", "full", "jsd")  # see pipo_jax/opd/divergences.py


@dataclasses.dataclass
class OPDConfig:
  teacher_checkpoint: str = ""
  teacher: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(preset=None))
  divergence: str = "topk"  # one of OPD_DIVERGENCES
  topk: int = 32
  jsd_beta: float = 0.5
  temperature: float = 1.0
  fill_pad_label: bool = True
  conf_threshold: float = 0.95
  max_new_tokens: int = 256
  prompt_length: int = 128  # fixed prompt bucket (left-padded)
  sampling: SamplingConfig = dataclasses.field(
    default_factory=lambda: SamplingConfig(temperature=1.0, top_k=20, top_p=0.95, presence_penalty=1.5)
  )
  min_pass_rate: float = 0.0  # keep prompts whose teacher pass rate >= this (needs pass_rate in data)


@dataclasses.dataclass
class TrainConfig:
  num_steps: int = 100  # optimiser steps of the whole run (the LR schedule spans these)
  stop_after_steps: int = 0  # >0: save and exit after this many steps of this invocation (time-sliced jobs)
  log_every: int = 10
  seed: int = 0
  # Modules trained in full (besides LoRA adapters). Matched as path prefixes of the params tree.
  trainable: tuple = (
    "compressor",
    "confidence_head",
    "mtp/fc",
    "mtp/pre_fc_norm_embedding",
    "mtp/pre_fc_norm_hidden",
    "mtp/norm",
    "mtp/layer/input_layernorm",
    "mtp/layer/post_attention_layernorm",
    "mtp/layer/self_attn/q_norm",
    "mtp/layer/self_attn/k_norm",
  )
  full_finetune: bool = False  # train every parameter except embeddings and LM head
  train_embeddings: bool = False  # also train embeddings and LM head (from-scratch `ar` runs)
  # Peak FLOP/s of one device for the `mfu` metric: > 0 given, 0 = the vendor table (metrics.PEAK_FLOPS; none for
  # CPU, then no mfu). measure_peak_flops (when no figure is given): time a 2048^2 fp32 matmul at start instead.
  peak_flops_per_device: float = 0.0
  measure_peak_flops: bool = False
  # A step with a non-finite loss or gradient norm is skipped (params and optimizer state unchanged, counted
  # as skipped_nonfinite); this many in a row stop the run without saving.
  max_nonfinite_steps: int = 5


@dataclasses.dataclass
class Config:
  mode: str = "sft"  # ar | sft | opd
  workdir: str = "runs/default"
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  opd: OPDConfig = dataclasses.field(default_factory=OPDConfig)

  def validate(self, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Every check that needs no weights and no data: one ValueError naming the field. Called first thing
    by the trainers, so a bad flag costs seconds, not a weight load (and never writes a checkpoint).

    num_devices / process_count default to what JAX sees.
    """
    if num_devices is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top

      num_devices = jax.device_count() if num_devices is None else num_devices
      process_count = jax.process_count() if process_count is None else process_count
    if self.mode not in ("ar", "sft", "opd"):
      raise ValueError(f"mode={self.mode!r}: expected ar | sft | opd")
    if not self.workdir:
      raise ValueError("workdir is empty: give a directory every process can reach (a shared path or gs://...)")
    d = self.data
    if d.max_length <= 0 or d.max_length % 2:
      raise ValueError(f"data.max_length={d.max_length} must be a positive even number (whole pairs)")
    if d.batch_size <= 0:
      raise ValueError(f"data.batch_size={d.batch_size} must be > 0")
    if d.num_epochs < 0:
      raise ValueError(f"data.num_epochs={d.num_epochs} must be >= 0 (0 = repeat forever)")
    if not 0.0 <= d.pad_difficulty_mix <= 1.0:
      raise ValueError(f"data.pad_difficulty_mix={d.pad_difficulty_mix} must be in [0, 1]")
    if d.pad_difficulty_mix > 0 and d.pad_insertion != "gate":
      raise ValueError(
        f"data.pad_difficulty_mix={d.pad_difficulty_mix} places 'gate' PADs; data.pad_insertion is {d.pad_insertion!r}"
      )
    if self.optim.grad_accum_steps < 1:
      raise ValueError(f"optim.grad_accum_steps={self.optim.grad_accum_steps} must be >= 1")
    if d.batch_size % process_count:
      raise ValueError(
        f"data.batch_size={d.batch_size} (per micro-step) is not divisible by the {process_count} "
        "processes: every process loads the same number of rows"
      )
    m = self.mesh
    sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
    for k, v in sizes.items():
      if v == 0 or v < -1:
        raise ValueError(f"mesh.{k}={v}: expected a positive size or -1")
    if list(sizes.values()).count(-1) > 1:
      raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if known > num_devices or (-1 in sizes.values() and num_devices % known):
      raise ValueError(f"mesh {sizes} does not fit {num_devices} devices")
    filled = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    batch_shards = filled["data"] * filled["fsdp"]
    if d.batch_size % batch_shards:
      accum = (
        (
          f" (the global batch per optimizer step is data.batch_size x optim.grad_accum_steps = "
          f"{d.batch_size * self.optim.grad_accum_steps}; to keep it, raise grad_accum_steps and lower "
          "batch_size)"
        )
        if self.optim.grad_accum_steps > 1
        else ""
      )
      raise ValueError(
        f"data.batch_size={d.batch_size} is not divisible by mesh data x fsdp = "
        f"{filled['data']} x {filled['fsdp']} = {batch_shards}: the batch axis is split over them" + accum
      )
    t = self.train
    if t.num_steps <= 0:
      raise ValueError(f"train.num_steps={t.num_steps} must be > 0")
    if t.log_every <= 0:
      raise ValueError(f"train.log_every={t.log_every} must be > 0")
    if t.peak_flops_per_device < 0:
      raise ValueError(f"train.peak_flops_per_device={t.peak_flops_per_device} must be >= 0 (0 = the vendor table)")
    if t.max_nonfinite_steps < 1:
      raise ValueError(f"train.max_nonfinite_steps={t.max_nonfinite_steps} must be >= 1")
    c = self.checkpoint
    if c.every_steps <= 0:
      raise ValueError(f"checkpoint.every_steps={c.every_steps} must be > 0")
    if c.keep < 0:
      raise ValueError(f"checkpoint.keep={c.keep} must be >= 0 (0 = keep all)")
    if c.save_frozen not in ("auto", "always", "never"):
      raise ValueError(f"checkpoint.save_frozen={c.save_frozen!r}: expected auto | always | never")
    if self.lora.rank > 0 and t.full_finetune:
      raise ValueError("train.full_finetune=True and lora.rank>0 contradict each other: pick one")
    if self.mode == "opd":
      o = self.opd
      if not o.teacher_checkpoint:
        raise ValueError("opd.teacher_checkpoint is empty: mode=opd needs a teacher (orbax or HF directory)")
      if not d.train_path:
        raise ValueError("data.train_path is empty: mode=opd needs a prompt JSONL")
      if o.prompt_length <= 0 or o.prompt_length % 2:
        raise ValueError(f"opd.prompt_length={o.prompt_length} must be a positive even number")
      if o.max_new_tokens <= 0:
        raise ValueError(f"opd.max_new_tokens={o.max_new_tokens} must be > 0")
      if o.divergence not in OPD_DIVERGENCES:
        raise ValueError(f"opd.divergence={o.divergence!r}: expected one of {OPD_DIVERGENCES}")
      if o.divergence == "topk" and o.topk <= 0:
        raise ValueError(f"opd.topk={o.topk} must be > 0 with divergence=topk")
      if not 0.0 <= o.jsd_beta <= 1.0:
        raise ValueError(f"opd.jsd_beta={o.jsd_beta}: expected a value in [0, 1]")
      if o.temperature <= 0:
        raise ValueError(f"opd.temperature={o.temperature}: must be > 0")
      if not 0.0 <= o.conf_threshold <= 1.0:
        raise ValueError(f"opd.conf_threshold={o.conf_threshold} must be in [0, 1]")
