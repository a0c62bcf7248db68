"""Matmul FLOPs of the train step of each mode (and of OPD's teacher scoring), counted as the code computes them.

Why: MFU divides the FLOPs a step does by its time. A PaLM-style 6N + attention count per *token* overstates a
PIPO step 1.65-1.85x: the compressor and the backbone run on T/2 pair positions, the MTP layer, the confidence head
and both LM-head streams on J = T/2 - 1 slots, and most of the backbone gets no weight gradient. Here every matmul
of the step is listed with the shapes the model code gives it (models/qwen3_5.py, attention.py, flash.py,
gated_deltanet.py, triangular.py, pipo.py; the losses in objectives.py, losses.py, opd/), so the count can be held
to the compiler's (tests/test_flop_model.py).

Conventions:
  * A matmul [m, k] x [k, n] costs 2mkn FLOPs (a multiply and an add per term), XLA's convention. Only matmuls
    (dot_general) are counted: elementwise work (norms, softmax, gates, the optimizer update) is not, as MFU
    conventionally leaves it out. XLA counts it too: 5-15 % of its total on the tiny test models, less at real
    sizes (see the tests).
  * Backward, per matmul: the input gradient (as many FLOPs as the forward) when anything trained lies upstream of
    its input, the weight gradient when its weight is trained. A product of two activations (attention scores and
    values, the delta rule's chunk matrices) has two input gradients. A frozen weight gets no weight gradient:
    the step computes none, so none is counted (unlike the 6N convention, which counts 4N of backward for every
    weight). A LoRA-targeted kernel counts as trained: its adapters' gradient goes through the full dW.
  * `Flops.recompute`: matmuls the compiled program runs a second time in the backward pass: layer remat
    (`model.remat`), the chunked LM-head losses (their scan body is rematerialised), flash attention's score
    tiles. MFU leaves them out (`Flops.total`); the compiler counts them (`Flops.executed`).
  * Forms as computed: dense attention (a call of T <= model.attention_block tokens) multiplies the whole masked
    T x S score matrix, not a causal half; flash attention the key blocks up to the diagonal. The chunked delta
    rule builds its L x L chunk matrices, the blocked inverse and the solve, then reads and updates the state once
    per chunk; a padded last chunk or LM-head chunk is computed whole.
  * What XLA removes, removed here too: a scan of one iteration is inlined, so with one delta-rule chunk the final
    state update (unused without a cache) is dead, and with one LM-head chunk the rematerialised logits merge with
    the forward's; a layer group that runs once (unrolled, or one repeat) gets no input gradient below its first
    trained parameter. A scanned group of R > 1 repeats runs one loop body, so every repeat computes what the last
    one needs.

Trained parameters are named by module path ("backbone/layers/layer_0/mlp/gate_proj", the params tree's layout
with the leaf dropped): `trained_modules(state.trainable)`.
"""

from __future__ import annotations

import dataclasses

from pipo_jax.config import FULL, Config, ModelConfig, logits_chunk_layout

# ----------------------------------------------------------------------------------------------------------------
# Result type and the trained-parameter set
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flops:
  """Matmul FLOPs of one program: forward, backward (gradients), and matmuls executed again (remat)."""

  forward: float = 0.0
  backward: float = 0.0
  recompute: float = 0.0

  @property
  def total(self) -> float:
    """Model FLOPs (what MFU counts): forward + backward, no recomputation."""
    return self.forward + self.backward

  @property
  def executed(self) -> float:
    """What the compiled program runs: total + recompute (compare with the compiler's dot FLOPs)."""
    return self.total + self.recompute

  def __add__(self, other: Flops) -> Flops:
    return Flops(self.forward + other.forward, self.backward + other.backward, self.recompute + other.recompute)

  def __mul__(self, k: float) -> Flops:
    return Flops(self.forward * k, self.backward * k, self.recompute * k)

  __rmul__ = __mul__


def trained_modules(trainable) -> frozenset:
  """Module paths ('backbone/layers/layer_0/mlp/gate_proj') of every leaf of a TrainState's trainable tree.

  A LoRA adapter ('lora/<module path>/a') names its base module: the adapted kernel gets a full weight gradient.
  """
  out = set()

  def walk(tree, path):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
      else:
        mod = path[1:] if path and path[0] == "lora" else path
        out.add("/".join(mod))

  walk(trainable, ())
  return frozenset(out)


def _trained(trained: frozenset, prefix: str) -> bool:
  """True when a trained module lies at or below `prefix`, or `prefix` lies inside a trained module ("mtp")."""
  return any(p == prefix or p.startswith(prefix + "/") or prefix.startswith(p + "/") for p in trained)


class _Acc:
  """Adds up one program's matmuls with their gradients."""

  def __init__(self):
    self.fwd = self.bwd = self.rec = 0.0

  def weight(self, flops: float, dx: bool, dw: bool):
    """x @ W: the forward, dX when the input needs a gradient, dW when W is trained."""
    self.fwd += flops
    self.bwd += flops * (int(dx) + int(dw))

  def acts(self, flops: float, grad: bool):
    """A product of two activations: both get a gradient when either's producer needs one."""
    self.fwd += flops
    self.bwd += 2 * flops if grad else 0.0

  def result(self) -> Flops:
    return Flops(self.fwd, self.bwd, self.rec)


# ----------------------------------------------------------------------------------------------------------------
# Kernels ([in, out] of every Dense) and per-token forward counts (shared with inference/flops.py)
# ----------------------------------------------------------------------------------------------------------------


def attention_kernels(cfg: ModelConfig) -> dict:
  D, H, G, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  return {"q_proj": (D, 2 * H * K), "k_proj": (D, G * K), "v_proj": (D, G * K), "o_proj": (H * K, D)}


def gdn_kernels(cfg: ModelConfig) -> dict:
  D, Hv = cfg.hidden_size, cfg.linear_num_value_heads
  return {
    "in_proj_qkv": (D, cfg.linear_conv_dim),
    "in_proj_z": (D, cfg.linear_value_dim),
    "in_proj_b": (D, Hv),
    "in_proj_a": (D, Hv),
    "out_proj": (cfg.linear_value_dim, D),
  }


def mlp_kernels(cfg: ModelConfig) -> dict:
  D, F = cfg.hidden_size, cfg.intermediate_size
  return {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def compressor_kernels(cfg: ModelConfig) -> dict:
  """In dataflow order; `gated`'s alpha / beta read one token each, diff the difference a - b."""
  D = cfg.hidden_size
  kind = cfg.compressor_type
  if kind == "linear":
    return {"linear": (2 * D, D)}
  if kind in ("mlp", "mlp_residual"):
    return {"mlp_0": (2 * D, 2 * D), "mlp_2": (2 * D, D)}
  if kind == "gated":
    return {"alpha": (D, 1), "beta": (D, 1), "diff": (D, D)}
  raise ValueError(f"unknown compressor_type {kind!r}")


def confidence_kernels(cfg: ModelConfig) -> dict:
  return {"fc1": (2 * cfg.hidden_size, cfg.hidden_size), "fc2": (cfg.hidden_size, 1)}


def per_token(kernels: dict) -> int:
  """Forward FLOPs of one token through every kernel of a table."""
  return sum(2 * i * o for i, o in kernels.values())


def lm_head_per_token(cfg: ModelConfig) -> int:
  return 2 * cfg.hidden_size * cfg.vocab_size


def mtp_fc_per_token(cfg: ModelConfig) -> int:
  return 2 * 2 * cfg.hidden_size * cfg.hidden_size


# ----------------------------------------------------------------------------------------------------------------
# Token mixers: attention and the chunked delta rule
# ----------------------------------------------------------------------------------------------------------------


def flash_block_pairs(T: int, block: int) -> int:
  """(query block, key block) tiles flash attention computes for T tokens without a cache: key block j runs for
  query block i when its first slot j*block is <= the block's last real query slot (models/flash.py)."""
  nq = -(-T // block)
  return sum(sum(1 for j in range(nq) if j * block <= min((i + 1) * block, T) - 1) for i in range(nq))


def attention_core(acc: _Acc, cfg: ModelConfig, B: int, T: int, grad: bool, remat_core: bool = False):
  """Scores q k^T and values p v of a call of T tokens without a cache (training, scoring).

  Dense (T <= attention_block, or block 0): the whole [T, T] matrix per head. Flash: every computed tile, forward
  2 products; its custom backward recomputes the scores and forms dV, dP, dK, dQ (5), plus rowsum(dO * O).
  """
  H, K = cfg.num_attention_heads, cfg.head_dim
  block = cfg.attention_block
  if block and T > block:
    tile = 2.0 * B * H * block * block * K
    pairs = flash_block_pairs(T, block)
    acc.acts(2 * pairs * tile, grad)  # backward: dV, dP, dK, dQ = 2x the forward
    if grad:
      acc.rec += pairs * tile  # the scores again
      acc.bwd += 2.0 * B * H * (-(-T // block) * block) * K  # D_i = rowsum(dO * O), a dot over K
    if remat_core and grad:
      acc.rec += 2 * pairs * tile
    return
  acc.acts(2 * (2.0 * B * H * T * T * K), grad)
  if remat_core and grad:
    acc.rec += 2 * (2.0 * B * H * T * T * K)


def unit_lower_inverse(n: int) -> int:
  """Matmul FLOPs of models/triangular.unit_lower_inverse on one n x n matrix: row-by-row forward substitution
  up to 16 (row i: a length-n row times the n x n partial inverse), above that both halves, then
  T21 = -T22 (A21 T11)."""
  if n <= 16:
    return (n - 1) * 2 * n * n
  h = n // 2
  return unit_lower_inverse(h) + unit_lower_inverse(n - h) + 2 * (n - h) * h * h + 2 * (n - h) * (n - h) * h


def gdn_core(acc: _Acc, cfg: ModelConfig, B: int, T: int, grad: bool, remat_core: bool = False):
  """The chunked delta rule (gated_deltanet.chunked_gated_delta_rule) on Hv heads, chunks of L = min(chunk, T)
  (T padded to N chunks). Per chunk and head: k k^T and q k^T (L x L x dk each), the inverse of the L x L
  unit-lower matrix, the solve (L x L x (dv + dk)), then in the scan the state read w S and q S (L x dk x dv
  each), the intra-chunk values qk v (L x L x dv) and the state update k^T v (dk x L x dv).

  The inverse has a custom VJP that saves it (no backward of its own); the solve's backward is dB = T^T dX and
  dA = -dB X^T, 2x its forward like every other product here. One chunk: the scan is inlined and its state update
  is dead (the final state is not used without a cache); the reads of the zero initial state stay.
  """
  H, K, V = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
  L = min(cfg.gdn_chunk_size, T)
  N = -(-T // L)
  bh = B * H * N
  parallel = bh * (2 * L * L * K + 2 * L * L * (V + K) + 2 * L * L * K)  # kk, the solve, qk
  inverse = bh * unit_lower_inverse(L)
  scan = bh * (2 * L * L * V + 2 * (2 * L * K * V))  # qk v, then the state reads w S and q S
  if N > 1:
    scan += bh * 2 * L * K * V  # the state update (one chunk: the final state is dead without a cache)
  acc.acts(parallel + scan, grad)
  acc.fwd += inverse
  if remat_core and grad:
    acc.rec += parallel + scan + inverse


# ----------------------------------------------------------------------------------------------------------------
# Layers and the backbone
# ----------------------------------------------------------------------------------------------------------------


def decoder_layer(
  acc: _Acc,
  cfg: ModelConfig,
  layer_type: str,
  B: int,
  T: int,
  prefix: str,
  trained: frozenset,
  up: bool,
  remat_dots: bool = False,
) -> bool:
  """One DecoderLayer on B x T tokens; `up`: a trained parameter lies upstream of its input. Returns the same flag
  for its output. Weights are read under `prefix` (e.g. "backbone/layers/layer_1"). `remat_dots`: the layer runs
  under the `dots` remat policy (projections saved, the token mixer's batched products recomputed)."""
  n = B * T
  t = lambda name: _trained(trained, f"{prefix}/{name}")
  u_in = up or t("input_layernorm")
  if layer_type == FULL:
    ks, mixer, core_in = attention_kernels(cfg), "self_attn", ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm")
  else:
    ks, mixer = gdn_kernels(cfg), "linear_attn"
    core_in = ("in_proj_qkv", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias")
  *proj_in, proj_out = ks
  for name in proj_in:
    i, o = ks[name]
    acc.weight(2.0 * n * i * o, u_in, t(f"{mixer}/{name}"))
  u_core = u_in or any(t(f"{mixer}/{x}") for x in core_in)
  if layer_type == FULL:
    attention_core(acc, cfg, B, T, u_core, remat_core=remat_dots)
  else:
    gdn_core(acc, cfg, B, T, u_core, remat_core=remat_dots)
  # The output projection reads the core's output (GDN: gated by the z projection through the gated norm).
  u_out = u_core or (layer_type != FULL and (t(f"{mixer}/in_proj_z") or t(f"{mixer}/norm")))
  i, o = ks[proj_out]
  acc.weight(2.0 * n * i * o, u_out, t(f"{mixer}/{proj_out}"))
  u_res = up or t("input_layernorm") or t(mixer)
  u_mlp = u_res or t("post_attention_layernorm")
  mk = mlp_kernels(cfg)
  for name in ("gate_proj", "up_proj"):
    acc.weight(2.0 * n * mk[name][0] * mk[name][1], u_mlp, t(f"mlp/{name}"))
  u_down = u_mlp or t("mlp/gate_proj") or t("mlp/up_proj")
  acc.weight(2.0 * n * mk["down_proj"][0] * mk["down_proj"][1], u_down, t("mlp/down_proj"))
  return u_res or t("post_attention_layernorm") or t("mlp")


def backbone(acc: _Acc, cfg: ModelConfig, B: int, T: int, trained: frozenset, up: bool) -> bool:
  """The layer stack (the scanned group of `cfg.layer_pattern()`) on B x T positions; returns the output's flag
  (the final norm included).

  Remat (`model.remat`, per group): "full" runs the group's forward again in its backward, all but the last
  layer's down_proj (its output is needed by nothing there); "dots" recomputes the token mixers' products.
  """
  group, repeats = cfg.layer_pattern()
  uniform = cfg.scan_layers and repeats > 1  # one loop body for every repeat
  flags = []  # the input flag of every layer, in order
  u = up
  for _ in range(repeats):
    for j, lt in enumerate(group):
      flags.append(u)
      u = decoder_layer(_Acc(), cfg, lt, B, T, f"backbone/layers/layer_{j}", trained, u)
  dots = cfg.remat == "dots"
  for r in range(repeats):
    fwd0, bwd0 = acc.fwd, acc.bwd
    for j, lt in enumerate(group):
      u_in = flags[(repeats - 1) * len(group) + j] if uniform else flags[r * len(group) + j]
      decoder_layer(acc, cfg, lt, B, T, f"backbone/layers/layer_{j}", trained, u_in, remat_dots=dots)
    if cfg.remat == "full" and acc.bwd > bwd0:  # the group has a backward, so it runs its forward again
      F, D = cfg.intermediate_size, cfg.hidden_size
      acc.rec += acc.fwd - fwd0 - 2.0 * B * T * F * D
  return u or _trained(trained, "backbone/norm")


# ----------------------------------------------------------------------------------------------------------------
# PIPO heads and the LM head
# ----------------------------------------------------------------------------------------------------------------


def compressor(acc: _Acc, cfg: ModelConfig, n_pairs: int, trained: frozenset, up: bool) -> bool:
  """`up`: the embeddings are trained."""
  ks = compressor_kernels(cfg)
  t = lambda name: _trained(trained, f"compressor/{name}")
  u = up
  for name, (i, o) in ks.items():
    acc.weight(2.0 * n_pairs * i * o, u, t(name))
    if cfg.compressor_type in ("mlp", "mlp_residual"):
      u = u or t(name)  # mlp_2 reads mlp_0's output; the other variants read the embeddings
  return up or _trained(trained, "compressor")


def mtp_head(
  acc: _Acc, cfg: ModelConfig, B: int, J: int, trained: frozenset, up_embed: bool, up_hidden: bool, prefix="mtp"
) -> bool:
  """MTPHead on B x J slots: fc on [norm(e) ; norm(h)], one full-attention layer, the final norm."""
  t = lambda name: _trained(trained, f"{prefix}/{name}")
  u_fc = up_embed or up_hidden or t("pre_fc_norm_embedding") or t("pre_fc_norm_hidden")
  acc.weight(float(B * J * mtp_fc_per_token(cfg)), u_fc, t("fc"))
  u = decoder_layer(acc, cfg, FULL, B, J, f"{prefix}/layer", trained, u_fc or t("fc"))
  return u or t("norm")


def confidence(acc: _Acc, cfg: ModelConfig, n: int, trained: frozenset, up: bool, detach: bool) -> None:
  """ConfidenceHead on n slots; its inputs are stop-gradient'ed when `detach` (the default)."""
  t = lambda name: _trained(trained, f"confidence_head/{name}")
  u = (up and not detach) or t("norm")
  for name, (i, o) in confidence_kernels(cfg).items():
    acc.weight(2.0 * n * i * o, u, t(name))
    u = u or t(name)


def head_name(cfg: ModelConfig) -> str:
  return "backbone/embed_tokens" if cfg.tie_word_embeddings else "backbone/lm_head"


def lm_head_loss(
  acc: _Acc,
  cfg: ModelConfig,
  rows: int,
  length: int,
  chunk: int,
  dh: bool,
  dw: bool,
  extra_forward_per_token: float = 0.0,
  remat: bool = True,
) -> None:
  """A chunked loss over `rows` x `length` tokens (losses.chunk_tokens: ceil(chunk / rows) positions of every row
  per chunk, the length padded to whole chunks): logits of every padded position, dH / dW as needed.
  remat (losses.scan_token_chunks, the OPD divergences): the body is rematerialised, so its logits run again in
  the backward when there is more than one chunk (one chunk: the scan is inlined and XLA merges the two);
  `extra_forward_per_token`: matmuls of the body without gradient (OPD: the teacher's logits), recomputed
  likewise. remat=False: the cross entropy (losses.chunked_cross_entropy), whose gradients are formed in the
  forward chunk loop."""
  per_row, n_chunks = logits_chunk_layout(rows, length, chunk)
  padded = rows * n_chunks * per_row
  logits = float(padded * lm_head_per_token(cfg))
  acc.weight(logits, dh, dw)
  acc.fwd += padded * extra_forward_per_token
  if remat and n_chunks > 1 and (dh or dw):
    acc.rec += logits + padded * extra_forward_per_token


def lora_merge(acc: _Acc, cfg: Config, model_cfg: ModelConfig, trained: frozenset) -> None:
  """W + (alpha/r) A @ B per adapted kernel and loss call (lora.apply_lora), with dA and dB."""
  if cfg.lora.rank <= 0:
    return
  r = cfg.lora.rank
  targets = set(cfg.lora.targets)
  for path, (i, o, lead) in _kernel_shapes(model_cfg, cfg.mode).items():
    if path.split("/")[-1] in targets and path in trained:
      acc.acts(2.0 * lead * i * r * o, True)


def _kernel_shapes(cfg: ModelConfig, mode: str) -> dict:
  """{module path: (in, out, leading repeats)} of the attention / MLP kernels LoRA can target."""
  group, repeats = cfg.layer_pattern()
  out = {}
  for j, lt in enumerate(group):
    ks = {**(attention_kernels(cfg) if lt == FULL else gdn_kernels(cfg)), **mlp_kernels(cfg)}
    mixer = "self_attn" if lt == FULL else "linear_attn"
    for name, (i, o) in ks.items():
      sub = "mlp" if name in mlp_kernels(cfg) else mixer
      out[f"backbone/layers/layer_{j}/{sub}/{name}"] = (i, o, repeats)
  if mode != "ar" or cfg.mtp_num_hidden_layers:
    for name, (i, o) in {**attention_kernels(cfg), **mlp_kernels(cfg)}.items():
      sub = "mlp" if name in mlp_kernels(cfg) else "self_attn"
      out[f"mtp/layer/{sub}/{name}"] = (i, o, 1)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Programs: one micro-batch of B rows of T tokens
# ----------------------------------------------------------------------------------------------------------------


def ar_loss(cfg: ModelConfig, B: int, T: int, trained: frozenset, logits_chunk: int, native_mtp: bool = False) -> Flops:
  """objectives.make_ar_loss under value_and_grad: the backbone on T tokens, the LM head on T - 1 positions per row;
  with the native-MTP loss, the MTP layer on T - 2 slots and their LM head."""
  acc = _Acc()
  up_embed = _trained(trained, "backbone/embed_tokens")
  u_h = backbone(acc, cfg, B, T, trained, up_embed)
  dw = _trained(trained, head_name(cfg))
  lm_head_loss(acc, cfg, B, T - 1, logits_chunk, u_h, dw, remat=False)
  if native_mtp:
    u_m = mtp_head(acc, cfg, B, T - 2, trained, up_embed, u_h)
    lm_head_loss(acc, cfg, B, T - 2, logits_chunk, u_m, dw, remat=False)
  return acc.result()


def _pipo_student(acc: _Acc, cfg: ModelConfig, B: int, T: int, trained: frozenset, detach_conf: bool):
  """PipoModel.__call__: compressor on L = T/2 pairs, backbone on L positions, MTP and confidence on J = L - 1
  slots. Returns (J, flag of h, flag of m)."""
  L = T // 2
  J = L - 1
  up_embed = _trained(trained, "backbone/embed_tokens")
  u_z = compressor(acc, cfg, B * L, trained, up_embed)
  u_h = backbone(acc, cfg, B, L, trained, u_z)
  u_m = mtp_head(acc, cfg, B, J, trained, up_embed, u_h)
  confidence(acc, cfg, B * J, trained, u_h or u_m, detach_conf)
  return J, u_h, u_m


def sft_loss(cfg: ModelConfig, B: int, T: int, trained: frozenset, logits_chunk: int, detach_conf=True) -> Flops:
  """objectives.make_sft_loss under value_and_grad: the PIPO forward, then the LM head on both streams (J slots
  each)."""
  acc = _Acc()
  J, u_h, u_m = _pipo_student(acc, cfg, B, T, trained, detach_conf)
  dw = _trained(trained, head_name(cfg))
  lm_head_loss(acc, cfg, B, J, logits_chunk, u_h, dw, remat=False)
  lm_head_loss(acc, cfg, B, J, logits_chunk, u_m, dw, remat=False)
  return acc.result()


def opd_loss(
  cfg: ModelConfig,
  teacher_cfg: ModelConfig,
  B: int,
  T: int,
  trained: frozenset,
  logits_chunk: int,
  detach_conf: bool = True,
) -> Flops:
  """opd.loss.make_opd_loss under value_and_grad: the PIPO forward on the rollouts and, per stream, the student's
  and the (frozen) teacher's logits in one chunked body."""
  acc = _Acc()
  J, u_h, u_m = _pipo_student(acc, cfg, B, T, trained, detach_conf)
  dw = _trained(trained, head_name(cfg))
  teacher = float(lm_head_per_token(teacher_cfg))
  lm_head_loss(acc, cfg, B, J, logits_chunk, u_h, dw, teacher)
  lm_head_loss(acc, cfg, B, J, logits_chunk, u_m, dw, teacher)
  return acc.result()


def teacher_scoring(teacher_cfg: ModelConfig, B: int, T: int) -> Flops:
  """opd.loss.make_teacher_fn: the frozen teacher's backbone forward on the (PAD-compacted) T tokens."""
  acc = _Acc()
  backbone(acc, teacher_cfg, B, T, frozenset(), False)
  return acc.result()


def train_step(
  cfg: Config, model_cfg: ModelConfig, trained: frozenset, length: int, teacher_cfg: ModelConfig | None = None
) -> Flops:
  """Matmul FLOPs of one optimizer step, all devices: data.batch_size rows x optim.grad_accum_steps micro-batches
  of `length` tokens (the trainer's sequence length: data.max_length, or OPD's rollout length). opd adds the
  teacher scoring of the same rows (its own program, forward only); the rollout's generation is not counted.
  `trained`: `trained_modules(state.trainable)`."""
  B, k = cfg.data.batch_size, cfg.optim.grad_accum_steps
  chunk = cfg.loss.logits_chunk
  if cfg.mode == "ar":
    native = cfg.loss.native_mtp_weight > 0 and bool(model_cfg.mtp_num_hidden_layers)
    one = ar_loss(model_cfg, B, length, trained, chunk, native)
  elif cfg.mode == "sft":
    one = sft_loss(model_cfg, B, length, trained, chunk, cfg.loss.conf_detach_inputs)
  elif cfg.mode == "opd":
    if teacher_cfg is None:
      raise ValueError("mode=opd: train_step needs the teacher's model config")
    one = opd_loss(model_cfg, teacher_cfg, B, length, trained, chunk, cfg.loss.conf_detach_inputs)
    one = one + teacher_scoring(teacher_cfg, B, length)
  else:
    raise ValueError(f"mode={cfg.mode!r}: expected ar | sft | opd")
  merge = _Acc()
  lora_merge(merge, cfg, model_cfg, trained)
  return (one + merge.result()) * k
