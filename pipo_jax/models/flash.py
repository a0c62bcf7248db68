"""Blocked causal attention with an online softmax (flash-attention style) in pure JAX.

Axis vocabulary as in attention.py: B batch, T queries, S key slots, G kv heads, R query heads per kv head,
K head dim; blocked layouts add nq / nk (number of query / key blocks) and q / s (positions inside a block).

Why: the dense path materialises fp32 [B, H, T, S] scores (and autodiff keeps the probabilities for backward),
which is hundreds of GiB per device at 64K tokens. Here the forward keeps only an fp32 running max / sum /
accumulator per query block, and a custom VJP recomputes each [q, s] probability block from the saved
log-sum-exp, so forward and backward temporaries are O(block_q x block_k) per (batch, head) instead of O(T x S).

Semantics equal the dense path for every query row that sees at least one valid key: query t (cache slot
query_slot_T[t]) attends to slot s iff s <= query_slot_T[t] and key_valid_BS[b, s]. A row that sees no valid key
(a left-pad query) outputs 0 here (the dense path outputs the mean of all values); such rows are never used
(pad positions are masked as keys and zeroed at the GDN input), and their gradient is 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_MASK_VALUE = float(np.finfo(np.float32).min)


def _block_mask(q_slot_q, k_slot_s, k_valid_Bs):
  """mask_B11qs: causal by slot and key validity, broadcast over (G, R)."""
  causal_qs = k_slot_s[None, :] <= q_slot_q[:, None]
  return causal_qs[None, None, None] & k_valid_Bs[:, None, None, None, :]


def _scores(q_BGRqK, k_BGsK, mask_BGRqs, scale):
  """Masked fp32 scores [B, G, R, q, s]; the matmul runs in the input dtype as the dense path does."""
  s = jnp.einsum("bgrqk,bgsk->bgrqs", q_BGRqK, k_BGsK).astype(jnp.float32) * np.float32(scale)
  return jnp.where(mask_BGRqs, s, _MASK_VALUE)


def _to_blocks(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, bq, bk):
  """Pad T / S up to whole blocks and move the block index to the front (the scanned axis)."""
  # Inside a scan over layers the slots and key validity are loop-invariant, and JAX's scan partial eval
  # hoists loop-invariant work out of the loop as stacked residuals: here every [q, s] mask tile of every
  # (query block, key block) pair, i.e. O(T x S) again. Tying them to q (loop-varying) with an optimisation
  # barrier keeps the mask computation inside the loop.
  q_BTGRK, query_slot_T, key_valid_BS = jax.lax.optimization_barrier((q_BTGRK, query_slot_T, key_valid_BS))
  B, T, G, R, K = q_BTGRK.shape
  S = k_BSGK.shape[1]
  nq, nk = -(-T // bq), -(-S // bk)
  pq, pk = nq * bq - T, nk * bk - S
  # Padded queries get slot -1 (they see nothing, output 0, are sliced off); padded keys are invalid.
  q = jnp.pad(q_BTGRK, ((0, 0), (0, pq), (0, 0), (0, 0), (0, 0)))
  q_slot = jnp.pad(query_slot_T.astype(jnp.int32), (0, pq), constant_values=-1)
  k = jnp.pad(k_BSGK, ((0, 0), (0, pk), (0, 0), (0, 0)))
  v = jnp.pad(v_BSGK, ((0, 0), (0, pk), (0, 0), (0, 0)))
  k_valid = jnp.pad(key_valid_BS, ((0, 0), (0, pk)))
  q_nBGRqK = q.reshape(B, nq, bq, G, R, K).transpose(1, 0, 3, 4, 2, 5)
  k_nBGsK = k.reshape(B, nk, bk, G, K).transpose(1, 0, 3, 2, 4)
  v_nBGsK = v.reshape(B, nk, bk, G, K).transpose(1, 0, 3, 2, 4)
  return (
    q_nBGRqK,
    k_nBGsK,
    v_nBGsK,
    q_slot.reshape(nq, bq),
    jnp.arange(nk * bk, dtype=jnp.int32).reshape(nk, bk),
    k_valid.reshape(B, nk, bk).transpose(1, 0, 2),
  )


def _from_q_blocks(x_nBGRqK, T):
  """[nq, B, G, R, q, K] -> [B, T, G, R, K] (drops the padded queries)."""
  nq, B, G, R, bq, K = x_nBGRqK.shape
  return x_nBGRqK.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, G, R, K)[:, :T]


def _forward(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, bq, bk):
  """-> (o_nBGRqK in q's dtype, lse_nBGRq fp32 (0 on rows with no valid key), blocks)."""
  blocks = _to_blocks(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, bq, bk)
  q_nBGRqK, k_nBGsK, v_nBGsK, q_slot_nq, k_slot_ns, k_valid_nBs = blocks
  scale = q_BTGRK.shape[-1] ** -0.5
  dtype = q_BTGRK.dtype

  def q_block(args):
    q_BGRqK, q_slot_q = args
    last_slot = jnp.max(q_slot_q)

    def kv_step(carry, xs):
      k_BGsK, v_BGsK, k_slot_s, k_valid_Bs = xs

      def update(carry):
        m_BGRq, l_BGRq, acc_BGRqK = carry
        mask = _block_mask(q_slot_q, k_slot_s, k_valid_Bs)
        s = _scores(q_BGRqK, k_BGsK, mask, scale)
        m_new = jnp.maximum(m_BGRq, s.max(-1))
        # Masked entries are zeroed explicitly (not via exp(-huge)): a row with no valid key so far keeps
        # l = 0 and acc = 0 even though its max is still the mask value.
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m_BGRq - m_new)
        l_new = l_BGRq * corr + p.sum(-1)
        pv = jnp.einsum("bgrqs,bgsk->bgrqk", p.astype(dtype), v_BGsK, preferred_element_type=jnp.float32)
        return m_new, l_new, acc_BGRqK * corr[..., None] + pv

      # Key blocks entirely above the causal diagonal of this query block contribute nothing: skip them.
      return jax.lax.cond(k_slot_s[0] > last_slot, lambda c: c, update, carry), None

    B, G, R, q, K = q_BGRqK.shape
    init = (
      jnp.full((B, G, R, q), _MASK_VALUE, jnp.float32),
      jnp.zeros((B, G, R, q), jnp.float32),
      jnp.zeros((B, G, R, q, K), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (k_nBGsK, v_nBGsK, k_slot_ns, k_valid_nBs))
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = (acc / l_safe[..., None]).astype(dtype)
    lse = jnp.where(seen, m + jnp.log(l_safe), 0.0)
    return o, lse

  o_nBGRqK, lse_nBGRq = jax.lax.map(q_block, (q_nBGRqK, q_slot_nq))
  return o_nBGRqK, lse_nBGRq, blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def blocked_attention(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block_q: int, block_k: int):
  """Causal GQA softmax attention without materialising [T, S].

  q_BTGRK [B, T, G, R, K] (query head h = g*R + r), k_BSGK / v_BSGK [B, S, G, K] (same dtype as q),
  query_slot_T int [T] (cache slot of each query), key_valid_BS bool [B, S]; block sizes are static.
  Returns o_BTGRK [B, T, G, R, K] in q's dtype. Scores are scaled by K**-0.5, softmax statistics are fp32.
  """
  o_nBGRqK, _, _ = _forward(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block_q, block_k)
  return _from_q_blocks(o_nBGRqK, q_BTGRK.shape[1])


def _fwd(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block_q, block_k):
  o_nBGRqK, lse_nBGRq, _ = _forward(q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block_q, block_k)
  # Residuals are O(T + S): inputs, the output and one fp32 log-sum-exp per query row.
  res = (q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, o_nBGRqK, lse_nBGRq)
  return _from_q_blocks(o_nBGRqK, q_BTGRK.shape[1]), res


def _bwd(block_q, block_k, res, do_BTGRK):
  """Flash-attention backward in one pass: scan over key blocks (carrying dK_j, dV_j), inner scan over query
  blocks; dQ lives as a whole fp32 [nq, ...] buffer in the carry and is updated in place per (i, j) block."""
  q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, o_nBGRqK, lse_nBGRq = res
  B, T, G, R, K = q_BTGRK.shape
  S = k_BSGK.shape[1]
  dtype = q_BTGRK.dtype
  scale = np.float32(K**-0.5)
  q_nBGRqK, k_nBGsK, v_nBGsK, q_slot_nq, k_slot_ns, k_valid_nBs = _to_blocks(
    q_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block_q, block_k
  )
  do_nBGRqK = _to_blocks(do_BTGRK, k_BSGK, v_BSGK, query_slot_T, key_valid_BS, block_q, block_k)[0]
  # D_i = rowsum(dO * O): the softmax-Jacobian term, dS = P * (dP - D).
  d_nBGRq = jnp.einsum("nbgrqk,nbgrqk->nbgrq", do_nBGRqK.astype(jnp.float32), o_nBGRqK.astype(jnp.float32))
  nq = q_nBGRqK.shape[0]

  def kv_block(dq_acc, xs):
    k_BGsK, v_BGsK, k_slot_s, k_valid_Bs = xs

    def q_step(carry, ys):
      i, q_BGRqK, do_BGRqK, lse_BGRq, d_BGRq, q_slot_q = ys

      def update(carry):
        dk, dv, dq = carry
        mask = _block_mask(q_slot_q, k_slot_s, k_valid_Bs)
        s = _scores(q_BGRqK, k_BGsK, mask, scale)
        p = jnp.where(mask, jnp.exp(s - lse_BGRq[..., None]), 0.0)
        dv = dv + jnp.einsum("bgrqs,bgrqk->bgsk", p.astype(dtype), do_BGRqK, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bgrqk,bgsk->bgrqs", do_BGRqK, v_BGsK, preferred_element_type=jnp.float32)
        ds = (p * (dp - d_BGRq[..., None]) * scale).astype(dtype)
        dk = dk + jnp.einsum("bgrqs,bgrqk->bgsk", ds, q_BGRqK, preferred_element_type=jnp.float32)
        dq_i = jnp.einsum("bgrqs,bgsk->bgrqk", ds, k_BGsK, preferred_element_type=jnp.float32)
        dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
        return dk, dv, dq

      skip = k_slot_s[0] > jnp.max(q_slot_q)
      return jax.lax.cond(skip, lambda c: c, update, carry), None

    zeros = jnp.zeros(k_BGsK.shape, jnp.float32)
    (dk, dv, dq_acc), _ = jax.lax.scan(
      q_step, (zeros, zeros, dq_acc), (jnp.arange(nq), q_nBGRqK, do_nBGRqK, lse_nBGRq, d_nBGRq, q_slot_nq)
    )
    return dq_acc, (dk, dv)

  dq0 = jnp.zeros(q_nBGRqK.shape, jnp.float32)
  dq_nBGRqK, (dk_nBGsK, dv_nBGsK) = jax.lax.scan(kv_block, dq0, (k_nBGsK, v_nBGsK, k_slot_ns, k_valid_nBs))
  nk, bk = k_slot_ns.shape

  def from_k_blocks(x_nBGsK):
    return x_nBGsK.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, G, K)[:, :S]

  dq = _from_q_blocks(dq_nBGRqK, T).astype(q_BTGRK.dtype)
  dk = from_k_blocks(dk_nBGsK).astype(k_BSGK.dtype)
  dv = from_k_blocks(dv_nBGsK).astype(v_BSGK.dtype)
  return dq, dk, dv, None, None


blocked_attention.defvjp(_fwd, _bwd)
