"""PIPO pair construction: a hand-worked example and hypothesis properties (docs/method.md#sft-examples,
docs/method.md#encoding-a-rollout)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipo_jax.data import pairs
from pipo_jax.data.pairs import IGNORE as X

PAD = 99  # deliberately not 248044 or 1: nothing may assume the PAD id


class _FixedRng:
  """Stands in for np.random.Generator so the split pattern is chosen by hand."""

  def __init__(self, u, chosen):
    self.u, self.chosen = u, chosen

  def random(self):
    return self.u

  def choice(self, eligible, size, replace):
    assert not replace and size == len(self.chosen) and set(self.chosen) <= set(eligible.tolist())
    return np.asarray(self.chosen)


# prompt (3 tokens) + response (7 tokens, the first 2 being `<think>\n`) = 10 tokens.
PROMPT = [11, 12, 13]
RESPONSE = [21, 22, 23, 24, 25, 26, 27]


def test_hand_worked_example_with_one_split():
  # Masked prefix = 3 + 2 = 5 tokens (odd) -> parity PAD at index 5; 11 tokens (odd) -> trailing PAD.
  # Pairs: (11,12) (13,21) (22,PAD) (23,24) (25,26) (27,PAD); eligible (token2 supervised): pairs 3 and 4.
  # u = 0.5, max ratio 1 -> ratio 0.5 -> round(2 * 0.5) = 1 split, chosen by hand: pair 3 -> (23,PAD) (24,PAD).
  ex = pairs.build_sft_example(
    PROMPT, RESPONSE, pad_id=PAD, rng=_FixedRng(0.5, [3]), max_pad_ratio=1.0, think_mask_tokens=2, max_length=16
  )
  want_ids = [11, 12, 13, 21, 22, PAD, 23, PAD, 24, PAD, 25, 26, 27, PAD]
  want_lab = [X, X, X, X, X, X, 23, X, 24, X, 25, 26, 27, X]
  np.testing.assert_array_equal(ex.input_ids, want_ids)
  np.testing.assert_array_equal(ex.labels, want_lab)
  assert ex.input_ids.dtype == np.int32 and ex.labels.dtype == np.int32
  assert ex.n_split == 1 and ex.pad_ratio == 0.5 and not ex.truncated
  # Slot j: backbone predicts labels[2j+2], MTP predicts labels[2j+3]; L = 7 -> 6 slots.
  back, mtp = pairs.stream_targets(ex.labels)
  np.testing.assert_array_equal(back, [X, X, 23, 24, 25, 27])
  np.testing.assert_array_equal(mtp, [X, X, X, X, 26, X])
  back_m, mtp_m = pairs.stream_masks(ex.labels)
  np.testing.assert_array_equal(back_m, [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(mtp_m, [0, 0, 0, 0, 1, 0])
  ids, lab = pairs.pad_right(ex.input_ids, ex.labels, 18, PAD)
  np.testing.assert_array_equal(ids, want_ids + [PAD] * 4)
  np.testing.assert_array_equal(lab, want_lab + [X] * 4)


class _ScriptedRng:
  """random() returns the given values in order: the ratio draw first, then one coin per eligible pair."""

  def __init__(self, values):
    self.values = list(values)

  def random(self):
    return self.values.pop(0)


def test_gate_insertion_hand_worked_example():
  # After parity: (11,12) (13,21) (22,PAD) (23,24) (25,26) (27,PAD-trailing); gate mode drops the trailing PAD
  # and walks: (11,12) (13,21) (22,PAD) are not eligible (token2 unsupervised); at 23 the coin 0.1 < ratio 0.5
  # rejects the draft -> (23,PAD) and 24 opens the next pair; coins 0.9, 0.9 keep (24,25) and (26,27).
  ex = pairs.build_sft_example(
    PROMPT,
    RESPONSE,
    pad_id=PAD,
    rng=_ScriptedRng([0.5, 0.1, 0.9, 0.9]),
    max_pad_ratio=1.0,
    think_mask_tokens=2,
    max_length=16,
    pad_insertion="gate",
  )
  np.testing.assert_array_equal(ex.input_ids, [11, 12, 13, 21, 22, PAD, 23, PAD, 24, 25, 26, 27])
  np.testing.assert_array_equal(ex.labels, [X, X, X, X, X, X, 23, X, 24, 25, 26, 27])
  assert ex.n_split == 1 and ex.pad_ratio == 0.5
  back, mtp = pairs.stream_targets(ex.labels)
  # Slot j: backbone predicts labels[2j+2], MTP labels[2j+3]; 6 pairs -> 5 slots.
  np.testing.assert_array_equal(back, [X, X, 23, 24, 26])
  np.testing.assert_array_equal(mtp, [X, X, X, 25, 27])


def test_difficulty_weights_hand_worked():
  # Eligible: supervised and not the first token -> indices 2..5, difficulties 0, 0.2, 0.6, 0.2 (mean 0.25);
  # the unsupervised 9s do not move the mean. mix 0.5: 0.5 + 0.5 * d / 0.25.
  w = pairs.difficulty_weights(np.array([9, 9, 0, 0.2, 0.6, 0.2]), np.array([X, X, 5, 6, 7, 8]), 0.5)
  np.testing.assert_allclose(w[2:], [0.5, 0.9, 1.7, 0.9])
  assert w[2:].mean() == pytest.approx(1.0)  # the expected PAD count is the uniform one
  np.testing.assert_allclose(pairs.difficulty_weights(np.zeros(6), np.array([X, X, 5, 6, 7, 8]), 1.0), 1.0)


def test_gate_insertion_weighted_by_difficulty_hand_worked():
  # Same sequence as the unweighted example; eligible drafts 23..27 have difficulties 0.1, 0, 0.1, 0.4, 0
  # (mean 0.12) and mix 1 gives weights 0.83, 0, 0.83, 3.33, 0. ratio 0.2: the draft 24 is rejected with
  # chance 0.2 * 0 = 0 (coin 0.0 keeps (23,24)), the draft 26 with min(0.5, 0.2 * 3.33) = 0.5 (coin 0.45 < 0.5
  # rejects it: (25,PAD)), then 26 opens a pair and the draft 27 has chance 0 (coin 0.0 keeps (26,27)).
  difficulty = [0.9, 0.9, 0.1, 0.0, 0.1, 0.4, 0.0]  # the <think>\n opener's values are never read
  kw = dict(pad_id=PAD, max_pad_ratio=1.0, think_mask_tokens=2, max_length=16, pad_insertion="gate")
  ex = pairs.build_sft_example(
    PROMPT, RESPONSE, rng=_ScriptedRng([0.2, 0.0, 0.45, 0.0]), draft_difficulty=difficulty, difficulty_mix=1.0, **kw
  )
  np.testing.assert_array_equal(ex.input_ids, [11, 12, 13, 21, 22, PAD, 23, 24, 25, PAD, 26, 27])
  np.testing.assert_array_equal(ex.labels, [X, X, X, X, X, X, 23, 24, 25, X, 26, 27])
  assert ex.n_split == 1
  # Uniform placement with the same coins rejects the first draft instead.
  uniform = pairs.build_sft_example(PROMPT, RESPONSE, rng=_ScriptedRng([0.2, 0.0, 0.45, 0.0, 0.9]), **kw)
  np.testing.assert_array_equal(uniform.input_ids[:8], [11, 12, 13, 21, 22, PAD, 23, PAD])
  with pytest.raises(ValueError, match="6 values for a 7-token response"):
    pairs.build_sft_example(
      PROMPT, RESPONSE, rng=_ScriptedRng([0.2]), draft_difficulty=difficulty[:6], difficulty_mix=1.0, **kw
    )
  with pytest.raises(ValueError, match="pipo_jax.draft_difficulty"):
    pairs.build_sft_example(PROMPT, RESPONSE, rng=_ScriptedRng([0.2]), difficulty_mix=1.0, **kw)


@settings(max_examples=200, deadline=None)
@given(
  prompt_len=st.integers(1, 9),
  response_len=st.integers(3, 30),
  max_ratio=st.floats(0.0, 1.0),
  room=st.integers(0, 12),
  seed=st.integers(0, 2**16),
  mix=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_gate_insertion_properties(prompt_len, response_len, max_ratio, room, seed, mix):
  prompt = list(range(100, 100 + prompt_len))
  response = list(range(200, 200 + response_len))
  plain = pairs.build_sft_example(
    prompt, response, pad_id=PAD, rng=np.random.default_rng(seed), max_pad_ratio=0.0, think_mask_tokens=2, max_length=64
  )
  max_length = len(plain.input_ids) + 2 * (room // 2)
  ex = pairs.build_sft_example(
    prompt,
    response,
    pad_id=PAD,
    rng=np.random.default_rng(seed),
    max_pad_ratio=max_ratio,
    think_mask_tokens=2,
    max_length=max_length,
    pad_insertion="gate",
    draft_difficulty=np.random.default_rng(seed + 1).random(response_len) ** 4,  # concentrated, as in practice
    difficulty_mix=mix,
  )
  ids, lab = ex.input_ids, ex.labels
  assert len(ids) % 2 == 0 and len(ids) <= max_length
  assert np.all(ids[0::2] != PAD)  # PAD only ever in a token2 slot, always unsupervised
  assert np.all(lab[ids == PAD] == X)
  np.testing.assert_array_equal(ids[ids != PAD], plain.input_ids[plain.input_ids != PAD])  # same text, same order
  np.testing.assert_array_equal(lab[lab != X], plain.labels[plain.labels != X])
  # Inserted PADs: all PADs of the result minus the parity PAD the prompt already had (a trailing one may come or go).
  parity = int(np.sum(plain.input_ids[: len(prompt) + 3] == PAD))
  assert ex.n_split <= int(np.sum(ids == PAD)) - parity <= ex.n_split + 1
  if max_ratio == 0.0:
    assert ex.n_split == 0


def test_unknown_pad_insertion_raises():
  with pytest.raises(ValueError, match="pad_insertion"):
    pairs.build_sft_example(
      PROMPT,
      RESPONSE,
      pad_id=PAD,
      rng=np.random.default_rng(0),
      max_pad_ratio=0.5,
      think_mask_tokens=2,
      max_length=16,
      pad_insertion="sometimes",
    )


def test_ratio_zero_inserts_only_parity_pads():
  ex = pairs.build_sft_example(
    PROMPT, RESPONSE, pad_id=PAD, rng=np.random.default_rng(0), max_pad_ratio=0.0, think_mask_tokens=2, max_length=16
  )
  np.testing.assert_array_equal(ex.input_ids, [11, 12, 13, 21, 22, PAD, 23, 24, 25, 26, 27, PAD])
  np.testing.assert_array_equal(ex.labels, [X, X, X, X, X, X, 23, 24, 25, 26, 27, X])
  assert ex.n_split == 0


def test_small_ratio_rounds_to_no_split():
  # round(2 * 0.2) = 0: the reference's max(1, .) would still split one pair (docs/method.md#no-pad-at-ratio-0).
  ex = pairs.build_sft_example(
    PROMPT, RESPONSE, pad_id=PAD, rng=_FixedRng(0.2, []), max_pad_ratio=1.0, think_mask_tokens=2, max_length=16
  )
  assert ex.n_split == 0 and len(ex.input_ids) == 12


def test_split_never_exceeds_max_length():
  # 12 tokens already fill max_length 12: no room for a split (each adds 2), whatever the ratio.
  ex = pairs.build_sft_example(
    PROMPT, RESPONSE, pad_id=PAD, rng=_FixedRng(0.99, []), max_pad_ratio=1.0, think_mask_tokens=2, max_length=12
  )
  assert ex.n_split == 0 and len(ex.input_ids) == 12


def test_overlong_truncate_and_drop():
  ex = pairs.build_sft_example(
    PROMPT, RESPONSE, pad_id=PAD, rng=np.random.default_rng(0), max_pad_ratio=0.0, think_mask_tokens=2, max_length=8
  )
  np.testing.assert_array_equal(ex.input_ids, [11, 12, 13, 21, 22, PAD, 23, 24])
  np.testing.assert_array_equal(ex.labels, [X, X, X, X, X, X, 23, 24])
  assert ex.truncated
  assert (
    pairs.build_sft_example(
      PROMPT,
      RESPONSE,
      pad_id=PAD,
      rng=np.random.default_rng(0),
      max_pad_ratio=0.0,
      think_mask_tokens=2,
      max_length=8,
      overlong="drop",
    )
    is None
  )
  # Nothing supervised left after truncation -> dropped.
  assert (
    pairs.build_sft_example(
      PROMPT, RESPONSE, pad_id=PAD, rng=np.random.default_rng(0), max_pad_ratio=0.0, think_mask_tokens=2, max_length=6
    )
    is None
  )


def test_even_prompt_gets_no_parity_pad():
  ex = pairs.build_sft_example(
    [11, 12, 13, 14],
    [21, 22, 23, 24],
    pad_id=PAD,
    rng=np.random.default_rng(0),
    max_pad_ratio=0.0,
    think_mask_tokens=2,
    max_length=8,
  )
  np.testing.assert_array_equal(ex.input_ids, [11, 12, 13, 14, 21, 22, 23, 24])
  np.testing.assert_array_equal(ex.labels, [X, X, X, X, X, X, 23, 24])


def test_ar_example_has_no_pad_logic():
  ex = pairs.build_ar_example(PROMPT, RESPONSE, max_length=9, think_mask_tokens=0)
  np.testing.assert_array_equal(ex.input_ids, [11, 12, 13, 21, 22, 23, 24, 25, 26])
  np.testing.assert_array_equal(ex.labels, [X, X, X, 21, 22, 23, 24, 25, 26])
  assert ex.truncated


def test_rollout_encoding():
  # Prompt (incl. <think>\n) of 3 -> parity PAD; response as generated: prefill PAD at index 1, one rejected
  # draft (PAD) later; 9 tokens -> trailing PAD with valid False.
  ids, lab, valid = pairs.encode_rollout([5, 6, 7], [8, PAD, 9, 10, 11], PAD)
  np.testing.assert_array_equal(ids, [5, 6, 7, PAD, 8, PAD, 9, 10, 11, PAD])
  np.testing.assert_array_equal(lab, [X, X, X, X, 8, X, 9, 10, 11, X])
  np.testing.assert_array_equal(valid, [1] * 9 + [0])
  ids, lab, valid = pairs.encode_rollout([5, 6, 7, 8], [9, PAD, 10, PAD], PAD)
  np.testing.assert_array_equal(ids, [5, 6, 7, 8, 9, PAD, 10, PAD])
  np.testing.assert_array_equal(lab, [X, X, X, X, 9, X, 10, X])
  assert valid.all()


def test_rollout_batch():
  ids, lab, valid = pairs.encode_rollout_batch([[5, 6, 7], [5, 6, 7, 8]], [[8, PAD, 9, 10, 11], [9, PAD]], PAD, 12)
  np.testing.assert_array_equal(
    ids, [[5, 6, 7, PAD, 8, PAD, 9, 10, 11, PAD, PAD, PAD], [5, 6, 7, 8, 9, PAD, PAD, PAD, PAD, PAD, PAD, PAD]]
  )
  np.testing.assert_array_equal(lab, [[X, X, X, X, 8, X, 9, 10, 11, X, X, X], [X, X, X, X, 9] + [X] * 7])
  np.testing.assert_array_equal(valid, [[1] * 9 + [0] * 3, [1] * 6 + [0] * 6])


def test_pad_right_rejects_too_long():
  with pytest.raises(ValueError, match="does not fit"):
    pairs.pad_right([1, 2, 3, 4], [X] * 4, 2, PAD)


def test_odd_max_length_is_an_error():
  with pytest.raises(ValueError, match="even"):
    pairs.build_sft_example(
      PROMPT, RESPONSE, pad_id=PAD, rng=np.random.default_rng(0), max_pad_ratio=0.0, think_mask_tokens=2, max_length=15
    )


_ids = st.lists(st.integers(2, 60) | st.just(PAD), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
  prompt=_ids,
  response=_ids,
  ratio=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
  think=st.integers(0, 3),
  max_length=st.integers(1, 50).map(lambda n: 2 * n),
  overlong=st.sampled_from(["truncate", "drop"]),
  seed=st.integers(0, 2**31),
)
def test_properties(prompt, response, ratio, think, max_length, overlong, seed):
  ex = pairs.build_sft_example(
    prompt,
    response,
    pad_id=PAD,
    rng=np.random.default_rng(seed),
    max_pad_ratio=ratio,
    think_mask_tokens=think,
    max_length=max_length,
    overlong=overlong,
  )
  p = [t for t in prompt if t != PAD]
  r = [t for t in response if t != PAD]
  if ex is None:  # dropped: too long under "drop", or nothing supervised within the budget
    return
  ids, lab = ex.input_ids, ex.labels
  assert len(ids) == len(lab) and len(ids) % 2 == 0 and len(ids) <= max_length
  assert not np.any(ids[0::2] == PAD)  # PAD only in token2 slots
  assert np.all(lab[ids == PAD] == X)  # PAD never supervised
  sup = lab != X
  assert sup.any() and np.array_equal(lab[sup], ids[sup])  # unshifted labels
  real = ids[ids != PAD].tolist()
  assert real == (p + r)[: len(real)]  # real-token order kept, only truncated on the right
  assert lab[sup].tolist() == r[think:][: int(sup.sum())]  # exactly the unmasked response, in order
  assert ex.truncated == (len(real) < len(p + r))
  if overlong == "drop":
    assert not ex.truncated
  if ratio == 0.0:
    assert ex.n_split == 0 and int((ids == PAD).sum()) <= 2  # parity PADs only
  # PADs = parity PADs (<= 2) + one per split pair (each split adds one PAD per half)
  assert int((ids == PAD).sum()) - 2 * ex.n_split in (0, 1, 2)
  back, mtp = pairs.stream_targets(lab)
  assert back.shape == mtp.shape == (len(ids) // 2 - 1,)


@settings(max_examples=100, deadline=None)
@given(prompt=_ids, response=st.lists(st.integers(2, 60) | st.just(PAD), max_size=40))
def test_rollout_properties(prompt, response):
  ids, lab, valid = pairs.encode_rollout([t for t in prompt if t != PAD], response, PAD)
  assert len(ids) % 2 == 0 and np.all(lab[ids == PAD] == X) and valid[:-1].all()
  assert valid.all() or (ids[-1] == PAD and not valid[-1])
  assert not np.any(ids[: len(prompt) - prompt.count(PAD)][0::2] == PAD)
