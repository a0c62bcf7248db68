"""Chunked LM-head losses, normalisation helpers, confidence BCE and confidence metrics.

Axis names: N tokens (flattened batch x length), B batch, T length, R rows, K chunks, C tokens of one chunk,
D hidden size, V vocabulary.

Every LM-head loss takes post-norm hidden states and the head matrix `W_DV`, never logits. The
positions of every row are cut into chunks of about `chunk` tokens in all (chunk_tokens: a slice of each row, so a
batch-sharded mesh keeps each shard on its own rows) and `jax.lax.scan` walks the chunks, so neither the forward
nor the backward ever holds more than one [C, V] logits block. The head is gathered whole along its FSDP axis once
per loss call (`gathered_head`). The cross entropy forms its gradients inside that
forward loop (a custom VJP: logits, dh and dW per chunk, once); other chunked losses (`scan_token_chunks`, the
OPD divergences) wrap their body in `jax.checkpoint`, and their backward recomputes a chunk's logits. Logits are
produced with fp32 accumulation (`preferred_element_type`) and all softmax / loss math is fp32.

Normalisation (docs/method.md#sft-losses, docs/method.md#opd-normalisation-and-loss): every stream (backbone,
MTP) is its own token-mean over its own valid positions, and the streams are added afterwards. Two token-means
are supported through per-token weights (`normalisation_weights`):
  * "batch":  sum over all valid tokens of the stream in the batch / their count (the SFT loss: one
    token-mean over the batch, long sequences weigh more);
  * "sample": mean over samples of each sample's token-mean (the reference OPD gradient, which
    back-propagates every sample with weight 1/B; long responses are not up-weighted).
A stream with no valid position yields exactly 0 and finite (zero) gradients.

Gradient accumulation (optim.make_train_step) passes each term the denominator of the whole step (every
micro-batch's count added up, `normalisation_denominator`), so k micro-batches of unequal token counts give
exactly the loss and gradient of one batch holding all their sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pipo_jax.config import logits_chunk_layout
from pipo_jax.data import pairs
from pipo_jax.sharding import active_batch_shards

IGNORE_INDEX = pairs.IGNORE  # label of unsupervised positions, defined once with the data conventions


# ----------------------------------------------------------------------------------
# Chunking machinery (shared with opd/divergences.py)
# ----------------------------------------------------------------------------------


def head_logits(h_CD: jax.Array, W_DV: jax.Array) -> jax.Array:
  """[C, D] x [D, V] -> fp32 [C, V]; the matmul runs in the inputs' dtype, accumulating in fp32."""
  dtype = jnp.promote_types(h_CD.dtype, W_DV.dtype)
  return jax.lax.dot_general(
    h_CD.astype(dtype), W_DV.astype(dtype), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )


def as_rows(x: jax.Array, token_shape: tuple) -> jax.Array:
  """An array whose leading axes are `token_shape` ([N] or [..., B, T]) -> [R, T, ...]: R rows of T tokens, the
  leading axes merged into rows ([N] is one row). Rows stay rows so the batch axis keeps its sharding."""
  n_axes = len(token_shape)
  if x.shape[:n_axes] != tuple(token_shape):
    raise ValueError(f"array {x.shape} does not start with the token axes {tuple(token_shape)}")
  T = token_shape[-1] if n_axes else 1
  return x.reshape((-1, T) + x.shape[n_axes:])


def chunk_tokens(per_token: Sequence[jax.Array], pad_values: Sequence, chunk: int) -> tuple[tuple, int, int]:
  """[R, T, ...] arrays -> ([K, R, C, ...] arrays, C, T): every chunk takes C = ceil(chunk / R) consecutive
  positions of every row (about `chunk` tokens in all), T rounded up to K * C with one fill value per array;
  choose values that make the padded positions invalid (label -100, weight 0, mask False).

  Why rows: a chunk cut from the flattened [R * T] token axis holds the tokens of one or two rows, so under a
  batch-sharded mesh each chunk lives on one shard; XLA then ran every chunk on all shards with the LM head's
  FSDP-sharded embed axis contracted in pieces and all-reduced the fp32 [C, V] logits (TPU compiler, 4B SFT on
  v5p-8: 3,880 GiB of all-reduce per chip per step). A chunk holding a slice of every row keeps each shard on its
  own rows."""
  R, T = per_token[0].shape[:2]
  C, K = logits_chunk_layout(R, T, chunk)
  t_pad = K * C - T

  def prep(x, v):
    if t_pad:
      fill = jnp.full((R, t_pad) + x.shape[2:], v, x.dtype)
      x = jnp.concatenate([x, fill], axis=1)
    return _swap_rows_chunks(x.reshape((R, K, C) + x.shape[2:]))

  return tuple(prep(x, v) for x, v in zip(per_token, pad_values)), C, T


def unchunk_tokens(x_KRC: jax.Array, T: int) -> jax.Array:
  """[K, R, C, ...] -> the first T positions of [R, K * C, ...]."""
  K, R, C = x_KRC.shape[:3]
  return _swap_rows_chunks(x_KRC).reshape((R, K * C) + x_KRC.shape[3:])[:, :T]


def _swap_rows_chunks(x: jax.Array) -> jax.Array:
  """[R, K, ...] <-> [K, R, ...]; a reshape when either is 1 (XLA:CPU copied the transposed loop inputs)."""
  if 1 in x.shape[:2]:
    return x.reshape((x.shape[1], x.shape[0]) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _flat(x_RC: jax.Array) -> jax.Array:
  """[R, C, ...] -> [R * C, ...]: a chunk's tokens as one axis for the [C, V] logits matmul."""
  return x_RC.reshape((-1,) + x_RC.shape[2:])


def gathered_head(W_DV: jax.Array) -> jax.Array:
  """The LM head with its embed axis whole (vocab stays on 'tensor'): one FSDP all-gather per loss call, so the
  chunk loop's matmuls are local to each shard's rows (a no-op without an active mesh)."""
  return nn.with_logical_constraint(W_DV, ("act_embed", "vocab"))


def scan_token_chunks(
  body: Callable,
  per_token: Sequence[jax.Array],
  pad_values: Sequence,
  chunk: int,
):
  """Run `body` over token chunks with remat; add up its sums, put its per-token outputs back in place.

  Args:
    body: f(*chunk_arrays) -> (sums, per_token_out): the chunk arrays [C, ...] (C tokens), `sums` a tuple of
      scalars, `per_token_out` a tuple of [C, ...] arrays. It is wrapped in `jax.checkpoint`, so its [C, V]
      intermediates are recomputed in the backward pass instead of being stacked over chunks.
    per_token: [R, T, ...] arrays (rows x positions, see `as_rows`), all with the same R and T.
    pad_values: one fill value per array for the padded positions (chunk_tokens).
    chunk: tokens per chunk (chunk_tokens).

  Returns:
    (sums, per_token_out) with per-token outputs [R, T, ...].
  """
  xs, C, T = chunk_tokens(per_token, pad_values, chunk)
  R = per_token[0].shape[0]
  body_remat = jax.checkpoint(body, prevent_cse=False)

  def step(carry, x):
    sums, outs = body_remat(*(_flat(a) for a in x))
    carry = tuple(c + s.astype(jnp.float32) for c, s in zip(carry, sums))
    return carry, tuple(o.reshape((R, C) + o.shape[1:]) for o in outs)

  # One abstract evaluation to learn how many sums the body returns.
  n_sums = len(jax.eval_shape(body, *(_flat(x[0]) for x in xs))[0])
  init = tuple(jnp.zeros((), jnp.float32) for _ in range(n_sums))
  sums, outs = jax.lax.scan(step, init, xs)
  return sums, tuple(unchunk_tokens(o, T) for o in outs)


def _rows_tokens(h, labels, weights):
  """h [..., D], labels [...] -> h [R, T, D], labels [R, T], weights [R, T] (fp32), and labels' shape."""
  shape = labels.shape
  if h.shape[:-1] != shape:
    raise ValueError(f"hidden states {h.shape} and labels {shape} disagree on the token axes")
  if weights is None:
    weights = jnp.ones(shape, jnp.float32)
  elif weights.shape != shape:
    raise ValueError(f"weights {weights.shape} must have the labels' shape {shape}")
  rows = partial(as_rows, token_shape=shape)
  return rows(h), rows(labels.astype(jnp.int32)), rows(weights.astype(jnp.float32)), shape


# ----------------------------------------------------------------------------------
# Cross entropy
# ----------------------------------------------------------------------------------


def chunked_cross_entropy(
  h_ND: jax.Array,
  W_DV: jax.Array,
  labels_N: jax.Array,
  chunk: int,
  weights_N: jax.Array | None = None,
):
  """Cross entropy of `h @ W` against `labels`, O(chunk x V) memory in forward and backward.

  Args:
    h_ND: hidden states [..., D] (e.g. [N, D] or [B, T, D]), any float dtype.
    W_DV: LM-head matrix [D, V].
    labels_N: int labels with h's token axes ([N] or [B, T]); IGNORE_INDEX (-100) is ignored.
    chunk: tokens per chunk; need not divide N.
    weights_N: optional per-token weights (labels' shape), e.g. from `normalisation_weights`.

  Returns:
    sum_loss: fp32 scalar, sum over valid tokens of weight * (-log p(label)).
    n_valid: fp32 scalar, number of valid tokens (unweighted).
    gold_logprob_N: fp32, labels' shape, stop-gradient log p(label) (0 at ignored positions); the
      SFT confidence target is exp of it on the MTP stream.

  Under differentiation the gradients are formed in the forward chunk loop (`_ce_fwd`), so no chunk's logits
  are computed twice.
  """
  h_RTD, labels_RT, w_RT, shape = _rows_tokens(h_ND, labels_N, weights_N)
  sum_loss, n_valid, gold_RT = _cross_entropy(chunk, h_RTD, gathered_head(W_DV), labels_RT, w_RT)
  return sum_loss, n_valid, gold_RT.reshape(shape)


def _chunk_log_probs(h_CD, W_DV, y_C):
  """Logits, their log-sum-exp, the gold index (0 where invalid), validity and masked log p(label) of one chunk."""
  logits_CV = head_logits(h_CD, W_DV)
  valid_C = y_C != IGNORE_INDEX
  gold_C = jnp.where(valid_C, y_C, 0)
  lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
  logp_C = jnp.take_along_axis(logits_CV, gold_C[:, None], axis=-1)[:, 0] - lse_C
  return logits_CV, lse_C, gold_C, valid_C, jnp.where(valid_C, logp_C, 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(chunk, h_RTD, W_DV, labels_RT, w_RT):
  """(sum of -w log p(label), valid count, log p(label) [R, T]); the primal, run when nothing is differentiated."""

  def body(h_CD, y_C, w_C):
    _, _, _, valid_C, logp_C = _chunk_log_probs(h_CD, W_DV, y_C)
    return (-jnp.sum(logp_C * w_C), jnp.sum(valid_C.astype(jnp.float32))), (logp_C,)

  (sum_loss, n_valid), (logp_RT,) = scan_token_chunks(body, (h_RTD, labels_RT, w_RT), (0, IGNORE_INDEX, 0.0), chunk)
  return sum_loss, n_valid, logp_RT


def _ce_fwd(chunk, h, W, labels, w):
  """The loss and, in the same chunk loop, d sum_loss / d h and / d W for the inputs that are differentiated
  (`perturbed`; a frozen LM head costs no dW matmul). Per chunk: d/dlogits = w (softmax - onehot(label)), then
  dh = dlogits W^T and dW += h^T dlogits, matmuls in the inputs' dtype accumulating in fp32 (as head_logits).
  The backward only scales these by the incoming cotangent: autodiff through a rematerialised chunk would
  compute every chunk's logits a second time."""
  h_RTD, W_DV, labels_RT, w_RT = h.value, W.value, labels.value, w.value
  mm_dtype = jnp.promote_types(h_RTD.dtype, W_DV.dtype)
  (h_KRCD, y_KRC, w_KRC), C, T = chunk_tokens((h_RTD, labels_RT, w_RT), (0, IGNORE_INDEX, 0.0), chunk)
  R, V = h_RTD.shape[0], W_DV.shape[1]
  # dW is summed per batch shard along an explicit leading axis S (sharded like the rows) and reduced once after
  # the loop; a [D, V] carry would be all-reduced across the shards in every chunk.
  S = active_batch_shards()
  S = S if R % S == 0 else 1

  def step(carry, x):
    sum_loss, n_valid, dW_SDV = carry
    h_CD, y_C, w_C = (_flat(a) for a in x)
    logits_CV, lse_C, gold_C, valid_C, logp_C = _chunk_log_probs(h_CD, W_DV, y_C)
    coef_C = jnp.where(valid_C, w_C, 0.0)
    p_CV = jnp.exp(logits_CV - lse_C[:, None])
    is_gold_CV = jax.lax.broadcasted_iota(jnp.int32, (1, V), 1) == gold_C[:, None]
    dlogits_CV = (coef_C[:, None] * jnp.where(is_gold_CV, p_CV - 1.0, p_CV)).astype(mm_dtype)
    dh_CD = None
    if h.perturbed:
      dh_CD = jax.lax.dot_general(
        dlogits_CV, W_DV.astype(mm_dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
      ).astype(h_RTD.dtype)
    if W.perturbed:
      per_shard = lambda a: a.astype(mm_dtype).reshape((S, -1, a.shape[-1]))
      dW_SDV = dW_SDV + jax.lax.dot_general(
        per_shard(h_CD), per_shard(dlogits_CV), (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32
      )
    carry = (sum_loss - jnp.sum(logp_C * w_C), n_valid + jnp.sum(valid_C.astype(jnp.float32)), dW_SDV)
    per_row = lambda a: None if a is None else a.reshape((R, C) + a.shape[1:])
    return carry, (per_row(logp_C), per_row(dh_CD))

  dW0 = None
  if W.perturbed:
    dW0 = nn.with_logical_constraint(jnp.zeros((S,) + W_DV.shape, jnp.float32), ("batch", "act_embed", "vocab"))
  (sum_loss, n_valid, dW_SDV), (logp_KRC, dh_KRCD) = jax.lax.scan(
    step, (jnp.float32(0.0), jnp.float32(0.0), dW0), (h_KRCD, y_KRC, w_KRC)
  )
  dW_DV = None if dW_SDV is None else jnp.sum(dW_SDV, axis=0)
  logp_RT = unchunk_tokens(logp_KRC, T)
  dh_RTD = None if dh_KRCD is None else unchunk_tokens(dh_KRCD, T)
  residuals = (dh_RTD, None if dW_DV is None else dW_DV.astype(W_DV.dtype), logp_RT if w.perturbed else None)
  return (sum_loss, n_valid, logp_RT), residuals


def _ce_bwd(chunk, residuals, cotangents):
  """Scale the forward's gradients by the loss's cotangent; the count and the log-probs carry no gradient."""
  dh_RTD, dW_DV, logp_RT = residuals
  g = cotangents[0]
  if isinstance(g, SymbolicZero):
    return None, None, None, None

  def scaled(x):
    return None if x is None else (g * x).astype(x.dtype)

  return scaled(dh_RTD), scaled(dW_DV), None, None if logp_RT is None else -g * logp_RT


_cross_entropy.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, and exactly 0 when count == 0 (the gradient stays finite: total's is 0)."""
  return total / jnp.maximum(count, 1.0)


def normalisation_weights(valid_BT: jax.Array, mode: str = "batch", denominator=None) -> jax.Array:
  """Per-token weights w [B, T] so that sum(w * loss) is the stream's token-mean.

  "batch": w = valid / (number of valid tokens in the batch).
  "sample": w = valid / (valid tokens of the token's row) / B; a row without valid tokens adds 0
    but still counts in B (as the reference's per-sample 1/B backward does).
  Zero valid tokens anywhere -> all-zero weights (loss 0).

  denominator: the count to divide by instead of this batch's own (`normalisation_denominator` summed over
  every micro-batch of an accumulated step), so that the micro-batch losses add up to the loss of one batch
  holding all of them: token-weighted, not a mean of micro-batch means.
  """
  valid = valid_BT.astype(jnp.float32)
  if mode not in ("batch", "sample"):
    raise ValueError(f"normalisation mode {mode!r}: expected 'batch' or 'sample'")
  if mode == "sample" and valid.ndim != 2:
    raise ValueError(f"'sample' normalisation needs [B, T] masks, got shape {valid.shape}")
  if denominator is None:
    denominator = normalisation_denominator(valid_BT, mode)
  denominator = jnp.maximum(jnp.asarray(denominator, jnp.float32), 1.0)
  if mode == "batch":
    return valid / denominator
  per_row = jnp.maximum(valid.sum(axis=-1, keepdims=True), 1.0)
  return valid / per_row / denominator


def normalisation_denominator(valid_BT: jax.Array, mode: str = "batch") -> jax.Array:
  """What a stream's token-mean divides by: its valid tokens ("batch") or its rows ("sample"), fp32 scalar.

  Additive over micro-batches: the sum over the k micro-batches of an accumulated step is the denominator of
  the one batch holding all of them.
  """
  if mode == "batch":
    return jnp.sum(valid_BT.astype(jnp.float32))
  if mode == "sample":
    return jnp.float32(valid_BT.shape[0])
  raise ValueError(f"normalisation mode {mode!r}: expected 'batch' or 'sample'")


def cross_entropy_mean(h_BTD, W_DV, labels_BT, chunk: int, normalisation: str = "batch", denominator=None):
  """Token-mean CE of one stream (see module docstring); returns (loss, n_valid, gold_logprob_BT).

  denominator: see `normalisation_weights` (default: this batch's own count)."""
  w = normalisation_weights(labels_BT != IGNORE_INDEX, normalisation, denominator)
  loss, n_valid, gold = chunked_cross_entropy(h_BTD, W_DV, labels_BT, chunk, weights_N=w)
  return loss, n_valid, gold


# ----------------------------------------------------------------------------------
# Confidence head loss and metrics
# ----------------------------------------------------------------------------------


def bce_with_logits(logit: jax.Array, target: jax.Array) -> jax.Array:
  """Elementwise, numerically stable BCE(sigmoid(logit), target) in fp32."""
  a = logit.astype(jnp.float32)
  t = target.astype(jnp.float32)
  return jnp.maximum(a, 0.0) - a * t + jnp.log1p(jnp.exp(-jnp.abs(a)))


def confidence_bce(
  conf_logit_N: jax.Array,
  target_N: jax.Array,
  mask_N: jax.Array,
  weights_N: jax.Array | None = None,
  denominator=None,
) -> jax.Array:
  """Mean over valid positions of BCEWithLogits(conf_logit, sg(target)).

  Args:
    conf_logit_N: confidence-head logits a_j, any shape [...].
    target_N: targets in [0, 1] (e.g. `sft_confidence_target` or an OPD target), same shape; the
      gradient is always stopped here, so the loss never pushes the student towards easy drafts.
    mask_N: bool validity, same shape.
    weights_N: optional per-token weights replacing the plain mean (sum(w * bce * mask)).
    denominator: without weights, divide the sum by this instead of the mask's count (the count of every
      micro-batch of an accumulated step).

  Returns: fp32 scalar; 0 when no position is valid. Input detaching (docs/method.md#confidence-head) is the
  caller's choice: pass stop_gradient'ed hidden states into the head.
  """
  t = jnp.clip(jax.lax.stop_gradient(target_N).astype(jnp.float32), 0.0, 1.0)
  m = mask_N.astype(jnp.float32)
  # where(): a masked position may carry garbage (inf/NaN) logits without poisoning the gradient.
  bce = jnp.where(mask_N, bce_with_logits(jnp.where(mask_N, conf_logit_N, 0.0), t), 0.0)
  if weights_N is not None:
    return jnp.sum(bce * weights_N.astype(jnp.float32) * m)
  return safe_mean(jnp.sum(bce), jnp.sum(m) if denominator is None else denominator)


def sft_confidence_target(gold_logprob_N: jax.Array) -> jax.Array:
  """SFT target (docs/method.md#sft-losses): t = clamp(exp(log p_mtp(gold)), 0, 1), no gradient."""
  return jnp.clip(jnp.exp(jax.lax.stop_gradient(gold_logprob_N).astype(jnp.float32)), 0.0, 1.0)


def confidence_metrics(
  conf_prob_N: jax.Array, target_N: jax.Array, mask_N: jax.Array, threshold: float = 0.95, n_bins: int = 10
) -> dict:
  """Calibration metrics of the confidence head over valid positions (all fp32 scalars).

  conf_prob_N: predicted acceptance c = sigmoid(a); target_N: its target (the acceptance
  probability min(1, p_t/p_s) or 1 - TV, or p_mtp(gold) in SFT); mask_N: validity.

  * ece: expected calibration error over `n_bins` equal-width bins of c on [0, 1] (c = 1 goes to
    the last bin): sum_b (n_b / n) |mean_b(c) - mean_b(target)|. Targets are soft probabilities,
    so a bin is calibrated when its mean confidence equals its mean acceptance probability.
  * mean_pred, mean_target: plain means.
  * kept_rate: share of valid drafts with c >= threshold (kept without a verifier at serving).
  * kept_rejected_rate: among kept drafts, the expected share a verifier would have rejected,
    mean over kept of (1 - target). The target is an acceptance probability, so 1 - target is
    the expected rejection of that draft; this is the error rate of the gate. 0 if nothing is kept.
  """
  c = conf_prob_N.astype(jnp.float32).reshape(-1)
  t = target_N.astype(jnp.float32).reshape(-1)
  m = mask_N.reshape(-1).astype(jnp.float32)
  n = jnp.sum(m)
  bins = jnp.clip(jnp.floor(c * n_bins).astype(jnp.int32), 0, n_bins - 1)
  onehot = jax.nn.one_hot(bins, n_bins, dtype=jnp.float32) * m[:, None]
  gap = jnp.abs(onehot.T @ c - onehot.T @ t)  # per bin: n_b * |mean_b(c) - mean_b(t)|
  kept = m * (c >= threshold)
  n_kept = jnp.sum(kept)
  return {
    "ece": safe_mean(jnp.sum(gap), n),
    "mean_pred": safe_mean(jnp.sum(c * m), n),
    "mean_target": safe_mean(jnp.sum(t * m), n),
    "kept_rate": safe_mean(n_kept, n),
    "kept_rejected_rate": safe_mean(jnp.sum(kept * (1.0 - t)), n_kept),
  }
