"""PIPO training examples from (prompt ids, response ids): pure numpy, one sequence at a time.

Conventions (docs/method.md#notation, docs/method.md#pad-rules): labels are *unshifted* (label[t] = x_t where
supervised, -100 elsewhere); T is even and pair i is (x_{2i}, x_{2i+1}); every PAD sits in a token2 slot (odd index)
and has label -100.

SFT example (docs/method.md#sft-examples):
  1. ids = prompt || response; labels = -100 on the prompt, ids on the response.
  2. Think-prefix masking: the first `think_mask_tokens` response labels become -100 (the `<think>\\n` that
     the generation prompt already holds at inference).
  3. Parity PAD: if the unsupervised prefix (prompt + think prefix) is odd, insert PAD after it.
  4. Trailing PAD if the total is odd.
  5. Length budget: a sequence longer than `max_length` is truncated on the right (or dropped, `overlong`);
     one left without a supervised label is dropped.
  6. Random PAD insertion, ratio ~ U(0, max_pad_ratio) from the caller's Generator, never past max_length
     (docs/method.md#pad-insertion-within-max_length), nothing at ratio 0 (docs/method.md#no-pad-at-ratio-0).
     Two kinds (`pad_insertion`):
     * "split" (the reference): n = round(n_eligible * ratio) eligible pairs (token2 supervised) are split
       (a, b) -> (a, PAD), (b, PAD). PAD pairs come in twos, so the text after them keeps its pairing.
     * "gate" (ours): what a rejected draft does at inference. Walking the pairs, each eligible pair becomes
       (a, PAD) with probability ratio and b opens the next pair, so the pairing of everything after shifts
       by one token, exactly as after a confidence-gate rejection. A model trained only on "split" never
       sees that shift; in the CPU miniature it lost half its accuracy at tau 0.95 with 3 % PADs.
       With per-token draft difficulties (`difficulty_weights`) the coin of a pair leans towards the drafts a
       gate would reject, so the backbone learns to carry on where rejections really happen.
Batches are built by `pad_right`-ing each example independently, so any batch size works
(docs/method.md#any-sft-batch-size).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -100
OVERLONG = ("truncate", "drop")


@dataclasses.dataclass
class PairExample:
  """One sequence. input_ids / labels: int32 [T] (T even for PIPO examples, <= max_length)."""

  input_ids: np.ndarray
  labels: np.ndarray
  truncated: bool = False
  n_split: int = 0  # pairs split by PAD augmentation
  pad_ratio: float = 0.0  # the drawn ratio


def _i32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.int32).reshape(-1)


def _check_length(max_length: int, even: bool = True) -> None:
  if max_length <= 0 or (even and max_length % 2):
    raise ValueError(f"data.max_length={max_length}: PIPO needs a positive even length (whole pairs)")


def sft_sequence(prompt_ids, response_ids, think_mask_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Concatenate and label: (ids int32 [P+R], labels int32 [P+R]) with -100 on the prompt and on the first
  `think_mask_tokens` response tokens."""
  p, r = _i32(prompt_ids), _i32(response_ids)
  ids = np.concatenate([p, r])
  labels = ids.copy()
  labels[: len(p) + max(0, min(int(think_mask_tokens), len(r)))] = IGNORE
  return ids, labels


def first_supervised(labels: np.ndarray) -> int:
  """Index of the first label != -100, or len(labels) when there is none."""
  nz = np.flatnonzero(labels != IGNORE)
  return int(nz[0]) if nz.size else len(labels)


def insert_parity_pads(ids: np.ndarray, labels: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Parity PAD after an odd unsupervised prefix, then a trailing PAD if the total is odd. Both label -100.

  The prefix end is the first supervised label (think prefix included), so both PADs land at odd indices.
  """
  p = first_supervised(labels)
  if p % 2:
    ids = np.insert(ids, p, pad_id)
    labels = np.insert(labels, p, IGNORE)
  if len(ids) % 2:
    ids = np.append(ids, np.int32(pad_id))
    labels = np.append(labels, np.int32(IGNORE))
  return ids.astype(np.int32), labels.astype(np.int32)


def fit_length(
  ids: np.ndarray, labels: np.ndarray, max_length: int, overlong: str
) -> tuple[np.ndarray, np.ndarray, bool] | None:
  """Apply the length budget: (ids, labels, truncated), or None when the example is dropped.

  Dropped: longer than max_length under `overlong="drop"`, or no supervised label left after truncation.
  """
  if overlong not in OVERLONG:
    raise ValueError(f"data.overlong={overlong!r}: expected one of {OVERLONG}")
  truncated = len(ids) > max_length
  if truncated:
    if overlong == "drop":
      return None
    ids, labels = ids[:max_length], labels[:max_length]
  if not np.any(labels != IGNORE):
    return None
  return ids, labels, truncated


def choose_splits(
  labels: np.ndarray, rng: np.random.Generator, max_pad_ratio: float, max_splits: int
) -> tuple[np.ndarray, float]:
  """Pick pairs to split: (split bool [L], ratio). labels int32 [2L].

  ratio = U[0, 1) * max_pad_ratio; n = round(n_eligible * ratio) (Python rounding, as the reference), capped
  at max_splits; a pair is eligible iff its token2 label is supervised. The ratio is always drawn, so the
  Generator advances the same way whatever the example looks like.
  """
  ratio = float(rng.random()) * float(max_pad_ratio)
  eligible = np.flatnonzero(labels[1::2] != IGNORE)
  n = min(int(round(len(eligible) * ratio)), max(0, int(max_splits)), len(eligible))
  split = np.zeros(len(labels) // 2, bool)
  if n > 0:
    split[rng.choice(eligible, size=n, replace=False)] = True
  return split, ratio


def split_pairs(ids: np.ndarray, labels: np.ndarray, split: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Rebuild pair by pair: a split pair (a, b | la, lb) becomes (a, PAD | la, -100), (b, PAD | lb, -100).

  ids, labels int32 [2L]; split bool [L] -> int32 [2L + 2 * split.sum()].
  """
  a, b, la, lb = ids[0::2], ids[1::2], labels[0::2], labels[1::2]
  counts = 1 + split.astype(np.int64)
  src = np.repeat(np.arange(len(a)), counts)  # source pair of every output pair
  second = np.zeros(len(src), bool)
  second[1:] = src[1:] == src[:-1]  # the (b, PAD) half of a split pair
  is_split = split[src]
  tok1 = np.where(second, b[src], a[src])
  lab1 = np.where(second, lb[src], la[src])
  tok2 = np.where(is_split, pad_id, b[src])
  lab2 = np.where(is_split, IGNORE, lb[src])
  out_ids = np.stack([tok1, tok2], axis=1).reshape(-1).astype(np.int32)
  out_lab = np.stack([lab1, lab2], axis=1).reshape(-1).astype(np.int32)
  return out_ids, out_lab


def difficulty_weights(difficulty: np.ndarray, labels: np.ndarray, mix: float) -> np.ndarray:
  """Per-token multipliers of the gate-PAD chance, float64 [T]: (1 - mix) + mix * d_t / mean(d over eligible).

  difficulty float [T]: how likely a draft of x_t is to be wrong (e.g. 1 - p of the teacher's native MTP head,
  `pipo_jax.draft_difficulty`); labels int32 [T]. The mean over the eligible tokens (the supervised ones after
  the first: the drafts the walk in `gate_pads` may reject) is 1, so the expected PAD count stays ratio x
  eligible and only the placement moves (up to the cap MAX_WEIGHTED_CHANCE): mix 0 is uniform, mix 1 places
  PADs in proportion to difficulty.
  """
  d = np.clip(np.asarray(difficulty, np.float64), 0.0, None)
  eligible = labels != IGNORE
  eligible[0] = False  # a first token is never a draft
  mean = float(d[eligible].mean()) if eligible.any() else 0.0
  if mean <= 0.0:
    return np.ones(len(d))
  return (1.0 - mix) + mix * d / mean


# Draft difficulty is concentrated (in the CPU miniature the hardest 5 % of tokens hold 91 % of it), so the
# weighted chance of a hard token would reach 1 and its draft would never supervise the MTP head. Capped at a
# half, a hard token trains the backbone after a rejection and the MTP head on its draft about equally often.
MAX_WEIGHTED_CHANCE = 0.5


def _pad_chance(ratio: float, weights: np.ndarray | None, t: int) -> float:
  return ratio if weights is None else min(MAX_WEIGHTED_CHANCE, ratio * float(weights[t]))


def gate_pads(
  ids: np.ndarray,
  labels: np.ndarray,
  rng: np.random.Generator,
  ratio: float,
  max_pads: int,
  pad_id: int,
  weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
  """Insert PADs as gate rejections: (ids, labels, n_inserted). ids, labels int32 [T] (T even) -> at most
  [T + n_inserted + 1], even.

  Pairs are rebuilt left to right from a cursor i into the original tokens: where x_{i+1} is supervised (an
  eligible token2) and a ratio-coin comes up, the pair is (x_i, PAD | l_i, -100) and the cursor moves by one,
  else it is (x_i, x_{i+1}) and moves by two. At most `max_pads` PADs are inserted; a single token left at
  the end gets a trailing PAD, which keeps the length even (step 4's trailing PAD is dropped first, so that
  no PAD ever lands in a token1 slot). weights float [T] (`difficulty_weights`): the coin for rejecting x_{i+1}
  comes up with probability min(MAX_WEIGHTED_CHANCE, ratio * weights[i + 1]) instead of ratio.
  """
  if len(ids) and ids[-1] == pad_id and labels[-1] == IGNORE:  # step 4's trailing PAD: re-made below if needed
    ids, labels = ids[:-1], labels[:-1]
  out_ids, out_lab, i, n, T = [], [], 0, 0, len(ids)
  while i < T:
    if i + 1 >= T:  # a last token after an odd number of insertions
      out_ids += [ids[i], pad_id]
      out_lab += [labels[i], IGNORE]
      i += 1
    elif labels[i + 1] != IGNORE and n < max_pads and rng.random() < _pad_chance(ratio, weights, i + 1):
      out_ids += [ids[i], pad_id]
      out_lab += [labels[i], IGNORE]
      i, n = i + 1, n + 1
    else:
      out_ids += [ids[i], ids[i + 1]]
      out_lab += [labels[i], labels[i + 1]]
      i += 2
  return np.asarray(out_ids, np.int32), np.asarray(out_lab, np.int32), n


PAD_INSERTION = ("split", "gate")


def check_pad_insertion(pad_insertion: str) -> None:
  if pad_insertion not in PAD_INSERTION:
    raise ValueError(f"data.pad_insertion={pad_insertion!r}: expected one of {PAD_INSERTION}")


def build_sft_example(
  prompt_ids,
  response_ids,
  *,
  pad_id: int,
  rng: np.random.Generator,
  max_pad_ratio: float,
  think_mask_tokens: int,
  max_length: int,
  overlong: str = "truncate",
  pad_insertion: str = "split",
  draft_difficulty=None,
  difficulty_mix: float = 0.0,
) -> PairExample | None:
  """The PIPO SFT example (steps in the module docstring), or None when it is dropped.

  prompt_ids int32 [P], response_ids int32 [R] -> PairExample with even T <= max_length.
  PAD ids inside the given text are removed first: a PAD may only be one the pipeline placed (odd index).
  draft_difficulty float [R] (one per response token) with difficulty_mix > 0: "gate" PADs lean towards the
  difficult drafts (`difficulty_weights`).
  """
  _check_length(max_length)
  p, r = _i32(prompt_ids), _i32(response_ids)
  keep_r = r != pad_id
  p, r = p[p != pad_id], r[keep_r]
  ids, labels = sft_sequence(p, r, think_mask_tokens)
  unpadded_labels = labels
  ids, labels = insert_parity_pads(ids, labels, pad_id)
  fitted = fit_length(ids, labels, max_length, overlong)
  if fitted is None:
    return None
  ids, labels, truncated = fitted
  check_pad_insertion(pad_insertion)
  if pad_insertion == "gate":
    ratio = float(rng.random()) * float(max_pad_ratio)
    weights = None
    if difficulty_mix > 0.0:
      # The source index of every token, through the parity PADs (-1) and the truncation: lays difficulties over it.
      src = insert_parity_pads(np.arange(len(unpadded_labels), dtype=np.int32), unpadded_labels, -1)[0][: len(ids)]
      weights = difficulty_weights(_token_difficulty(draft_difficulty, keep_r, len(p), src), labels, difficulty_mix)
    # Each insertion adds one slot and an odd count a trailing PAD: max_length - T - 1 insertions always fit.
    ids, labels, n = gate_pads(ids, labels, rng, ratio, max(0, max_length - len(ids) - 1), pad_id, weights)
    return PairExample(ids, labels, truncated=truncated, n_split=n, pad_ratio=ratio)
  split, ratio = choose_splits(labels, rng, max_pad_ratio, (max_length - len(ids)) // 2)
  if split.any():
    ids, labels = split_pairs(ids, labels, split, pad_id)
  return PairExample(ids, labels, truncated=truncated, n_split=int(split.sum()), pad_ratio=ratio)


def _token_difficulty(draft_difficulty, keep_r: np.ndarray, n_prompt: int, src: np.ndarray) -> np.ndarray:
  """The response's draft difficulties laid over the built sequence: float [len(src)], 0 on the prompt and PADs."""
  if draft_difficulty is None:
    raise ValueError(
      "data.pad_difficulty_mix > 0 needs a draft_difficulty per record (python -m pipo_jax.draft_difficulty)"
    )
  d = np.asarray(draft_difficulty, np.float64)
  if d.shape != keep_r.shape:
    raise ValueError(f"draft_difficulty has {d.size} values for a {keep_r.size}-token response")
  full = np.concatenate([np.zeros(n_prompt), d[keep_r], [0.0]])  # the extra 0 is read by PADs (src -1)
  return full[src]


def build_ar_example(
  prompt_ids, response_ids, *, max_length: int, overlong: str = "truncate", think_mask_tokens: int = 0
) -> PairExample | None:
  """Plain autoregressive example (mode ar): no PAD logic, T = min(P + R, max_length), labels unshifted."""
  _check_length(max_length, even=False)
  ids, labels = sft_sequence(prompt_ids, response_ids, think_mask_tokens)
  fitted = fit_length(ids, labels, max_length, overlong)
  if fitted is None:
    return None
  ids, labels, truncated = fitted
  return PairExample(ids, labels, truncated=truncated)


def encode_rollout(prompt_ids, response_ids, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """OPD encoding of one rollout (docs/method.md#encoding-a-rollout): (ids, labels, valid), int32/int32/bool [T],
  T even.

  prompt_ids: the generation prompt incl. `<think>\\n`, without its parity PAD; response_ids: the ids as
  generated, PADs included. A parity PAD follows an odd prompt; every PAD gets label -100; an odd total gets
  a trailing PAD with valid = False (attention 0).
  """
  p, r = _i32(prompt_ids), _i32(response_ids)
  if len(p) % 2:
    p = np.append(p, np.int32(pad_id))
  ids = np.concatenate([p, r]).astype(np.int32)
  labels = np.concatenate([np.full(len(p), IGNORE, np.int32), r]).astype(np.int32)
  labels[ids == pad_id] = IGNORE
  valid = np.ones(len(ids), bool)
  if len(ids) % 2:
    ids = np.append(ids, np.int32(pad_id))
    labels = np.append(labels, np.int32(IGNORE))
    valid = np.append(valid, False)
  return ids, labels, valid


def encode_rollout_batch(prompts, responses, pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`encode_rollout` for B rollouts, right-padded to a fixed length: (ids int32, labels int32, valid bool) [B, length].

  prompts / responses: sequences of B id arrays (a prompt may already end in its parity PAD). The right padding
  is PAD / -100 / valid False; `length` must be even and >= every encoded rollout.
  """
  if length % 2:
    raise ValueError(f"rollout length {length} must be even (whole pairs)")
  out_ids, out_lab, out_valid = [], [], []
  for p, r in zip(prompts, responses, strict=True):
    ids, lab, valid = encode_rollout(p, r, pad_id)
    ids_p, lab_p = pad_right(ids, lab, length, pad_id)
    out_ids.append(ids_p)
    out_lab.append(lab_p)
    out_valid.append(np.concatenate([valid, np.zeros(length - len(valid), bool)]))
  return np.stack(out_ids), np.stack(out_lab), np.stack(out_valid)


def pad_right(input_ids, labels, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad (ids, labels) [T] to [length] with PAD / -100. int32 [length] each.

  With an even T and an even `length` the padding is a whole number of pairs, so no real token shares a pair
  with it (the padded tail is causal-masked future and unsupervised). Raises if T > length.
  """
  ids, lab = _i32(input_ids), _i32(labels)
  if len(ids) != len(lab):
    raise ValueError(f"input_ids has {len(ids)} tokens but labels {len(lab)}")
  if len(ids) > length:
    raise ValueError(f"sequence of {len(ids)} tokens does not fit length {length}")
  n = length - len(ids)
  return (np.concatenate([ids, np.full(n, pad_id, np.int32)]), np.concatenate([lab, np.full(n, IGNORE, np.int32)]))


def stream_targets(labels):
  """(backbone_labels, mtp_labels), each [..., L-1], from unshifted labels [..., 2L] (docs/method.md#index-alignment).

  Slot j (0 <= j <= L-2) uses the backbone state of pair j: the backbone predicts x_{2j+2} = labels[2::2],
  the MTP head (fed e(x_{2j+2})) predicts x_{2j+3} = labels[3::2]. Works on numpy and jax arrays.
  """
  return labels[..., 2::2], labels[..., 3::2]


def stream_masks(labels):
  """(backbone_mask, mtp_mask) bool [..., L-1]: which slots carry a loss in each stream."""
  b, m = stream_targets(labels)
  return b != IGNORE, m != IGNORE
