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
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from pipo_jax.config import ModelConfig


def logical_param(module: nn.Module, name: str, init, axes: tuple, shape: tuple, dtype: Any) -> jax.Array:
  """`module.param` with logical axis names on it. Inside the module body flax hands back the plain array (the
  names stay on the stored, boxed param), so this is typed as the array the caller computes with."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)  # type: ignore[return-value]


PROJECTION = "projection"  # checkpoint name of every Dense output (the remat policy "dots" saves them)


@jax.custom_vjp
def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out] -> [..., out] (the matmul of `Dense`), with a hand-written backward."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _project_fwd(x, kernel):
  return project(x.value, kernel.value), (x.value if kernel.perturbed else None, kernel.value if x.perturbed else None)


def _project_bwd(residuals, g):
  """dx = g kernel^T; dkernel = x^T g contracting every leading axis at once. JAX's own transpose rule forms
  dkernel as a product over the leading axes followed by a transpose, which XLA:CPU materialises with a layout
  copy of g fused into g's elementwise producer (e.g. the SiLU derivative), a slow transposing loop. Measured on a
  SwiGLU MLP, [4, 512, 256] -> 768, fwd + bwd on 2 CPU cores: 75-85 ms -> 54-61 ms. (Flattening x to 2-D gives
  the same speed but made the SPMD partitioner compute a wrong compressor gradient on a data x fsdp x tensor
  mesh.)"""
  x, kernel = residuals
  if isinstance(g, SymbolicZero):
    return None, None
  lead = tuple(range(g.ndim - 1))
  dx = None if kernel is None else jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  dkernel = None if x is None else jax.lax.dot_general(x, g, ((lead, lead), ((), ())))
  return dx, dkernel


project.defvjp(_project_fwd, _project_bwd, symbolic_zeros=True)


class Dense(nn.Module):
  """`nn.Dense` (same params `kernel` [in, out] and optional `bias`, same init and dtype promotion) whose matmul
  is `project` (its backward reads both operands in place; `_project_bwd` says why)."""

  features: int
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = checkpoint_name(project(x, kernel), PROJECTION)
    return y if bias is None else y + bias


def dense(features: int, axes: tuple, config: ModelConfig, name: str | None) -> Dense:
  """A bias-free `Dense` named like its HF module, kernel [in, out] with logical axis names `axes`, initialised
  N(0, initializer_range) as HF does."""
  return Dense(
    features,
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
