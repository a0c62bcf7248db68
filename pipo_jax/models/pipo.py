"""The PIPO model: compressor (pair-in), backbone on pairs, MTP head and confidence head (pair-out).

Method: docs/method.md#model, docs/method.md#decoding. Axis vocabulary as in qwen3_5.py, plus
  L pairs (compressed positions; a sequence of T tokens has L = T/2 pairs)
  J MTP slots (J = L - 1 in training: the last pair's state has no teacher-forced target)

Index alignment (docs/method.md#index-alignment), slot j = 0..L-2:
  backbone  h_j (has seen x_0..x_{2j+1})            -> predicts x_{2j+2} = labels[2::2]
  MTP       (e(x_{2j+2}), h_j) at RoPE position j    -> predicts x_{2j+3} = labels[3::2]
  confidence head on (h_j, m_j)                      -> acceptance of the MTP draft for x_{2j+3}

Params tree: {"backbone": Qwen35, "mtp": MTPHead, "compressor": ..., "confidence_head": ...}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pipo_jax.config import FULL, ModelConfig
from pipo_jax.models.norms import Dense, RMSNorm
from pipo_jax.models.qwen3_5 import RESIDUAL_AXES, DecoderLayer, Qwen35, init_layer_cache, positions_from_valid


def _normal(cfg: ModelConfig, axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes)


def _stacked_identity_init(scale_zero: bool = False):
  """Kernel [2D, D] = [I_D ; I_D]: p = [a ; b] -> a + b (the reference's `linear` / MLP-W2 init)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    two_d, d = shape
    assert two_d == 2 * d, shape
    if scale_zero:
      return jnp.zeros(shape, dtype)
    eye = jnp.eye(d, dtype=dtype)
    return jnp.concatenate([eye, eye], axis=0)

  return init


def _identity_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


class Compressor(nn.Module):
  """Folds each pair of token embeddings into one latent: e_BL2D -> z_BLD (docs/method.md#compressor).

  Variants (config.compressor_type):
    linear        z = W [a; b] + c                       init W = [I | I], c = 0  => z = a + b
    mlp           z = W2 silu(W1 [a; b] + c1) + c2       init W1 = I, W2 = [I | I] => z = silu(a) + silu(b)
                  (the reference's parameters and init, so exported checkpoints load there)
    gated         z = sig(u.a + u0) a + sig(v.b + v0) b + Dm (a - b)   (the reference's discarded ablation)
    mlp_residual  z = a + b + W2 silu(W1 [a; b] + c1) + c2   init W2 = 0, c2 = 0 => z = a + b exactly
                  (what the paper describes: a zero-initialised residual branch)
  `compressor_random_init` skips the identity-style init (N(0, initializer_range) kernels, zero biases).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, e_BL2D: jax.Array) -> jax.Array:
    cfg = self.config
    kind, rand = cfg.compressor_type, cfg.compressor_random_init
    D = cfg.hidden_size
    a_BLD, b_BLD = e_BL2D[..., 0, :], e_BL2D[..., 1, :]
    # [a; b]: token1 in dims 0..D-1, token2 in D..2D-1. A reshape of the pair axis is that concatenation
    # (row-major), without a concatenate op in every decode step.
    p_BL2D = e_BL2D.reshape(*e_BL2D.shape[:-2], 2 * D)

    def dense(features, name, kernel_init, use_bias=True):
      init = (
        _normal(cfg, ("embed", "embed_out"))
        if rand
        else nn.with_logical_partitioning(kernel_init, ("embed", "embed_out"))
      )
      return Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
        kernel_init=init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed_out",)),
      )

    if kind == "linear":
      return dense(D, "linear", _stacked_identity_init())(p_BL2D)
    if kind in ("mlp", "mlp_residual"):
      u_BL2D = jax.nn.silu(dense(2 * D, "mlp_0", _identity_init)(p_BL2D))
      branch_BLD = dense(D, "mlp_2", _stacked_identity_init(scale_zero=(kind == "mlp_residual")))(u_BL2D)
      if kind == "mlp":
        return branch_BLD
      return (a_BLD + b_BLD).astype(branch_BLD.dtype) + branch_BLD
    if kind == "gated":
      gate_init = nn.initializers.normal(cfg.initializer_range)
      alpha_BL1 = jax.nn.sigmoid(dense(1, "alpha", gate_init)(a_BLD))
      beta_BL1 = jax.nn.sigmoid(dense(1, "beta", gate_init)(b_BLD))
      diff_BLD = dense(D, "diff", gate_init, use_bias=False)(a_BLD - b_BLD)
      return alpha_BL1 * a_BLD + beta_BL1 * b_BLD + diff_BLD
    raise ValueError(f"unknown compressor_type {kind!r}")


class ConfidenceHead(nn.Module):
  """a = fc2(silu(fc1(RMSNorm_(1+w)([h ; m])))), no biases; returns the logit a_... (c = sigmoid(a))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h_BJD: jax.Array, m_BJD: jax.Array) -> jax.Array:
    cfg = self.config
    u = jnp.concatenate([h_BJD, m_BJD], axis=-1)
    u = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, axis_name="embed2", name="norm")(u)
    u = Dense(
      cfg.hidden_size,
      use_bias=False,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name="fc1",
      kernel_init=_normal(cfg, ("embed2", "embed_out")),
    )(u)
    a = Dense(
      1,
      use_bias=False,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name="fc2",
      kernel_init=_normal(cfg, ("embed_out", None)),
    )(jax.nn.silu(u))
    return a[..., 0].astype(jnp.float32)


class MTPHead(nn.Module):
  """Qwen3.5's native MTP module (docs/method.md#mtp-head): one full-attention decoder layer.

  m = norm(layer(fc([pre_fc_norm_embedding(e) ; pre_fc_norm_hidden(h)])))  -- embedding first.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    e_BJD: jax.Array,
    h_BJD: jax.Array,
    positions_BJ: jax.Array,
    valid_BJ: jax.Array | None = None,
    cache: dict | None = None,
  ):
    cfg = self.config
    e_BJD = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="pre_fc_norm_embedding")(e_BJD)
    h_BJD = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="pre_fc_norm_hidden")(h_BJD.astype(e_BJD.dtype))
    x_BJD = Dense(
      cfg.hidden_size,
      use_bias=False,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name="fc",
      kernel_init=_normal(cfg, ("embed2", "embed_out")),
    )(jnp.concatenate([e_BJD, h_BJD], -1))
    x_BJD = nn.with_logical_constraint(x_BJD, RESIDUAL_AXES)
    x_BJD, cache = DecoderLayer(cfg, FULL, name="layer")(x_BJD, positions_BJ, valid_BJ, cache)
    return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(x_BJD), cache


def pair_valid(valid_BT: jax.Array | None) -> jax.Array | None:
  """A pair is real when either of its tokens is (OR of the two token masks)."""
  if valid_BT is None:
    return None
  B, T = valid_BT.shape
  return valid_BT.reshape(B, T // 2, 2).any(-1)


class PipoModel(nn.Module):
  """Backbone + PIPO heads. Methods are applied with `model.apply({'params': p}, ..., method=...)`."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.backbone = Qwen35(cfg)
    self.compressor = Compressor(cfg)
    self.mtp = MTPHead(cfg)
    self.confidence_head = ConfidenceHead(cfg)

  # -- building blocks ---------------------------------------------------------------------------
  def compress(self, ids_BT: jax.Array) -> jax.Array:
    """ids_BT (T even) -> latents z_BLD."""
    B, T = ids_BT.shape
    if T % 2:
      raise ValueError(f"PIPO needs an even number of tokens, got T={T}: insert a parity PAD first")
    e_BTD = self.backbone.embed(ids_BT)
    return self.compressor(e_BTD.reshape(B, T // 2, 2, e_BTD.shape[-1]))

  def confidence(self, h_BJD: jax.Array, m_BJD: jax.Array, detach: bool = True) -> jax.Array:
    """Confidence logits a_BJ (fp32). Inputs are detached by default (docs/method.md#confidence-head)."""
    if detach:
      h_BJD, m_BJD = jax.lax.stop_gradient(h_BJD), jax.lax.stop_gradient(m_BJD)
    return self.confidence_head(h_BJD, m_BJD)

  def head_kernel(self) -> jax.Array:
    return self.backbone.head_kernel()

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    return self.backbone.logits(h_BTD)

  # -- training forward (also the OPD student forward) -------------------------------------------
  def __call__(self, ids_BT: jax.Array, valid_BT: jax.Array | None = None, detach_conf: bool = True):
    """Compressed teacher-forced forward over whole sequences.

    ids_BT int (T even), valid_BT bool or None (None: all real). Padding comes in whole pairs: left padding
    (scoring batches; positions then count real pairs only) or right padding (fixed-shape training batches,
    where causal attention already makes trailing pads harmless).
    Returns dict: h_BJD (backbone states h_0..h_{L-2}), m_BJD (MTP states), conf_logit_BJ, all for J = L-1.
    """
    B, T = ids_BT.shape
    L = T // 2
    z_BLD = self.compress(ids_BT)
    pvalid_BL = pair_valid(valid_BT)
    if pvalid_BL is None:
      pos_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    else:
      pos_BL = positions_from_valid(pvalid_BL)
    h_BLD, _ = self.backbone(z_BLD, pos_BL, pvalid_BL)
    h_BJD = h_BLD[:, :-1]
    tok1_BJ = ids_BT[:, 2::2]  # teacher forcing: the first token of the next pair
    # Slot j is real when both the state h_j and the token1 of pair j+1 are.
    pvalid_BJ = None if pvalid_BL is None else pvalid_BL[:, :-1] & pvalid_BL[:, 1:]
    m_BJD, _ = self.mtp(self.backbone.embed(tok1_BJ), h_BJD, pos_BL[:, :-1], pvalid_BJ)
    conf_BJ = self.confidence(h_BJD, m_BJD, detach=detach_conf)
    return {"h_BJD": h_BJD, "m_BJD": m_BJD, "conf_logit_BJ": conf_BJ}

  # -- inference phases (docs/method.md#decoding; used by pipo_jax.inference) -------------------------
  def backbone_pairs(self, ids_BT: jax.Array, positions_BL: jax.Array, valid_BL: jax.Array | None, cache: dict):
    """Phase 1 (and prefill): compress the token pairs and run the backbone with its cache.
    ids_BT (T = 2 * #pairs) -> (h_BLD, cache)."""
    return self.backbone(self.compress(ids_BT), positions_BL, valid_BL, cache)

  def mtp_slots(
    self, tok1_BJ: jax.Array, h_BJD: jax.Array, positions_BJ: jax.Array, valid_BJ: jax.Array | None, cache: dict
  ):
    """Phase 2 (and the MTP prefill over the prompt): -> (m_BJD, conf_logit_BJ, mtp cache)."""
    m_BJD, cache = self.mtp(self.backbone.embed(tok1_BJ), h_BJD, positions_BJ, valid_BJ, cache)
    return m_BJD, self.confidence_head(h_BJD, m_BJD), cache

  def init_all(self, ids_BT: jax.Array):
    """Touches every submodule (used by init)."""
    out = self(ids_BT)
    _ = self.backbone.logits(out["h_BJD"][:, :1])
    return out


def boxed_pipo_params(config: ModelConfig, rng: jax.Array | None = None):
  """Params of the whole PIPO model at their training-time init (compressor / heads at their PIPO init), boxed
  with their logical axis names; abstract (ShapeDtypeStructs, nothing computed) when rng is None."""

  def init(key):
    return PipoModel(config).init(key, jnp.zeros((1, 4), jnp.int32), method=PipoModel.init_all)["params"]

  return jax.eval_shape(init, jax.random.PRNGKey(0)) if rng is None else init(rng)


def init_pipo_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Unboxed random params of the whole PIPO model."""
  return nn.meta.unbox(boxed_pipo_params(config, rng))


def abstract_pipo_params(config: ModelConfig) -> dict:
  """ShapeDtypeStruct tree of the (unboxed) PIPO params."""
  return nn.meta.unbox(boxed_pipo_params(config))


def abstract_mtp_params(config: ModelConfig) -> dict:
  """ShapeDtypeStruct tree of MTPHead's (unboxed) params: {fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm,
  layer}, whether or not the config enables the head."""

  def init(key):
    x_BJD = jnp.zeros((1, 1, config.hidden_size), config.dtype)
    return MTPHead(config).init(key, x_BJD, x_BJD, jnp.zeros((1, 1), jnp.int32))["params"]

  return nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))


def init_mtp_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
  return init_layer_cache(config, FULL, batch_size, max_len, dtype)
