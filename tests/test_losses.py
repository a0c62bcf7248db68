"""Chunked cross entropy, normalisation, confidence BCE and metrics against dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax import losses

IGN = losses.IGNORE_INDEX
# Jitted once per (shapes, chunk): eager calls would dispatch every op separately, which is slow.
_ce = jax.jit(losses.chunked_cross_entropy, static_argnames=("chunk",))


def _data(n=10, d=6, v=11, seed=0, n_ignored=3):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  h = jax.random.normal(k[0], (n, d), jnp.float32)
  W = jax.random.normal(k[1], (d, v), jnp.float32) * 0.5
  y = np.array(jax.random.randint(k[2], (n,), 0, v))
  y[:n_ignored] = IGN
  return h, W, jnp.asarray(y)


def _dense_ce_sum(h, W, y, w=None):
  """Unchunked reference: full [N, V] logits."""
  logp = jax.nn.log_softmax(h @ W, axis=-1)
  valid = y != IGN
  gold = jnp.take_along_axis(logp, jnp.where(valid, y, 0)[:, None], axis=-1)[:, 0]
  w = jnp.ones_like(gold) if w is None else w
  return -jnp.sum(jnp.where(valid, gold, 0.0) * w), gold


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_chunked_ce_matches_dense_value_and_grad(chunk):
  h, W, y = _data()
  f = jax.jit(jax.value_and_grad(lambda h, W: losses.chunked_cross_entropy(h, W, y, chunk)[0], (0, 1)))
  g = jax.jit(jax.value_and_grad(lambda h, W: _dense_ce_sum(h, W, y)[0], (0, 1)))
  (vf, gf), (vg, gg) = f(h, W), g(h, W)
  np.testing.assert_allclose(vf, vg, rtol=1e-6, atol=1e-5)
  for a, b in zip(gf, gg):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  _, n_valid, gold = _ce(h, W, y, chunk=chunk)
  assert float(n_valid) == 7.0
  ref_gold = np.where(np.asarray(y) != IGN, np.asarray(_dense_ce_sum(h, W, y)[1]), 0.0)
  np.testing.assert_allclose(gold, ref_gold, rtol=1e-6, atol=1e-6)


def test_chunked_ce_gradient_of_the_weights_and_in_bf16():
  """d sum / d w = -log p(label) (what autodiff of the dense reference gives); bf16 inputs give the fp32
  gradients to bf16 precision."""
  h, W, y = _data()
  w = jnp.linspace(0.5, 1.5, 10)
  gw = jax.jit(jax.grad(lambda w: losses.chunked_cross_entropy(h, W, y, 3, weights_N=w)[0]))(w)
  gw_ref = jax.grad(lambda w: _dense_ce_sum(h, W, y, w)[0])(w)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-6)

  def grads(h, W):
    return jax.jit(jax.grad(lambda h, W: losses.chunked_cross_entropy(h, W, y, 4)[0], (0, 1)))(h, W)

  g32 = grads(h, W)
  g16 = grads(h.astype(jnp.bfloat16), W.astype(jnp.bfloat16))
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.02 * float(jnp.abs(b).max()))


def _count_dots(jaxpr) -> int:
  """dot_general equations of a jaxpr and every jaxpr nested in it (scan bodies, custom_vjp rules)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _count_dots(inner)
  return n


def test_chunked_ce_forms_gradients_in_one_pass_and_skips_a_frozen_head():
  """The differentiated loss runs one chunk loop: logits, dh and (only when W is differentiated) dW, i.e. 3 or 2
  matmuls, where autodiff through the rematerialised chunk (scan_token_chunks) runs the logits twice."""
  h, W, y = _data()
  both = jax.make_jaxpr(jax.grad(lambda h, W: losses.chunked_cross_entropy(h, W, y, 4)[0], (0, 1)))(h, W)
  h_only = jax.make_jaxpr(jax.grad(lambda h: losses.chunked_cross_entropy(h, W, y, 4)[0]))(h)
  assert (_count_dots(both.jaxpr), _count_dots(h_only.jaxpr)) == (3, 2)
  gh = jax.jit(jax.grad(lambda h: losses.chunked_cross_entropy(h, W, y, 4)[0]))(h)
  np.testing.assert_allclose(gh, jax.grad(lambda h: _dense_ce_sum(h, W, y)[0])(h), rtol=1e-5, atol=1e-6)


def test_chunked_ce_batched_shapes_and_weights():
  h, W, y = _data(n=12)
  h_BTD, y_BT = h.reshape(3, 4, -1), y.reshape(3, 4)
  w_BT = losses.normalisation_weights(y_BT != IGN, "sample")
  s, n, gold = _ce(h_BTD, W, y_BT, chunk=5, weights_N=w_BT)
  assert gold.shape == (3, 4) and float(n) == 9.0
  # Per-sample mean of per-row token means, by hand: row 0 has 1 valid token, rows 1-2 have 4.
  _, dense_gold = _dense_ce_sum(h, W, y)
  nll = -np.asarray(dense_gold).reshape(3, 4)
  valid = np.asarray(y_BT) != IGN
  expected = np.mean([nll[b][valid[b]].mean() for b in range(3)])
  np.testing.assert_allclose(s, expected, rtol=1e-6)
  # Batch normalisation = plain mean over all valid tokens.
  mean, _, _ = jax.jit(losses.cross_entropy_mean, static_argnums=(3, 4))(h_BTD, W, y_BT, 5, "batch")
  np.testing.assert_allclose(mean, nll[valid].mean(), rtol=1e-6)


def test_zero_valid_gives_zero_and_finite_grads():
  h, W, _ = _data()
  y = jnp.full((10,), IGN)

  def f(h, W):
    s, n, _ = losses.chunked_cross_entropy(h, W, y, 4)
    return losses.safe_mean(s, n)

  val, (gh, gW) = jax.jit(jax.value_and_grad(f, (0, 1)))(h, W)
  assert float(val) == 0.0
  assert np.all(np.asarray(gh) == 0) and np.all(np.asarray(gW) == 0)
  w = losses.normalisation_weights(y.reshape(2, 5) != IGN, "sample")
  assert np.all(np.asarray(w) == 0)


def test_bf16_inputs_compute_in_fp32():
  h, W, y = _data()
  s32 = _ce(h, W, y, chunk=4)[0]
  s16, _, gold = _ce(h.astype(jnp.bfloat16), W.astype(jnp.bfloat16), y, chunk=4)
  assert s16.dtype == jnp.float32 and gold.dtype == jnp.float32
  np.testing.assert_allclose(s16, s32, rtol=2e-2)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_scales_with_chunk_not_tokens_times_vocab():
  t, v, d = 4096, 4096, 64
  h = jax.ShapeDtypeStruct((t, d), jnp.float32)
  W = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jax.ShapeDtypeStruct((t,), jnp.int32)

  def step(chunk):
    return jax.grad(lambda h, W, y: losses.chunked_cross_entropy(h, W, y, chunk)[0], (0, 1))

  dense = jax.grad(lambda h, W, y: _dense_ce_sum(h, W, y)[0], (0, 1))
  m128, m512, mdense = _temp_bytes(step(128), h, W, y), _temp_bytes(step(512), h, W, y), _temp_bytes(dense, h, W, y)
  full_logits = t * v * 4
  print(
    f"\ntemp bytes (T=V={t}, D={d}): chunk128={m128:,} chunk512={m512:,} unchunked={mdense:,} (T*V*4={full_logits:,})"
  )
  assert m128 < m512 < mdense
  assert mdense >= full_logits  # the dense reference really holds [T, V] logits
  # O(chunk x V): at most a few [chunk, V] fp32 blocks (forward logits + their cotangent) plus
  # W-sized accumulators, independent of T.
  for chunk, m in ((128, m128), (512, m512)):
    assert m < 3 * chunk * v * 4 + 4 * d * v * 4, (chunk, m)
  assert m128 < full_logits / 8


# ----------------------------------------------------------------------------------
# Confidence
# ----------------------------------------------------------------------------------


def test_confidence_bce_matches_formula_and_masks():
  a = jnp.array([2.0, -1.0, 0.5, 30.0, jnp.nan])
  t = jnp.array([0.9, 0.1, 1.0, 0.0, 0.5])
  m = jnp.array([True, True, True, True, False])
  p = 1 / (1 + np.exp(-np.asarray(a[:4], np.float64)))
  tt = np.asarray(t[:4], np.float64)
  ref = -(tt * np.log(p) + (1 - tt) * np.log1p(-p))
  ref[3] = 30.0  # -log(1 - sigmoid(30)) = 30 + log(1 + e^-30)
  np.testing.assert_allclose(losses.confidence_bce(a, t, m), ref.mean(), rtol=1e-5)
  ga = jax.grad(lambda a: losses.confidence_bce(a, t, m))(a)
  np.testing.assert_allclose(ga[:4], (p - np.asarray(t[:4])) / 4, rtol=1e-5, atol=1e-7)
  assert float(ga[4]) == 0.0  # masked NaN logit does not poison the gradient
  assert float(losses.confidence_bce(a, t, jnp.zeros(5, bool))) == 0.0


def test_confidence_loss_sends_no_gradient_into_hidden_states():
  """SFT path: target from the MTP CE pass, head on detached inputs -> d loss / d hidden = 0."""
  h, W, y = _data()
  k = jax.random.PRNGKey(7)
  head = {"w": jax.random.normal(k, (6,)), "b": jnp.array(0.1)}

  def conf_loss(head, h):
    _, _, gold = losses.chunked_cross_entropy(h, W, y, 4)
    target = losses.sft_confidence_target(gold)
    logit = jax.lax.stop_gradient(h) @ head["w"] + head["b"]  # conf_detach_inputs=True
    return losses.confidence_bce(logit, target, y != IGN)

  g_head, g_h = jax.jit(jax.grad(conf_loss, (0, 1)))(head, h)
  assert np.all(np.asarray(g_h) == 0.0)
  assert float(jnp.abs(g_head["w"]).sum()) > 1e-3

  # Even with undetached inputs, the target path carries no gradient: only the head path does.
  def conf_loss_attached(h):
    _, _, gold = losses.chunked_cross_entropy(h, W, y, 4)
    return losses.confidence_bce(h @ head["w"], losses.sft_confidence_target(gold), y != IGN)

  def through_logit_only(h):
    _, _, gold = losses.chunked_cross_entropy(h, W, y, 4)
    return losses.confidence_bce(h @ head["w"], jax.lax.stop_gradient(losses.sft_confidence_target(gold)), y != IGN)

  np.testing.assert_array_equal(jax.jit(jax.grad(conf_loss_attached))(h), jax.jit(jax.grad(through_logit_only))(h))


def test_sft_confidence_target_is_gold_probability():
  h, W, y = _data()
  _, _, gold = _ce(h, W, y, chunk=4)
  p = jax.nn.softmax(h @ W, axis=-1)
  yv = np.asarray(y)
  expected = np.array([p[i, yv[i]] if yv[i] != IGN else 1.0 for i in range(10)])
  np.testing.assert_allclose(losses.sft_confidence_target(gold), expected, rtol=1e-6)


def test_confidence_metrics_hand_example():
  c = jnp.array([0.05, 0.15, 0.12, 0.96, 0.99, 1.0, 0.5])
  t = jnp.array([0.0, 0.3, 0.1, 1.0, 0.8, 0.9, 0.2])
  m = jnp.array([True, True, True, True, True, True, False])
  out = losses.confidence_metrics(c, t, m, threshold=0.95)
  # bins: [0,.1): {0.05 | 0.0}; [.1,.2): {0.15, 0.12 | 0.3, 0.1}; [.9,1]: {0.96, 0.99, 1.0 | 1.0, 0.8, 0.9}
  ece = (1 * 0.05 + 2 * abs(0.135 - 0.2) + 3 * abs(0.98333333 - 0.9)) / 6
  np.testing.assert_allclose(out["ece"], ece, rtol=1e-5)
  np.testing.assert_allclose(out["mean_pred"], np.mean(c[:6]), rtol=1e-6)
  np.testing.assert_allclose(out["mean_target"], np.mean(t[:6]), rtol=1e-6)
  np.testing.assert_allclose(out["kept_rate"], 3 / 6, rtol=1e-6)
  np.testing.assert_allclose(out["kept_rejected_rate"], (0.0 + 0.2 + 0.1) / 3, rtol=1e-5)
  none = losses.confidence_metrics(c, t, m, threshold=1.01)
  assert float(none["kept_rejected_rate"]) == 0.0 and float(none["kept_rate"]) == 0.0
