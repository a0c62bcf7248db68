"""On-policy distillation divergences (docs/method.md#divergences), chunked over tokens.

Axis names: N tokens, C tokens of one chunk, D hidden size, V vocabulary, M union slots (2K + 1).

Per token n the student distribution is p_s = softmax(z_s / tau), the teacher's p_t =
softmax(z_t / tau), with z = W^T h; the teacher side is always under stop_gradient. y_n is the
token the student sampled during the rollout (the label). Modes:

* "sampled": single-sample reverse KL. The reference trains on l(y) = log p_s(y) - log p_t(y)
  directly; as log p_t carries no gradient its gradient is grad log p_s(y), whose expectation
  under y ~ p_s is sum_y grad p_s(y) = 0 and which never looks at the teacher (docs/method.md#sampled-kl-gradient).
  We use the score-function (REINFORCE) surrogate instead:

      grad KL(p_s || p_t) = grad sum_y p_s(y) (log p_s(y) - log p_t(y))
                          = sum_y p_s(y) grad log p_s(y) (log p_s(y) - log p_t(y))
                            + sum_y p_s(y) grad log p_s(y)              [= grad sum p_s = 0]
                          = E_{y~p_s}[ (log p_s(y) - log p_t(y)) grad log p_s(y) ],

  so  g(y) = sg(l(y) - b) * grad log p_s(y)  is unbiased for any baseline b that does not depend on
  y (E[b grad log p_s] = 0 again); b only lowers the variance. The per-token loss is built so its
  VALUE is the unbiased KL estimate l(y) and its GRADIENT is g(y):
      loss = sg(l) + sg(l - b) * (log p_s(y) - sg(log p_s(y))).
  Unbiasedness assumes y ~ p_s at temperature tau; a rollout drawn with top-k/top-p/presence
  penalty is only approximately on-policy (an importance weight would need the sampler's
  probabilities, which the rollout does not return).
* "topk": exact reverse KL on the union U = topK(z_s) + topK(z_t) + {y} (M = 2K + 1 slots, top-k
  on raw logits as the reference). A slot whose id already occurs in an earlier slot is removed
  from both softmaxes (-inf logit, zero mass), so every id counts exactly once; both sides are
  renormalised over U. The top-k selection itself is piecewise constant (no gradient).
* "full": exact reverse KL over the whole vocabulary.
* "jsd" with beta: beta = 0 forward KL(p_t || p_s), beta = 1 reverse KL(p_s || p_t), otherwise
  beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = (1 - beta) p_s + beta p_t.

Confidence targets (always without gradient):
* sampled, topk: the speculative-sampling acceptance of the rolled-out draft, min(1, p_t(y) / p_s(y)) with
  FULL-vocabulary softmaxes (docs/method.md#confidence-target-on-full-softmaxes). The reference evaluates the
  ratio on the renormalised union instead, which multiplies it by Z_s(U) / Z_t(U), the ratio of the union masses,
  and so is not the acceptance probability; the full softmaxes are at hand in the chunk anyway.
* full, jsd: the expected acceptance sum_v min(p_s, p_t) = 1 - TV(p_s, p_t), clamped to [0, 1].

Metric: every mode also returns the exact full-vocabulary reverse KL per token (no gradient), so
runs with different training modes report the same quantity.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pipo_jax.config import OPD_DIVERGENCES
from pipo_jax.losses import IGNORE_INDEX, as_rows, gathered_head, head_logits, scan_token_chunks

MODES = OPD_DIVERGENCES


def _reverse_kl(ls, lt):
  return jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)


def _accept_ratio(lsy, lty):
  """min(1, p_t(y)/p_s(y)) = exp(-max(0, log p_s(y) - log p_t(y)))."""
  return jnp.exp(-jnp.maximum(0.0, lsy - lty))


def _overlap(ls, lt):
  """sum_v min(p_s, p_t) = 1 - TV, clamped against rounding."""
  return jnp.clip(jnp.sum(jnp.minimum(jnp.exp(ls), jnp.exp(lt)), axis=-1), 0.0, 1.0)


def union_dedupe_mask(ids_CM: jax.Array) -> jax.Array:
  """[C, M] ids -> [C, M] bool, True where the id already occurs at an earlier slot of its row."""
  m = ids_CM.shape[-1]
  earlier = jnp.tril(jnp.ones((m, m), bool), k=-1)  # earlier[k, j] = j < k
  same = ids_CM[:, :, None] == ids_CM[:, None, :]
  return jnp.any(same & earlier[None], axis=-1)


def _topk_union_kl(zs, zt, y, k, tau):
  """Reverse KL on the deduplicated, renormalised top-k union; zs, zt raw [C, V] logits."""
  k = min(int(k), zs.shape[-1])
  ids = jnp.concatenate(
    [jax.lax.top_k(jax.lax.stop_gradient(zs), k)[1], jax.lax.top_k(zt, k)[1], y[:, None].astype(jnp.int32)], axis=-1
  )
  dup = union_dedupe_mask(ids)
  zs_u = jnp.take_along_axis(zs, ids, axis=-1) / tau
  zt_u = jnp.take_along_axis(zt, ids, axis=-1) / tau
  # Duplicates get -inf only inside logsumexp; log-probs use the finite logits and the duplicate's
  # mass is zeroed by where(), so no inf - inf or 0 * inf appears in value or gradient.
  ls_u = zs_u - jax.nn.logsumexp(jnp.where(dup, -jnp.inf, zs_u), axis=-1, keepdims=True)
  lt_u = zt_u - jax.nn.logsumexp(jnp.where(dup, -jnp.inf, zt_u), axis=-1, keepdims=True)
  ps_u = jnp.where(dup, 0.0, jnp.exp(ls_u))
  return jnp.sum(ps_u * (ls_u - lt_u), axis=-1)


def _jsd(ls, lt, beta):
  ps, pt = jnp.exp(ls), jnp.exp(lt)
  if beta == 0.0:
    return jnp.sum(pt * (lt - ls), axis=-1)
  if beta == 1.0:
    return jnp.sum(ps * (ls - lt), axis=-1)
  log_m = jnp.logaddexp(ls + jnp.log1p(-beta), lt + jnp.log(beta))
  return beta * jnp.sum(pt * (lt - log_m), axis=-1) + (1.0 - beta) * jnp.sum(ps * (ls - log_m), axis=-1)


def opd_token_terms(
  zs_CV,
  zt_CV,
  y_C,
  mode: str,
  *,
  topk: int = 32,
  beta: float = 0.5,
  temperature: float = 1.0,
  baseline_C: jax.Array | None = None,
):
  """Per-token OPD terms from student and teacher logits of one chunk.

  Args:
    zs_CV: student logits [C, V] (carry gradient). zt_CV: teacher logits [C, V] (stopped here).
    y_C: int32 token ids in [0, V) (the sampled / filled label; invalid rows are masked by the caller).
    mode: one of MODES. topk: K of "topk". beta: JSD beta of "jsd". temperature: tau.
    baseline_C: optional baseline for "sampled" (broadcastable to [C]); must not depend on y_C.

  Returns: (loss_C, kl_C, target_C), fp32 [C] each. loss carries the training gradient; kl is the
  exact reverse KL (stop-gradient, metrics); target is the confidence target (stop-gradient).
  """
  tau = float(temperature)
  zs = zs_CV.astype(jnp.float32)
  zt = jax.lax.stop_gradient(zt_CV.astype(jnp.float32))
  ls = jax.nn.log_softmax(zs / tau, axis=-1)
  lt = jax.nn.log_softmax(zt / tau, axis=-1)
  ls_sg = jax.lax.stop_gradient(ls)
  kl = _reverse_kl(ls_sg, lt)
  lsy = jnp.take_along_axis(ls, y_C[:, None], axis=-1)[:, 0]
  lty = jnp.take_along_axis(lt, y_C[:, None], axis=-1)[:, 0]
  lsy_sg = jax.lax.stop_gradient(lsy)
  if mode in ("sampled", "topk"):
    target = _accept_ratio(lsy_sg, lty)
  else:
    target = _overlap(ls_sg, lt)

  if mode == "sampled":
    ell = lsy_sg - lty
    b = 0.0 if baseline_C is None else jax.lax.stop_gradient(baseline_C).astype(jnp.float32)
    loss = ell + (ell - b) * (lsy - lsy_sg)
  elif mode == "topk":
    loss = _topk_union_kl(zs, zt, y_C, topk, tau)
  elif mode == "full":
    loss = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
  elif mode == "jsd":
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f"opd.jsd_beta={beta}: expected a value in [0, 1]")
    loss = _jsd(ls, lt, float(beta))
  else:
    raise ValueError(f"opd.divergence={mode!r}: expected one of {MODES}")
  return loss, kl, target


class OPDStream(NamedTuple):
  """Result of `opd_stream_loss`. Scalars are fp32; per-token arrays have the labels' shape."""

  loss_sum: jax.Array  # sum over valid tokens of weight * loss (the only term with a gradient)
  n_valid: jax.Array  # number of valid tokens (after the PAD fill)
  kl_sum: jax.Array  # sum over valid tokens of the exact reverse KL (metric)
  labels: jax.Array  # int32 labels after the fill
  valid: jax.Array  # bool
  loss_tok: jax.Array  # per-token loss value (0 where invalid)
  kl_tok: jax.Array  # per-token reverse KL (0 where invalid)
  conf_target: jax.Array  # per-token confidence target (0 where invalid)


def stream_valid(labels_N: jax.Array, fill_N: jax.Array | None = None) -> jax.Array:
  """Validity after the PAD fill: a label != -100, or a filled position."""
  valid = labels_N != IGNORE_INDEX
  return valid if fill_N is None else valid | fill_N


def opd_stream_loss(
  h_s_ND,
  W_s_DV,
  h_t_ND,
  W_t_DV,
  labels_N,
  mode: str,
  *,
  chunk: int = 2048,
  topk: int = 32,
  beta: float = 0.5,
  temperature: float = 1.0,
  fill_N: jax.Array | None = None,
  weights_N: jax.Array | None = None,
  baseline_N: jax.Array | None = None,
) -> OPDStream:
  """One OPD stream (backbone or MTP), chunked over tokens with remat.

  Args:
    h_s_ND: student post-norm hidden states [..., D_s] (gradient flows into them and W_s).
    W_s_DV: student LM head [D_s, V].
    h_t_ND, W_t_DV: teacher hidden states [..., D_t] aligned with the student's (see
      opd.pad_compaction.teacher_stream_states) and teacher head [D_t, V]; both stop-gradient.
    labels_N: int labels (token axes of h_s); -100 = ignored.
    mode: "sampled" | "topk" | "full" | "jsd". topk, beta, temperature: see module docstring.
    fill_N: optional bool, labels' shape: where true the label becomes the student's own argmax
      (no gradient) and the position counts as valid. The caller decides which PADs to fill
      (e.g. only rejected drafts: docs/method.md#pad-label-fill).
    weights_N: optional per-token weights (labels' shape) for loss_sum, e.g.
      losses.normalisation_weights(stream_valid(labels, fill), mode); default 1 (then divide
      loss_sum by n_valid with losses.safe_mean).
    baseline_N: optional "sampled" baseline per token (labels' shape), independent of the sample.
  Returns: OPDStream.
  """
  if W_s_DV.shape[1] != W_t_DV.shape[1]:
    raise ValueError(f"student vocab {W_s_DV.shape[1]} != teacher vocab {W_t_DV.shape[1]}")
  if mode not in MODES:
    raise ValueError(f"opd.divergence={mode!r}: expected one of {MODES}")
  shape = labels_N.shape
  rows = partial(as_rows, token_shape=shape)
  hs = rows(h_s_ND)
  ht = rows(jax.lax.stop_gradient(h_t_ND))
  W_s, W_t = gathered_head(W_s_DV), gathered_head(jax.lax.stop_gradient(W_t_DV))
  y = rows(labels_N.astype(jnp.int32))
  fill = jnp.zeros(hs.shape[:2], bool) if fill_N is None else rows(fill_N.astype(bool))
  w = jnp.ones(hs.shape[:2], jnp.float32) if weights_N is None else rows(weights_N.astype(jnp.float32))
  b = jnp.zeros(hs.shape[:2], jnp.float32) if baseline_N is None else rows(baseline_N.astype(jnp.float32))

  def body(hs_C, ht_C, y_C, fill_C, w_C, b_C):
    zs = head_logits(hs_C, W_s)
    zt = head_logits(ht_C, W_t)
    own = jnp.argmax(jax.lax.stop_gradient(zs), axis=-1).astype(jnp.int32)
    y_C = jnp.where(fill_C, own, y_C)
    valid = y_C != IGNORE_INDEX
    loss, kl, target = opd_token_terms(
      zs, zt, jnp.where(valid, y_C, 0), mode, topk=topk, beta=beta, temperature=temperature, baseline_C=b_C
    )
    loss = jnp.where(valid, loss, 0.0)
    kl = jnp.where(valid, kl, 0.0)
    target = jnp.where(valid, target, 0.0)
    vf = valid.astype(jnp.float32)
    sums = (jnp.sum(loss * w_C), jnp.sum(vf), jnp.sum(kl))
    return sums, (y_C, valid, jax.lax.stop_gradient(loss), kl, target)

  (loss_sum, n_valid, kl_sum), (y_f, valid, loss_tok, kl_tok, target) = scan_token_chunks(
    body, (hs, ht, y, fill, w, b), (0, 0, IGNORE_INDEX, False, 0.0, 0.0), chunk
  )
  r = lambda x: x.reshape(shape)
  return OPDStream(loss_sum, n_valid, kl_sum, r(y_f), r(valid), r(loss_tok), r(kl_tok), r(target))
