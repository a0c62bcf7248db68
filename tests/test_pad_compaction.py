"""PAD compaction, re-expansion and OPD stream alignment on hand-made sequences (B = 2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.opd import pad_compaction as pc

P, F = 1, 0  # PAD id, filler id
IDS = jnp.array(
  [
    [10, 11, 12, P, 13, P, 14, 15],  # PADs at odd positions 3, 5 (rejected drafts)
    [P, 20, 21, P, 22, 23, 24, P],  # a leading PAD and a trailing parity PAD
  ]
)
KEEP = IDS != P


def test_compact_exact_arrays_under_jit():
  c = jax.jit(functools.partial(pc.compact, filler_id=F))(IDS, KEEP)
  np.testing.assert_array_equal(c.ids, [[10, 11, 12, 13, 14, 15, F, F], [20, 21, 22, 23, 24, F, F, F]])
  np.testing.assert_array_equal(c.valid, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(c.src_index, [[0, 1, 2, 4, 6, 7, 0, 0], [1, 2, 4, 5, 6, 0, 0, 0]])
  np.testing.assert_array_equal(c.n_keep, [6, 5])
  attn = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(pc.compact_like(attn, c), [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
  # Same as the reference's stable argsort of keep (descending) for every row.
  order = np.argsort(~np.asarray(KEEP), axis=1, kind="stable")
  ref = np.where(np.asarray(c.valid), np.take_along_axis(np.asarray(IDS), order, 1), F)
  np.testing.assert_array_equal(c.ids, ref)


def test_expand_index_and_expand():
  idx = pc.expand_index(KEEP)
  np.testing.assert_array_equal(idx, [[0, 1, 2, 2, 3, 3, 4, 5], [0, 0, 1, 1, 2, 3, 4, 4]])
  c = pc.compact(IDS, KEEP, F)
  # Round trip: a PAD position shows the previous real token, a real position its own token.
  np.testing.assert_array_equal(
    pc.expand(c.ids, KEEP), [[10, 11, 12, 12, 13, 13, 14, 15], [20, 20, 21, 21, 22, 23, 24, 24]]
  )
  g_c = jnp.stack([c.ids, -c.ids], axis=-1).astype(jnp.float32)  # [B, T, D=2]
  np.testing.assert_array_equal(pc.expand(g_c, KEEP)[..., 1], -np.asarray(pc.expand(c.ids, KEEP)))


def test_expanded_state_sees_exactly_the_real_prefix():
  """With a causal 'teacher' whose state is the sum of the real tokens so far, the state used at
  every position t equals the sum of the real tokens at positions <= t (PADs invisible)."""
  c = pc.compact(IDS, KEEP, F)
  g_c = jnp.cumsum(jnp.where(c.valid, c.ids, 0), axis=1)
  g = np.asarray(pc.expand(g_c, KEEP))
  real_prefix = np.cumsum(np.where(np.asarray(KEEP), np.asarray(IDS), 0), axis=1)
  started = np.cumsum(np.asarray(KEEP), axis=1) > 0  # a leading PAD has no real prefix yet
  np.testing.assert_array_equal(g[started], real_prefix[started])


def test_stream_alignment_exact():
  pb, pm = pc.stream_positions(8)
  np.testing.assert_array_equal(pb, [1, 3, 5])
  np.testing.assert_array_equal(pm, [2, 4, 6])
  c = pc.compact(IDS, KEEP, F)
  g_c = (100 * jnp.arange(2)[:, None] + jnp.arange(8)[None]).astype(jnp.float32)[..., None]
  g_back, g_mtp = jax.jit(pc.teacher_stream_states)(g_c, KEEP)
  assert g_back.shape == (2, 3, 1) and g_mtp.shape == (2, 3, 1)
  np.testing.assert_array_equal(g_back[..., 0], [[1, 2, 3], [100, 101, 103]])
  np.testing.assert_array_equal(g_mtp[..., 0], [[2, 3, 4], [101, 102, 104]])
  # Equal to expanding everything and slicing the stream positions.
  full = pc.expand(g_c, KEEP)
  np.testing.assert_array_equal(g_back, full[:, 1:7:2])
  np.testing.assert_array_equal(g_mtp, full[:, 2:7:2])
  # Row 0, backbone slot 1 (position 3 is PAD): it uses the state of token 12 (compact slot 2),
  # which predicts the backbone label x_4 = 13.
  assert int(c.ids[0, int(g_back[0, 1, 0])]) == 12
  with pytest.raises(ValueError, match="even length"):
    pc.stream_positions(7)


def test_stream_labels_and_fill_mask():
  labels = jnp.where(KEEP, IDS, -100)
  back, mtp = pc.stream_labels(labels)
  np.testing.assert_array_equal(back, [[12, 13, 14], [21, 22, 24]])
  np.testing.assert_array_equal(mtp, [[-100, -100, 15], [-100, 23, -100]])
  np.testing.assert_array_equal(pc.mtp_fill_mask(IDS, P), [[1, 1, 0], [1, 0, 1]])
  # Restrict the fill to rejected drafts only (docs/method.md#pad-label-fill): here only position 5 of row 0.
  allow = jnp.zeros_like(KEEP).at[0, 5].set(True)
  np.testing.assert_array_equal(pc.mtp_fill_mask(IDS, P, allow), [[0, 1, 0], [0, 0, 0]])
