"""LoRA as a pure transformation of the params tree.

A LoRA adapter tree is *sparse*: it mirrors the params tree but only holds the Dense modules whose
name (the path component right above `kernel`) is in `LoraConfig.targets`, e.g.

  params["backbone"]["layers"]["layer_3"]["self_attn"]["q_proj"]["kernel"]   [R, D, O]
  lora  ["backbone"]["layers"]["layer_3"]["self_attn"]["q_proj"] = {"a": [R, D, r], "b": [R, r, O]}

Leading axes of a kernel (scanned layer groups: `layers`) are kept on `a` and `b`, so one stacked
kernel gets one stacked adapter and the model's scan slices both the same way.

Matching is by exact module name, which is the PEFT "suffix" rule on HF names (`...self_attn.q_proj`
matches `q_proj`; GDN's `in_proj_qkv` does not), so targets reach the backbone full-attention layers,
every MLP and the MTP layer, as the paper's recipe requires (docs/method.md#trainable-parameters).

Forward:  W_eff = W + (alpha / r) * A @ B      (A: [in, r], B: [r, out], kernels are [in, out]).

Dropout. PEFT drops the adapter's *input activations* per element: y = W x + s B A drop(x). A merge in
weight space cannot express that (the effective weight would differ per token). What `apply_lora`
offers instead is *rank dropout*: when `deterministic=False` and `dropout > 0`, each rank-1 component
of each adapter (per stacked layer) is dropped with probability p and the rest scaled by 1/(1-p), i.e.
A' = A * m with m in {0, 1/(1-p)}^r, drawn once per call (per step). It has the same expectation as
the undropped adapter but is a coarser, higher-variance regulariser than PEFT's; runs that must match
PEFT exactly should set `lora.dropout=0`.

Memory note for model code: `apply_lora` on the whole tree materialises W_eff (and, under `jax.grad`,
a full-size gradient for every targeted kernel). Calling it per layer inside the scan body (it works on
any slice, leading axes or not) keeps that to one layer at a time.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Params = dict
LORA_KEY = "lora"  # top-level key of the adapter tree inside a train state's params (see optim.py)


def scale(lora_cfg) -> float:
  """alpha / r, the factor PEFT applies to B A."""
  return float(lora_cfg.alpha) / float(lora_cfg.rank)


def _targeted_kernels(params: Params, targets, path=()):
  """Yield (path_to_module, kernel) for every `kernel` leaf whose parent module is targeted."""
  for k, v in params.items():
    if isinstance(v, dict):
      yield from _targeted_kernels(v, targets, path + (k,))
    elif k == "kernel" and path and path[-1] in targets:
      yield path, v


def _get(tree: Params, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: Params, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _copy_dicts(tree):
  """A copy of the dict skeleton (leaves shared), so callers' trees are never mutated."""
  return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}


def init_lora(params: Params, lora_cfg, rng: jax.Array, dtype: Any | None = None) -> Params:
  """Adapters for every targeted kernel `[..., in, out]`: {'a': [..., in, r], 'b': [..., r, out]}.

  A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5)) on lora_A), B = 0, so the
  adapted model equals the base model at init. `dtype` defaults to each kernel's dtype. `params`
  may be concrete arrays or `jax.ShapeDtypeStruct`s (under `jax.eval_shape`). Raises if nothing matches.
  """
  if lora_cfg.rank <= 0:
    raise ValueError(f"lora.rank={lora_cfg.rank}: init_lora needs rank > 0")
  found = list(_targeted_kernels(params, tuple(lora_cfg.targets)))
  if not found:
    raise ValueError(f"lora.targets={tuple(lora_cfg.targets)} match no Dense kernel in the params tree")
  r = int(lora_cfg.rank)
  for path, w in found:
    if len(w.shape) < 2:
      raise ValueError(f"{'/'.join(path)}/kernel has shape {w.shape}; LoRA needs [..., in, out]")
  # One uniform draw for all adapters, sliced per kernel: one RNG program to compile instead of one
  # per kernel shape (that dominated start-up time). Adapters are small (r x (in + out) per kernel),
  # so the flat buffer is too.
  sizes = [math.prod(w.shape[:-1]) * r for _, w in found]
  flat = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out: Params = {}
  offset = 0
  for (path, w), n in zip(found, sizes):
    *lead, d_in, d_out = w.shape
    dt = dtype or w.dtype
    a = flat[offset : offset + n].reshape(*lead, d_in, r) / math.sqrt(d_in)
    offset += n
    _set(out, path, {"a": a.astype(dt), "b": jnp.zeros((*lead, r, d_out), dt)})
  return out


def _delta(a, b, s, mask=None):
  """s * A @ B over any leading axes, in fp32 (small deltas survive until the final cast)."""
  a = a.astype(jnp.float32)
  if mask is not None:
    a = a * mask[..., None, :]
  return s * jnp.einsum("...ir,...ro->...io", a, b.astype(jnp.float32))


def apply_lora(
  params: Params, lora_params: Params, lora_cfg, rng: jax.Array | None = None, deterministic: bool = True
) -> Params:
  """Params with W_eff = W + (alpha/r) A @ B on every adapted kernel (other leaves are shared).

  Differentiable in both trees. The sum is formed in fp32 and cast to the kernel's dtype.
  With `deterministic=False` and `lora_cfg.dropout > 0`, applies rank dropout (module docstring);
  `rng` is then required.
  """
  s = scale(lora_cfg)
  p = float(lora_cfg.dropout)
  use_dropout = (not deterministic) and p > 0.0
  if use_dropout and rng is None:
    raise ValueError("apply_lora(deterministic=False) with lora.dropout > 0 needs an rng")
  out = _copy_dicts(params)
  for i, (path, ab) in enumerate(_adapters(lora_params)):
    try:
      w = _get(params, path + ("kernel",))
    except KeyError as e:
      raise ValueError(f"LoRA adapter {'/'.join(path)} has no kernel in the params tree") from e
    mask = None
    if use_dropout:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - p, ab["a"].shape[:-2] + ab["a"].shape[-1:])
      mask = keep.astype(jnp.float32) / (1.0 - p)
    w_eff = (w.astype(jnp.float32) + _delta(ab["a"], ab["b"], s, mask)).astype(w.dtype)
    _set(out, path + ("kernel",), w_eff)
  return out


def _adapters(lora_params: Params, path=()):
  """Yield (module_path, {'a','b'}) for every adapter in a sparse LoRA tree."""
  for k, v in lora_params.items():
    if isinstance(v, dict) and set(v) == {"a", "b"}:
      yield path + (k,), v
    elif isinstance(v, dict):
      yield from _adapters(v, path + (k,))
    else:
      raise ValueError(f"unexpected leaf {'/'.join(path + (k,))} in a LoRA tree (expected {{'a','b'}} pairs)")


def adapter_paths(lora_params: Params) -> list:
  """'/'-joined module paths that carry an adapter (for logs and tests)."""
  return ["/".join(p) for p, _ in _adapters(lora_params)]


def split_params(params: Params) -> tuple[Params, Params | None]:
  """(model params, adapters) from a tree that may hold adapters under `LORA_KEY`."""
  if LORA_KEY not in params:
    return params, None
  base = {k: v for k, v in params.items() if k != LORA_KEY}
  return base, params[LORA_KEY]


def materialize(params: Params, lora_cfg, rng: jax.Array | None = None, deterministic: bool = True) -> Params:
  """The params tree a model's `apply` takes: adapters (if any, under `LORA_KEY`) applied and removed."""
  base, lora = split_params(params)
  if lora is None:
    return base
  return apply_lora(base, lora, lora_cfg, rng=rng, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------
# Sharding: adapters follow their base kernel's axes; the rank axis is never sharded (it is small
# and contracted immediately, so sharding it would only add a reduction).
# ----------------------------------------------------------------------------------------------


def lora_axes_for_kernel(kernel_axes):
  """Logical axes of (a, b) from a kernel's `(..., in_axis, out_axis)` (tuple or PartitionSpec).

  e.g. ('layers', 'embed', 'heads') -> a: ('layers', 'embed', None), b: ('layers', None, 'heads').
  The container type of `kernel_axes` is kept (a PartitionSpec gives PartitionSpecs).
  """
  axes = tuple(kernel_axes)
  if len(axes) < 2:
    raise ValueError(f"kernel axes {kernel_axes} have fewer than 2 entries")

  def make(t):
    return type(kernel_axes)(t) if type(kernel_axes) in (tuple, list) else type(kernel_axes)(*t)

  a = (*axes[:-1], None)
  b = (*axes[:-2], None, axes[-1])
  return {"a": make(a), "b": make(b)}


def lora_logical_axes(param_axes: Params, lora_params: Params) -> Params:
  """A tree like `lora_params` whose leaves are the adapters' logical axes.

  `param_axes` mirrors the params tree with each `kernel` entry a tuple of logical axis names (or a
  PartitionSpec), as built by the sharding module.
  """
  out: Params = {}
  for path, _ in _adapters(lora_params):
    try:
      k_axes = _get(param_axes, path + ("kernel",))
    except KeyError as e:
      raise ValueError(f"no logical axes for {'/'.join(path)}/kernel") from e
    _set(out, path, lora_axes_for_kernel(k_axes))
  return out


def lora_shardings(param_shardings: Params, lora_params: Params) -> Params:
  """NamedShardings for the adapters from the base kernels' NamedShardings (same mesh).

  A PartitionSpec may omit trailing unsharded dims, so it is padded to the kernel's rank first.
  """
  out: Params = {}
  for path, ab in _adapters(lora_params):
    s = _get(param_shardings, path + ("kernel",))
    ndim = len(ab["a"].shape)
    spec = tuple(s.spec) + (None,) * (ndim - len(tuple(s.spec)))
    axes = lora_axes_for_kernel(spec)
    _set(out, path, {k: jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*v)) for k, v in axes.items()})
  return out
