"""Device mesh, the logical-axis rules table, and param / batch shardings.

Every parameter carries logical axis names (nn.with_logical_partitioning); RULES maps them to the mesh
axes ("data", "fsdp", "tensor"). Params are born sharded: `jax.eval_shape` of init -> shardings from the
names -> `jax.jit(init, out_shardings=...)`. A mesh axis that does not divide the dimension it would shard
is an error naming the parameter, the dimension and the axis: we never silently replicate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pipo_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# The one rules table. Activation axes: batch over data*fsdp; the residual feature axis ('act_embed') stays
# whole so FSDP-sharded 'embed' params are all-gathered per layer (ZeRO-3 style). Model-parallel axes
# (heads, MLP width, vocab, GDN channels) go on 'tensor'.
RULES: tuple = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("act_embed", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("gdn_qkv", "tensor"),
  ("gdn_value", "tensor"),
  ("gdn_heads", "tensor"),
  ("head_dim", None),
  ("embed2", "fsdp"),  # PIPO heads: the concatenated [2D] input of the compressor / MTP fc / confidence head
  ("embed_out", "tensor"),  # PIPO heads: their output (or hidden) width
  ("conv_width", None),
  ("layers", None),
)


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes (data, fsdp, tensor); at most one size may be -1 (takes the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not divisible by {known}")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # non-TPU topologies without a known physical layout: plain row-major order
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def _rules_dict(rules) -> dict:
  return {name: axes for name, axes in rules}


def logical_to_mesh_spec(logical_axes: Sequence[str | None], rules=RULES) -> P:
  """('embed', 'mlp') -> PartitionSpec('fsdp', 'tensor'). Unknown names raise (no silent replication)."""
  table = _rules_dict(rules)
  out = []
  for name in logical_axes:
    if name is None:
      out.append(None)
    elif name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in pipo_jax.sharding.RULES")
    else:
      out.append(table[name])
  return P(*out)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_shardings(abstract_params: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedSharding per leaf from a *boxed* params tree (e.g. `jax.eval_shape(model.init, ...)["params"]`).

  Returns the tree with the boxes removed (same structure as unboxed params). Raises ValueError listing every
  parameter whose dimension is not divisible by the mesh axes its logical name maps to, and every parameter
  without logical axis names.
  """
  problems = []

  def one(path, leaf):
    name = _path_str(path)
    if not isinstance(leaf, nn.meta.Partitioned):
      problems.append(f"{name}: no logical axis names (wrap its init in nn.with_logical_partitioning)")
      return NamedSharding(mesh, P())
    shape = leaf.value.shape
    if len(leaf.names) != len(shape):
      problems.append(f"{name}: {len(leaf.names)} logical names {leaf.names} for shape {shape}")
      return NamedSharding(mesh, P())
    spec = logical_to_mesh_spec(leaf.names, rules)
    used = []
    for dim, (logical, axes) in enumerate(zip(leaf.names, spec)):
      size = _axis_size(mesh, axes)
      if shape[dim] % size:
        problems.append(
          f"{name}: dimension {dim} ({logical!r}, size {shape[dim]}) is not divisible by mesh "
          f"axis {axes!r} (size {size})"
        )
      used += [axes] if isinstance(axes, str) else list(axes or ())
    if len(used) != len(set(used)):
      problems.append(f"{name}: logical axes {leaf.names} map mesh axes {used} more than once")
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=lambda x: isinstance(x, nn.meta.Partitioned))
  if problems:
    raise ValueError("cannot shard params on mesh " + str(dict(mesh.shape)) + ":\n  " + "\n  ".join(problems))
  return out


def create_sharded_params(init_fn: Callable[..., Any], *args, mesh: Mesh, rules=RULES) -> tuple[Any, Any]:
  """Run `init_fn(*args) -> boxed params` so every param is born on its sharding; returns (params, shardings).

  Example: create_sharded_params(lambda k: Qwen35(cfg).init(k, x, pos)["params"], key, mesh=mesh).
  """
  shardings = param_shardings(jax.eval_shape(init_fn, *args), mesh, rules)
  with use_rules(mesh, rules):
    params = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


def place(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)` that also works when a target sharding spans other processes' devices.

  A leaf this process holds whole (a numpy array, or a jax.Array on local devices: loaded from the same files
  or initialised from the same seed in every process) is laid out through the host, each process supplying
  the shards of its own devices: a plain device_put of a committed local array to a multi-host sharding is a
  cross-host transfer, which a backend without cross-host transfers configured refuses (measured on CPU with
  gloo). One process: a plain device_put.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard inside a program
      return x if x.sharding == s else jax.jit(lambda y: y, out_shardings=s)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree_util.tree_map(one, tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over data*fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host arrays (this process's slice of the global batch) -> global arrays sharded on the batch axis."""

  def one(x):
    x = np.asarray(x)
    size = _axis_size(mesh, ("data", "fsdp"))
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % size:
      raise ValueError(f"global batch {global_rows} is not divisible by data*fsdp = {size}")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree_util.tree_map(one, batch)


def active_batch_shards() -> int:
  """How many shards the active mesh and rules (use_rules) split the 'batch' logical axis into; 1 outside them.
  Lets a loop keep per-shard partial sums along an explicit shard axis and reduce them once after the loop."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(("batch",))[0]
  if axes is None:
    return 1
  sizes = dict(mesh.shape)
  return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules=RULES):
  """Activate the mesh and the logical rules so nn.with_logical_constraint inside jitted code takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
