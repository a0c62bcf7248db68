"""OPD divergences, estimators and confidence targets against float64 brute force on a tiny vocabulary."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax import losses
from pipo_jax.opd import divergences as opd

N, DS, DT, V, K = 6, 5, 4, 9, 2
IGN = losses.IGNORE_INDEX


def _setup(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  hs = jax.random.normal(k[0], (N, DS))
  Ws = jax.random.normal(k[1], (DS, V))
  ht = jax.random.normal(k[2], (N, DT))
  Wt = jax.random.normal(k[3], (DT, V))
  y = jax.random.randint(k[4], (N,), 0, V)
  return hs, Ws, ht, Wt, y


def _np_logsoftmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _brute(mode, zs, zt, y, tau, beta=0.5, k=K):
  """Per-token loss value and d loss / d zs, float64, from the closed-form softmax chain rule:
  for loss = F(p) with g_v = dF/dp_v, d loss / d z_v = p_v (g_v - sum_u p_u g_u) / tau."""
  zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  ls, lt = _np_logsoftmax(zs / tau), _np_logsoftmax(zt / tau)
  ps, pt = np.exp(ls), np.exp(lt)
  val = np.zeros(len(zs))
  grad = np.zeros_like(zs)
  for n in range(len(zs)):
    if mode == "topk":
      union = sorted(set(np.argsort(-zs[n])[:k]) | set(np.argsort(-zt[n])[:k]) | {int(y[n])})
      lsu, ltu = _np_logsoftmax(zs[n, union] / tau), _np_logsoftmax(zt[n, union] / tau)
      psu = np.exp(lsu)
      g = lsu - ltu
      val[n] = np.sum(psu * g)
      grad[n, union] = psu * (g - np.sum(psu * g)) / tau
      continue
    if mode == "full" or (mode == "jsd" and beta == 1.0):
      g = ls[n] - lt[n]
      val[n] = np.sum(ps[n] * g)
    elif mode == "jsd" and beta == 0.0:
      g = -pt[n] / ps[n]
      val[n] = np.sum(pt[n] * (lt[n] - ls[n]))
    elif mode == "jsd":
      log_m = np.log((1 - beta) * ps[n] + beta * pt[n])
      g = (1 - beta) * (ls[n] - log_m)
      val[n] = beta * np.sum(pt[n] * (lt[n] - log_m)) + (1 - beta) * np.sum(ps[n] * (ls[n] - log_m))
    elif mode == "sampled":
      # Score-function surrogate: value l(y), gradient l(y) * d log p_s(y) / dz = l(y) (e_y - p_s) / tau.
      ell = ls[n, y[n]] - lt[n, y[n]]
      val[n] = ell
      grad[n] = ell * (np.eye(V)[y[n]] - ps[n]) / tau
      continue
    grad[n] = ps[n] * (g - np.sum(ps[n] * g)) / tau
  return val, grad


CASES = [("sampled", 0.5), ("topk", 0.5), ("full", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0)]
TAU = 0.7  # tau != 1 so that the temperature scaling is exercised too


@functools.partial(jax.jit, static_argnames=("mode", "beta", "tau", "chunk"))
def _run(hs, Ws, ht, Wt, y, fill=None, w=None, *, mode, beta=0.5, tau=TAU, chunk=4):
  """Jitted (cached per static config) stream loss and its gradient wrt all four inputs."""

  def f(hs, Ws, ht, Wt):
    out = opd.opd_stream_loss(
      hs, Ws, ht, Wt, y, mode, chunk=chunk, topk=K, beta=beta, temperature=tau, fill_N=fill, weights_N=w
    )
    return out.loss_sum, out

  (_, out), grads = jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True)(hs, Ws, ht, Wt)
  return out, grads


@pytest.mark.parametrize("mode,beta", CASES)
def test_divergence_value_gradient_and_target_vs_brute_force(mode, beta):
  hs, Ws, ht, Wt, y = _setup()
  out, (g_hs, g_Ws, g_ht, g_Wt) = _run(hs, Ws, ht, Wt, y, mode=mode, beta=beta)
  zs, zt = np.asarray(hs @ Ws, np.float64), np.asarray(ht @ Wt, np.float64)
  yy = np.asarray(y)
  ref_val, ref_gz = _brute(mode, zs, zt, yy, TAU, beta)
  np.testing.assert_allclose(out.loss_tok, ref_val, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.loss_sum, ref_val.sum(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_hs, ref_gz @ np.asarray(Ws, np.float64).T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_Ws, np.asarray(hs, np.float64).T @ ref_gz, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(g_ht) == 0) and np.all(np.asarray(g_Wt) == 0)  # teacher never trained
  # Metric: exact reverse KL whatever mode is trained.
  np.testing.assert_allclose(out.kl_tok, _brute("full", zs, zt, yy, TAU)[0], rtol=1e-5, atol=1e-6)
  assert float(out.n_valid) == N
  # Confidence targets: acceptance of the sampled draft with full softmaxes, or 1 - TV.
  ps, pt = np.exp(_np_logsoftmax(zs / TAU)), np.exp(_np_logsoftmax(zt / TAU))
  accept = np.minimum(1.0, pt[np.arange(N), yy] / ps[np.arange(N), yy])
  overlap = np.minimum(ps, pt).sum(-1)
  np.testing.assert_allclose(out.conf_target, accept if mode in ("sampled", "topk") else overlap, rtol=1e-5, atol=1e-6)


def test_topk_union_deduplicates():
  hs, Ws, ht, Wt, y = _setup(1)
  zs = hs @ Ws
  # Teacher == student, and y inside the top-k: the union has K unique ids among 2K + 1 slots.
  y_top = jnp.argmax(zs, axis=-1)
  ids = jnp.concatenate([jax.lax.top_k(zs, 3)[1], jax.lax.top_k(zs, 3)[1], y_top[:, None]], -1)
  dup = opd.union_dedupe_mask(ids)
  assert np.all(np.asarray((~dup).sum(-1)) == 3)
  np.testing.assert_array_equal(dup[0], [False] * 3 + [True] * 4)
  out, _ = _run(hs, Ws, hs, Ws, y_top, mode="topk")
  np.testing.assert_allclose(out.loss_tok, 0.0, atol=1e-6)
  # Duplicates must not count twice: with K = V every id appears two or three times in the union,
  # and the result must be the exact full-vocabulary KL.
  zt = ht @ Wt
  loss, _, _ = jax.jit(lambda a, b, c: opd.opd_token_terms(a, b, c, "topk", topk=V))(zs, zt, y)
  np.testing.assert_allclose(loss, _brute("full", zs, zt, y, 1.0)[0], rtol=1e-5, atol=1e-6)


def _enumerated_grad(estimator_loss, z_V, zt_V, weights_V):
  """sum_y w(y) d loss(y) / d z for a single token, by evaluating all V samples y at once."""

  def total(z):
    zs = jnp.tile(z[None], (V, 1))
    zt = jnp.tile(zt_V[None], (V, 1))
    return jnp.sum(weights_V * estimator_loss(zs, zt, jnp.arange(V)))

  return np.asarray(jax.jit(jax.grad(total))(z_V), np.float64)


def test_sampled_estimator_is_unbiased_and_reference_is_not():
  tau = TAU
  hs, Ws, ht, Wt, _ = _setup(2)
  z, zt = (hs @ Ws)[0], (ht @ Wt)[0]
  ps = jax.nn.softmax(z / tau)
  full_kl = lambda z: opd.opd_token_terms(z[None], zt[None], jnp.zeros(1, jnp.int32), "full", temperature=tau)[0][0]
  exact = np.asarray(jax.jit(jax.grad(full_kl))(z))
  ours = lambda zs, zt, yy: opd.opd_token_terms(zs, zt, yy, "sampled", temperature=tau)[0]
  expected = _enumerated_grad(ours, z, zt, ps)
  np.testing.assert_allclose(expected, exact, rtol=1e-4, atol=1e-6)
  assert np.abs(exact).max() > 1e-2
  # A y-independent baseline changes the per-sample gradient but not its expectation.
  with_b = lambda zs, zt, yy: opd.opd_token_terms(
    zs, zt, yy, "sampled", temperature=tau, baseline_C=jnp.full((V,), 0.7)
  )[0]
  np.testing.assert_allclose(_enumerated_grad(with_b, z, zt, ps), exact, rtol=1e-4, atol=1e-6)

  # Same through the chunked stream path: one row per possible sample y, weighted by p_s(y).
  h0, ht0 = hs[0], ht[0]

  def stream(h0):
    out = opd.opd_stream_loss(
      jnp.tile(h0[None], (V, 1)),
      Ws,
      jnp.tile(ht0[None], (V, 1)),
      Wt,
      jnp.arange(V),
      "sampled",
      chunk=4,
      temperature=tau,
      weights_N=ps,
      baseline_N=jnp.full((V,), -0.3),
    )
    return out.loss_sum

  value, grad = jax.jit(jax.value_and_grad(stream))(h0)
  np.testing.assert_allclose(grad, Ws @ exact, rtol=1e-4, atol=1e-6)
  # The reported value is the unbiased KL estimate l(y): its expectation is the exact KL.
  np.testing.assert_allclose(value, full_kl(z), rtol=1e-5)

  # The reference's estimator (docs/method.md#sampled-kl-gradient): l = log p_s(y) - sg(log p_t(y)),
  # gradient d log p_s(y).
  def reference(zs, zt, yy):
    ls, lt = jax.nn.log_softmax(zs / tau), jax.lax.stop_gradient(jax.nn.log_softmax(zt / tau))
    return (jnp.take_along_axis(ls, yy[:, None], -1) - jnp.take_along_axis(lt, yy[:, None], -1))[:, 0]

  # Its expected gradient under exact on-policy sampling is sum_y grad p_s(y) = 0: it learns nothing ...
  np.testing.assert_allclose(_enumerated_grad(reference, z, zt, ps), 0.0, atol=1e-6)
  # ... and under a truncated sampler (top-3 of p_s, renormalised) it is non-zero but identical for
  # two different teachers: it ignores the teacher.
  q = np.zeros(V)
  top3 = np.argsort(-np.asarray(ps))[:3]
  q[top3] = np.asarray(ps)[top3] / np.asarray(ps)[top3].sum()
  g1 = _enumerated_grad(reference, z, zt, jnp.asarray(q))
  g2 = _enumerated_grad(reference, z, -zt, jnp.asarray(q))
  np.testing.assert_allclose(g1, g2, atol=1e-7)
  assert np.abs(g1).max() > 1e-2


def test_sampled_target_expectation_is_overlap():
  """8.8: E_{y~p_s}[min(1, p_t(y)/p_s(y))] = sum_y min(p_s, p_t) = 1 - TV."""
  hs, Ws, ht, Wt, _ = _setup(3)
  zs, zt = hs @ Ws, ht @ Wt
  rows = jnp.repeat(jnp.arange(N), V)  # every (token, y) pair in one call
  y_all = jnp.tile(jnp.arange(V), N)
  terms = jax.jit(lambda a, b, c: opd.opd_token_terms(a, b, c, "sampled", temperature=TAU))
  t_all = np.asarray(terms(zs[rows], zt[rows], y_all)[2]).reshape(N, V)
  ps, pt = jax.nn.softmax(zs / TAU, -1), jax.nn.softmax(zt / TAU, -1)
  np.testing.assert_allclose((np.asarray(ps) * t_all).sum(-1), np.minimum(ps, pt).sum(-1), rtol=1e-5)


def test_pad_fill_uses_student_argmax_without_gradient():
  hs, Ws, ht, Wt, y = _setup(4)
  labels = jnp.array([3, IGN, IGN, 5, IGN, 2])
  fill = jnp.array([False, True, False, False, True, False])
  w = losses.normalisation_weights(opd.stream_valid(labels, fill), "batch")
  out, (g1, *_) = _run(hs, Ws, ht, Wt, labels, fill, w, mode="sampled")
  argmax = np.asarray(jnp.argmax(hs @ Ws, -1))
  np.testing.assert_array_equal(out.labels, [3, argmax[1], IGN, 5, argmax[4], 2])
  np.testing.assert_array_equal(out.valid, [True, True, False, True, True, True])
  assert float(out.n_valid) == 5
  assert float(out.loss_tok[2]) == 0.0 and float(out.conf_target[2]) == 0.0
  # Same loss and gradient as with the argmax labels given explicitly (the fill is label-only).
  explicit, (g2, *_) = _run(hs, Ws, ht, Wt, out.labels, jnp.zeros(N, bool), w, mode="sampled")
  np.testing.assert_allclose(out.loss_sum, explicit.loss_sum, rtol=1e-6)
  np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-7)
  # Mean KL over valid tokens, by hand.
  np.testing.assert_allclose(losses.safe_mean(out.kl_sum, out.n_valid), np.asarray(out.kl_tok).sum() / 5, rtol=1e-6)


def test_no_valid_position_gives_zero_loss_and_zero_grad():
  hs, Ws, ht, Wt, _ = _setup(5)
  labels = jnp.full((N,), IGN, jnp.int32)
  for mode in opd.MODES:
    out, (g, *_) = _run(hs, Ws, ht, Wt, labels, mode=mode, beta=0.5)
    assert float(losses.safe_mean(out.loss_sum, out.n_valid)) == 0.0
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) == 0)


def test_bad_mode_raises():
  hs, Ws, ht, Wt, y = _setup()
  with pytest.raises(ValueError, match="divergence"):
    opd.opd_stream_loss(hs, Ws, ht, Wt, y, "forward", chunk=4)


def test_compiled_memory_scales_with_chunk():
  """The topk step (student + teacher logits, top-k, union) stays O(chunk x V), not O(T x V)."""
  t, v, d = 8192, 4096, 64
  S = jax.ShapeDtypeStruct
  args = (
    S((t, d), jnp.float32),
    S((d, v), jnp.float32),
    S((t, d), jnp.float32),
    S((d, v), jnp.float32),
    S((t,), jnp.int32),
  )

  def temp(chunk):
    f = jax.grad(lambda hs, Ws, ht, Wt, y: opd.opd_stream_loss(hs, Ws, ht, Wt, y, "topk", chunk=chunk).loss_sum, (0, 1))
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

  m128, m256, m512 = temp(128), temp(256), temp(512)
  print(f"\nOPD topk temp bytes (T={t}, V={v}): chunk128={m128:,} 256={m256:,} 512={m512:,} (T*V*4={t * v * 4:,})")
  # Linear in the chunk: doubling it twice adds twice the bytes the first doubling added, a few [C, V] fp32
  # blocks per chunk row; what does not grow with the chunk is O(T x D), far below one [T, V] logits array.
  assert 1.7 < (m512 - m256) / (m256 - m128) < 2.3
  assert (m512 - m128) < 6 * (512 - 128) * v * 4
  assert m128 < t * v * 4 / 8
