"""Qwen3.5 dense text backbone in Flax Linen, reproducing HF `Qwen3_5ForCausalLM`.

Axis vocabulary (shapes appear as suffixes of tensor names):
  B batch            T new tokens of this call     S cache slots (key positions)
  D model dim        V vocabulary                  F MLP width (intermediate_size)
  H query heads      G kv heads                    K head dim
  R repeats of the layer group (the scanned 'layers' axis)
GDN-specific axes are documented in gated_deltanet.py.

Logical axis names (mapped to mesh axes in pipo_jax/sharding.py):
  params: 'vocab', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'layers', 'gdn_qkv', 'gdn_value',
          'gdn_heads', 'conv_width'
  activations: 'batch', 'length', plus the param names above for head/MLP/GDN channels. The residual
  stream x_BTD is constrained to ('batch', 'length', 'act_embed') so FSDP on 'embed' params does not force a
  sharded activation feature axis.

Params tree (under params["backbone"]):
  embed_tokens/embedding [V, D]
  layers/layer_{j}/...   one entry per position j of the repeating group `config.layer_pattern()[0]`; every
                         leaf has a leading [R] axis (HF layer index = r * len(group) + j). The same layout is
                         used with scan_layers=False (then the scan is fully unrolled).
     .../input_layernorm/scale, .../post_attention_layernorm/scale [D]
     .../self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel, .../self_attn/{q_norm,k_norm}/scale
     .../linear_attn/{in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,out_proj}/kernel, .../linear_attn/conv1d/kernel
         [W, C], .../linear_attn/A_log, .../linear_attn/dt_bias, .../linear_attn/norm/scale
     .../mlp/{gate_proj,up_proj,down_proj}/kernel
  norm/scale [D]
  lm_head/kernel [D, V]   only when tie_word_embeddings is false

Cache (init_cache): {"index": int32 scalar (next slot to write), "valid_BS": bool [B, S],
  "layers": {"layer_{j}": per-layer state with a leading [R] axis}} where a full-attention state is
  {"k_BGKS", "v_BGSK"} (K after k_norm + RoPE, raw V; laid out as a decode step reads them: GatedAttention) and
  a linear state is {"conv_BWC" [B, W-1, C] pre-activation conv inputs, "state_BHKV" fp32 [B, Hv, dk, dv]}.
  init_cache(rollback=True) adds "rollback_B" bool [B] and, per linear layer, the pending last token
  "pend_x_BC", "pend_g_BH", "pend_k_BHK", "pend_u_BHV" (GatedDeltaNet says how).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pipo_jax.config import FULL, LINEAR, ModelConfig
from pipo_jax.models.attention import GatedAttention
from pipo_jax.models.gated_deltanet import GatedDeltaNet
from pipo_jax.models.norms import PROJECTION, GatedRMSNorm, RMSNorm, dense  # noqa: F401  (norms re-exported)

RESIDUAL_AXES = ("batch", "length", "act_embed")


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); gate/up [D, F], down [F, D]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.config
    gate_BTF = dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "gate_proj")(x_BTD)
    up_BTF = dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "up_proj")(x_BTD)
    h_BTF = nn.with_logical_constraint(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(h_BTF)


class DecoderLayer(nn.Module):
  """One pre-norm layer: x += mixer(input_layernorm(x)); x += mlp(post_attention_layernorm(x)).

  Works standalone (the PIPO MTP head reuses a full-attention one with its own cache from init_layer_cache).
  """

  config: ModelConfig
  layer_type: str = FULL

  @nn.compact
  def __call__(
    self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array | None = None, cache: dict | None = None
  ) -> tuple[jax.Array, dict | None]:
    """x_BTD, positions_BT int, valid_BT bool (None: all valid), cache (init_layer_cache or None)
    -> (x_BTD, new cache or None). The layer cache carries "index" and "valid_BS" too; both are advanced."""
    cfg = self.config
    h_BTD = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="input_layernorm")(x_BTD)
    if self.layer_type == FULL:
      mix_BTD, new_cache = GatedAttention(cfg, name="self_attn")(h_BTD, positions_BT, valid_BT, cache)
    elif self.layer_type == LINEAR:
      mix_BTD, new_cache = GatedDeltaNet(cfg, name="linear_attn")(h_BTD, valid_BT, cache)
      if new_cache is not None:  # attention layers advance these themselves; keep both kinds consistent
        new_cache = _advance(new_cache, valid_BT, x_BTD.shape)
    else:
      raise ValueError(f"unknown layer_type {self.layer_type!r}")
    x_BTD = nn.with_logical_constraint(x_BTD + mix_BTD, RESIDUAL_AXES)
    h_BTD = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="post_attention_layernorm")(x_BTD)
    x_BTD = nn.with_logical_constraint(x_BTD + MLP(cfg, name="mlp")(h_BTD), RESIDUAL_AXES)
    return x_BTD, new_cache


def _advance(cache: dict, valid_BT: jax.Array | None, shape_BTD) -> dict:
  """Write valid_BT into valid_BS at the write index and advance the index by T."""
  B, T = shape_BTD[:2]
  if valid_BT is None:
    valid_BT = jnp.ones((B, T), bool)
  index = cache["index"]
  return dict(cache, valid_BS=jax.lax.dynamic_update_slice(cache["valid_BS"], valid_BT, (0, index)), index=index + T)


_SHARED = ("index", "valid_BS", "rollback_B")  # whole-backbone cache keys every layer sees


class _LayerGroup(nn.Module):
  """One repeat of the layer group; scanned over R repeats by Qwen35.

  The carry is (x_BTD, the whole stacked layer cache or None); `repeat` (int32, the scanned input) picks this
  repeat's row, which each layer updates in place (pipo_jax/models/cache_slots.py says why). run_unstacked
  calls it with repeat None and this repeat's own caches.
  """

  config: ModelConfig
  group: tuple

  @nn.compact
  def __call__(self, carry, positions_BT, valid_BT, shared, repeat):
    x_BTD, caches = carry
    row = {} if repeat is None else {"layer": repeat}  # None: the caches are this repeat's own (unstacked)
    for j, layer_type in enumerate(self.group):
      name = f"layer_{j}"
      layer_cache = None if caches is None else {**caches[name], **shared, **row}
      x_BTD, layer_cache = DecoderLayer(self.config, layer_type, name=name)(x_BTD, positions_BT, valid_BT, layer_cache)
      if caches is not None:
        caches = {**caches, name: {k: v for k, v in layer_cache.items() if k not in _SHARED + ("layer",)}}
    return (x_BTD, caches), None


def _remat_policy(name: str):
  if name == "dots":
    # Save matmul outputs without batch dims (the projections); recompute the cheap elementwise rest. A
    # projection is a custom_vjp (norms.project) that the dot policy does not see: it is saved by its name.
    policies = jax.checkpoint_policies
    return policies.save_from_both_policies(
      policies.checkpoint_dots_with_no_batch_dims, policies.save_only_these_names(PROJECTION)
    )
  return None  # "full": save nothing but the group inputs


def _layer_stack(config: ModelConfig):
  group, repeats = config.layer_pattern()
  block = _LayerGroup
  if config.remat != "none":
    # prevent_cse=False is safe (and faster) under scan, which already blocks the CSE it guards against.
    block = nn.remat(block, policy=_remat_policy(config.remat), prevent_cse=False)
  scanned = nn.scan(
    block,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
    length=repeats,
    unroll=1 if config.scan_layers else repeats,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(config, group, name="layers")


class Qwen35(nn.Module):
  """The backbone: embed -> scanned layer groups -> final (1+w) RMSNorm; head tied or untied."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
    )
    self.layers = _layer_stack(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), cfg, None)

  def embed(self, ids_BT: jax.Array) -> jax.Array:
    """ids_BT int -> x_BTD in the compute dtype (no embedding scale)."""
    return nn.with_logical_constraint(self.embed_tokens(ids_BT), RESIDUAL_AXES)

  def __call__(
    self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array | None = None, cache: dict | None = None
  ) -> tuple[jax.Array, dict | None]:
    """x_BTD (from embed, or any input embeddings), positions_BT int RoPE positions, valid_BT bool (False =
    left pad) -> (h_BTD post-final-norm, new cache or None). With a cache the T tokens are appended at
    cache["index"]; the caller must keep index + T <= S."""
    x_BTD = nn.with_logical_constraint(x_BTD.astype(self.config.dtype), RESIDUAL_AXES)
    shared = None if cache is None else {k: cache[k] for k in _SHARED if k in cache}
    layer_caches = repeat_R = None
    if cache is not None:
      layer_caches = cache["layers"]
      repeat_R = jnp.arange(self.config.layer_pattern()[1], dtype=jnp.int32)
    (x_BTD, new_layer_caches), _ = self.layers((x_BTD, layer_caches), positions_BT, valid_BT, shared, repeat_R)
    h_BTD = self.norm(x_BTD)
    if self.is_initializing():  # create the embedding and head params in the same init call
      _ = self.embed_tokens.embedding
      if not self.config.tie_word_embeddings:
        self.lm_head(h_BTD)
    if cache is None:
      return h_BTD, None
    new_cache = _advance(cache, valid_BT, x_BTD.shape)
    new_cache["layers"] = new_layer_caches
    return h_BTD, new_cache

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """h_BTD (post-final-norm) -> logits_BTV in the compute dtype."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(h_BTD)
    return self.lm_head(h_BTD)

  def head_kernel(self) -> jax.Array:
    """W_DV, the LM-head matrix (embedding transposed when tied), cast to the compute dtype."""
    if self.config.tie_word_embeddings:
      w_DV = self.embed_tokens.embedding.T
    else:
      w_DV = self.lm_head.variables["params"]["kernel"]
    return w_DV.astype(self.config.dtype)


# ---------------------------------------------------------------------------------------------------
# Caches and positions
# ---------------------------------------------------------------------------------------------------


def _layer_state(config: ModelConfig, layer_type: str, batch_size: int, max_len: int, dtype) -> dict:
  if layer_type == FULL:
    G, S, K = config.num_key_value_heads, max_len, config.head_dim
    return {"k_BGKS": jnp.zeros((batch_size, G, K, S), dtype), "v_BGSK": jnp.zeros((batch_size, G, S, K), dtype)}
  return {
    "conv_BWC": jnp.zeros((batch_size, config.linear_conv_kernel_dim - 1, config.linear_conv_dim), dtype),
    # The recurrent state stays fp32 whatever the compute dtype (mamba_ssm_dtype float32).
    "state_BHKV": jnp.zeros(
      (batch_size, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim), jnp.float32
    ),
  }


def _pending_update(config: ModelConfig, batch_size: int, dtype) -> dict:
  """A DeltaNet layer's pending last token in a rollback cache (GatedDeltaNet's docstring), as an identity."""
  B, H, K, V = batch_size, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
  return {
    "pend_x_BC": jnp.zeros((B, config.linear_conv_dim), dtype),
    "pend_g_BH": jnp.zeros((B, H), jnp.float32),
    "pend_k_BHK": jnp.zeros((B, H, K), jnp.float32),
    "pend_u_BHV": jnp.zeros((B, H, V), jnp.float32),
  }


def init_layer_cache(config: ModelConfig, layer_type: str, batch_size: int, max_len: int, dtype=None) -> dict:
  """Cache for one standalone DecoderLayer: its state plus its own "index" and "valid_BS" [B, S]."""
  dtype = jnp.dtype(dtype or config.dtype)
  return {
    "index": jnp.zeros((), jnp.int32),
    "valid_BS": jnp.zeros((batch_size, max_len), bool),
    **_layer_state(config, layer_type, batch_size, max_len, dtype),
  }


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None, rollback: bool = False) -> dict:
  """Static-shape cache for the whole backbone (layout in the module docstring). dtype: K/V and conv state
  (default: the compute dtype); recurrent states are always fp32. rollback: the DeltaNet layers keep their
  states one token behind with the last token's update pending, and "rollback_B" [B] says which rows drop it
  (GatedDeltaNet's docstring; speculative decoding undoes a rejected draft with it)."""
  dtype = jnp.dtype(dtype or config.dtype)
  group, repeats = config.layer_pattern()
  layers = {}
  for j, layer_type in enumerate(group):
    state = _layer_state(config, layer_type, batch_size, max_len, dtype)
    if rollback and layer_type == LINEAR:
      state.update(_pending_update(config, batch_size, dtype))
    layers[f"layer_{j}"] = {k: jnp.zeros((repeats,) + v.shape, v.dtype) for k, v in state.items()}
  cache = {"index": jnp.zeros((), jnp.int32), "valid_BS": jnp.zeros((batch_size, max_len), bool), "layers": layers}
  if rollback:
    cache["rollback_B"] = jnp.zeros((batch_size,), bool)
  return cache


def unstack_layers(tree: dict, repeats: int) -> tuple:
  """{"layer_j": {...leaves [R, ...]}} -> R trees {"layer_j": {...leaves [...]}}: the per-repeat params or
  caches of the decode layout (`run_unstacked`)."""
  return tuple(jax.tree_util.tree_map(lambda a, r=r: a[r], tree) for r in range(repeats))


def run_unstacked(config: ModelConfig, layer_params: tuple, x_BTD, positions_BT, valid_BT, cache: dict):
  """The layer stack in the decode layout: per-repeat params (`unstack_layers` of the params' "layers") and a
  cache whose "layers" are per-repeat too, run by a Python loop instead of the scan. On CPU a scan's body
  copies every weight it slices out of the stack and every DeltaNet state it updates in it, each step; split
  once outside the token loop, the weights are loop-invariant and the caches update in place. Returns
  (x_BTD before the final norm, new cache)."""
  group, _ = config.layer_pattern()
  x_BTD = x_BTD.astype(config.dtype)
  shared = {k: cache[k] for k in _SHARED if k in cache}
  new_layers = []
  for params_r, cache_r in zip(layer_params, cache["layers"]):
    block = _LayerGroup(config, group)
    (x_BTD, cache_r), _ = block.apply({"params": params_r}, (x_BTD, cache_r), positions_BT, valid_BT, shared, None)
    new_layers.append(cache_r)
  new_cache = _advance(cache, valid_BT, x_BTD.shape)
  new_cache["layers"] = tuple(new_layers)
  return x_BTD, new_cache


def positions_from_valid(valid_BT: jax.Array, offset_B: jax.Array | None = None) -> jax.Array:
  """RoPE positions for a left-padded batch: 0, 1, ... over the real tokens (pads get 0), plus offset_B
  (e.g. the number of real tokens already in the cache, `cache["valid_BS"].sum(-1)`)."""
  pos_BT = jnp.maximum(jnp.cumsum(valid_BT.astype(jnp.int32), axis=-1) - 1, 0)
  if offset_B is not None:
    pos_BT = pos_BT + offset_B[:, None].astype(jnp.int32)
  return pos_BT


def boxed_backbone_params(config: ModelConfig, rng: jax.Array | None = None):
  """Qwen35 params at their init, boxed with their logical axis names; abstract (ShapeDtypeStructs, nothing
  computed) when rng is None."""

  def init(key):
    x_BTD = jnp.zeros((1, 1, config.hidden_size), config.dtype)
    return Qwen35(config).init(key, x_BTD, jnp.zeros((1, 1), jnp.int32))["params"]

  return jax.eval_shape(init, jax.random.PRNGKey(0)) if rng is None else init(rng)


def init_params(config: ModelConfig, rng: jax.Array):
  """Unboxed random params of Qwen35 (for tests and from-scratch runs)."""
  return nn.meta.unbox(boxed_backbone_params(config, rng))
