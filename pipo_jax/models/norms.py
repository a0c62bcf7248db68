"""The two RMSNorm variants of Qwen3.5, and the param helpers every model file builds its layers with
(`logical_param`, `dense`).

Axis vocabulary: B batch, T tokens, D features (any last axis), H heads.
Both norms compute in fp32 whatever the input dtype and cast back at the end, as HF does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pipo_jax.config import ModelConfig


def logical_param(module: nn.Module, name: str, init, axes: tuple, shape: tuple, dtype: Any) -> jax.Array:
  """`module.param` with logical axis names on it. Inside the module body flax hands back the plain array (the
  names stay on the stored, boxed param), so this is typed as the array the caller computes with."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)  # type: ignore[return-value]


def dense(features: int, axes: tuple, config: ModelConfig, name: str) -> nn.Dense:
  """A bias-free `nn.Dense` named like its HF module, kernel [in, out] with logical axis names `axes`, initialised
  N(0, initializer_range) as HF does."""
  return nn.Dense(
    features,
    use_bias=False,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes),
  )


def _rms_normalise(x32: jax.Array, eps: float) -> jax.Array:
  # eps sits inside the root (as HF).
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """Zero-centred RMSNorm: y = x / rms(x) * (1 + w). Param `scale` [D], stored as the offset w (init 0).

  Used for the layer norms, the final norm, q_norm/k_norm and the MTP norms.
  """

  eps: float = 1e-6
  param_dtype: Any = jnp.float32
  axis_name: str | None = "embed"  # logical axis of the scale vector

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = logical_param(self, "scale", nn.initializers.zeros_init(), (self.axis_name,), (x.shape[-1],), self.param_dtype)
    # (1 + w) is applied in fp32 before the cast back; this only matters in bf16 (as HF).
    y = _rms_normalise(x.astype(jnp.float32), self.eps) * (1.0 + w.astype(jnp.float32))
    return y.astype(x.dtype)


class GatedRMSNorm(nn.Module):
  """GDN output norm: y = w * (x / rms(x)) * silu(z), with a *plain* scale `scale` [dv] (init 1).

  x_...K and z_...K share their shape; normalisation is over the last axis (one value head).
  """

  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    w = logical_param(self, "scale", nn.initializers.ones_init(), ("head_dim",), (x.shape[-1],), self.param_dtype)
    # HF casts the normalised value back to the input dtype before multiplying by w, then multiplies by the
    # fp32 silu(z) and casts the product back; we follow that order so bf16 matches too.
    y = _rms_normalise(x.astype(jnp.float32), self.eps).astype(x.dtype)
    y = (w * y).astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype)
