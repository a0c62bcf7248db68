"""Compressed-mode (PIPO) scoring: the log-prob each stream gives the true token, and the confidence.

For a sequence x_0..x_{n-1} (a parity PAD is appended when n is odd; it is never scored), in the training
alignment of docs/method.md#index-alignment, slot j = 0..L-2:
  backbone  h_j                 predicts x_{2j+2}
  MTP       (e(x_{2j+2}), h_j)  predicts x_{2j+3};  confidence sigmoid(conf_head(h_j, m_j)) is its keep score
Outputs follow `score`'s convention: entry i of each list is about token t = i + 1 (i = 0..n-2), and a stream
with no prediction for that token holds None (the backbone has none for odd t and t = 1, the MTP none for even
t; the confidence sits at the MTP's positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pipo_jax.config import ModelConfig
from pipo_jax.data import pairs
from pipo_jax.models.pipo import PipoModel

_MIN_BUCKET = 16
_HEAD_CHUNK = 256


def pow2_bucket(n: int) -> int:
  """A batch's fixed length: `n` rounded up to a power of two (at least 16), so the number of compilations is
  logarithmic in the longest sequence (`score` and `score --pipo`)."""
  return max(_MIN_BUCKET, 1 << (n - 1).bit_length())


def _gold_logprob(h_BJD, w_DV, tgt_BJ):
  """log softmax(h W)[tgt] in fp32, LM head applied in chunks of slots."""
  B, J, D = h_BJD.shape
  chunk = min(J, _HEAD_CHUNK)
  pad = (-J) % chunk
  h = jnp.pad(h_BJD, ((0, 0), (0, pad), (0, 0)))
  t = jnp.pad(tgt_BJ, ((0, 0), (0, pad)))
  n = (J + pad) // chunk

  def head(_, xs):
    h_BCD, t_BC = xs
    logits = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32)
    return None, jnp.take_along_axis(logits, t_BC[..., None], -1)[..., 0] - jax.nn.logsumexp(logits, -1)

  _, lp = jax.lax.scan(head, None, (h.reshape(B, n, chunk, D).swapaxes(0, 1), t.reshape(B, n, chunk).swapaxes(0, 1)))
  return lp.swapaxes(0, 1).reshape(B, J + pad)[:, :J]


def make_pipo_score_fn(config: ModelConfig):
  """Jitted (params, ids_BT, valid_BT) -> (backbone_lp_BJ, mtp_lp_BJ, conf_BJ); T even, left-padded in pairs."""
  model = PipoModel(config)

  @jax.jit
  def fn(params, ids_BT, valid_BT):
    v = {"params": params}
    out = model.apply(v, ids_BT, valid_BT)
    w_DV = model.apply(v, method=PipoModel.head_kernel)
    gold_b_BJ, gold_m_BJ = pairs.stream_targets(ids_BT)  # the tokens each stream predicts
    lp_b = _gold_logprob(out["h_BJD"], w_DV, gold_b_BJ)
    lp_m = _gold_logprob(out["m_BJD"], w_DV, gold_m_BJ)
    return lp_b, lp_m, jax.nn.sigmoid(out["conf_logit_BJ"])

  return fn


def score_sequences_pipo(
  config: ModelConfig, params, seqs: Sequence[np.ndarray], batch_size: int, pad_id: int
) -> list[dict]:
  """Per sequence: {"backbone_logprobs", "mtp_logprobs", "confidence"}, each a list of n-1 floats or None."""
  fn = make_pipo_score_fn(config)
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
  out: list = [None] * len(seqs)
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    T = pow2_bucket(max(len(seqs[i]) + len(seqs[i]) % 2 for i in idx))
    ids = np.full((batch_size, T), pad_id, np.int32)
    valid = np.zeros((batch_size, T), bool)
    for row, i in enumerate(idx):
      s = np.asarray(seqs[i], np.int32)
      if len(s) % 2:
        s = np.append(s, np.int32(pad_id))  # parity PAD in the token2 slot of the last pair
      ids[row, T - len(s) :] = s
      valid[row, T - len(s) :] = True
    lp_b, lp_m, conf = (np.asarray(a) for a in fn(params, ids, valid))
    for row, i in enumerate(idx):
      n = len(seqs[i])
      off = (T - (n + n % 2)) // 2  # left-padding pairs
      rec = {"backbone_logprobs": [None] * (n - 1), "mtp_logprobs": [None] * (n - 1), "confidence": [None] * (n - 1)}
      for j in range((n + n % 2) // 2 - 1):
        t_b, t_m = 2 * j + 2, 2 * j + 3
        if t_b < n:
          rec["backbone_logprobs"][t_b - 1] = float(lp_b[row, off + j])
        if t_m < n:
          rec["mtp_logprobs"][t_m - 1] = float(lp_m[row, off + j])
          rec["confidence"][t_m - 1] = float(conf[row, off + j])
      out[i] = rec
  return out
