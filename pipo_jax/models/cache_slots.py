"""Reading and writing one layer's decode state, whether it sits alone or in the backbone's stacked cache.

The backbone keeps every layer's state stacked on a leading [R] axis and carries the whole stack through the
layer scan. A layer then writes only what changed (one K/V position, its DeltaNet state) at [layer, ...] in
place, instead of the scan slicing its full state out and stacking a full copy back every decode step (two
copies of every KV cache per layer per token, which at 32K context cost more than the layer's matmuls).

A layer cache is a dict of arrays. With a "layer" key (an int32 scalar) its arrays are the stacked [R, ...]
ones and the key selects the row; without it (the MTP head's standalone layer) they are the layer's own.
"""

from __future__ import annotations

import jax


def read_state(cache: dict, key: str) -> jax.Array:
  """The layer's own view of cache[key] (a dynamic slice of the stack when the cache is stacked)."""
  array = cache[key]
  if "layer" not in cache:
    return array
  return jax.lax.dynamic_index_in_dim(array, cache["layer"], axis=0, keepdims=False)


def write_state(cache: dict, key: str, update: jax.Array, start: tuple) -> jax.Array:
  """cache[key] with `update` (in the layer's own shape, cast to the cache's dtype) written at `start` of the
  layer's view; returns the (stacked, when the cache is stacked) array, for dict(cache, key=...)."""
  array = cache[key]
  update = update.astype(array.dtype)
  if "layer" not in cache:
    return jax.lax.dynamic_update_slice(array, update, start)
  return jax.lax.dynamic_update_slice(array, update[None], (cache["layer"], *start))
