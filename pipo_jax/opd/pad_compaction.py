"""PAD compaction for the OPD teacher and the teacher/student stream alignment
(docs/method.md#teacher-and-pad-compaction, docs/method.md#stream-alignment).

Axis names: B batch, T tokens, L = T / 2 pairs, D hidden size.

The uncompressed teacher has never seen PAD in mid-sequence, so it runs on the rollout with every
PAD removed (`compact`), and its states are mapped back to the original positions with
idx_t = max(cumsum(keep)_t - 1, 0) (`expand_index`): a real token maps to its own state, a PAD to the
state of the previous real token, whose next-token distribution predicts the next real token, as
the student's (token, PAD) latent must. A PAD before any real token maps to index 0 (the first real
token); such a position never carries a valid label.

Everything is pure jnp with static shapes and works for any batch size (each row compacts
independently; the reference asserted B = 1: docs/method.md#batched-opd).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Compacted(NamedTuple):
  ids: jax.Array  # [B, T] real tokens first, in original order, then `filler`
  valid: jax.Array  # [B, T] bool, index < n_keep
  src_index: jax.Array  # [B, T] int32 original position of each compact slot (0 on filler slots)
  n_keep: jax.Array  # [B] int32


def compact(ids_BT: jax.Array, keep_BT: jax.Array, filler_id: int) -> Compacted:
  """Move the kept (non-PAD) tokens of each row to the front, stable, and fill the rest.

  A scatter to cumsum(keep) - 1 (non-kept tokens are dropped out of range) gives the same result
  as the reference's stable argsort without the O(T log T) sort.
  """
  b, t = ids_BT.shape
  keep = keep_BT.astype(bool)
  dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, t)  # t = out of range -> dropped
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  ids_c = jnp.full((b, t), filler_id, ids_BT.dtype).at[rows, dest].set(ids_BT, mode="drop")
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  src = jnp.zeros((b, t), jnp.int32).at[rows, dest].set(pos, mode="drop")
  n_keep = keep.sum(axis=1).astype(jnp.int32)
  valid = pos < n_keep[:, None]
  return Compacted(ids_c, valid, src, n_keep)


def gather_tokens(x_BT, index_BT: jax.Array):
  """x[b, index[b, t], ...] for x [B, T', ...] and index [B, T]."""
  idx = index_BT.reshape(index_BT.shape + (1,) * (x_BT.ndim - 2))
  return jnp.take_along_axis(x_BT, idx, axis=1)


def compact_like(x_BT: jax.Array, c: Compacted, fill=0) -> jax.Array:
  """Apply the compaction of `c` to another per-token array (e.g. an attention mask)."""
  out = gather_tokens(x_BT, c.src_index)
  mask = c.valid.reshape(c.valid.shape + (1,) * (x_BT.ndim - 2))
  return jnp.where(mask, out, jnp.asarray(fill, x_BT.dtype))


def expand_index(keep_BT: jax.Array) -> jax.Array:
  """[B, T] int32 idx_t = max(cumsum(keep)_t - 1, 0): the compact slot whose state position t uses."""
  return jnp.maximum(jnp.cumsum(keep_BT.astype(jnp.int32), axis=1) - 1, 0)


def expand(g_c_BTD: jax.Array, keep_BT: jax.Array) -> jax.Array:
  """Teacher states on compact positions [B, T, ...] -> states on the original positions."""
  return gather_tokens(g_c_BTD, expand_index(keep_BT))


# ----------------------------------------------------------------------------------
# Stream alignment and the MTP PAD fill (docs/method.md#stream-alignment, docs/method.md#pad-label-fill)
# ----------------------------------------------------------------------------------


def stream_positions(t: int):
  """Teacher positions of the two streams for an even T: backbone 2j+1, MTP 2j+2, j = 0..L-2."""
  if t % 2 or t < 4:
    raise ValueError(f"stream alignment needs an even length >= 4, got T={t}")
  j = jnp.arange(t // 2 - 1, dtype=jnp.int32)
  return 2 * j + 1, 2 * j + 2


def teacher_stream_states(g_c_BTD: jax.Array, keep_BT: jax.Array):
  """Teacher states for the backbone and MTP streams straight from the compact states.

  Gathers only the 2(L-1) positions needed instead of expanding all T first.
  Returns (g_back [B, L-1, D] at positions 2j+1, g_mtp [B, L-1, D] at positions 2j+2).
  """
  idx = expand_index(keep_BT)
  pb, pm = stream_positions(keep_BT.shape[1])
  return gather_tokens(g_c_BTD, idx[:, pb]), gather_tokens(g_c_BTD, idx[:, pm])


def stream_labels(labels_BT: jax.Array):
  """Unshifted labels -> (backbone labels x_{2j+2} [B, L-1], MTP labels x_{2j+3} [B, L-1])."""
  return labels_BT[:, 2::2], labels_BT[:, 3::2]


def mtp_fill_mask(ids_BT: jax.Array, pad_id: int, allow_BT: jax.Array | None = None) -> jax.Array:
  """[B, L-1] bool: MTP slots whose target token x_{2j+3} is PAD, optionally restricted.

  allow_BT: optional [B, T] bool over original positions (e.g. true only on rejected-draft PADs),
  so the parity PADs can be left out (docs/method.md#pad-label-fill-scope).
  """
  fill = ids_BT == pad_id
  if allow_BT is not None:
    fill = fill & allow_BT.astype(bool)
  return fill[:, 3::2]
