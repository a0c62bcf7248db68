"""Matmul-only unit-lower-triangular solve (models/triangular.py) against float64 numpy and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.models import triangular


def _delta_rule_like_system(rng, n, decay_scale, batch=(2, 3)):
  """A = strict_lower(beta_i k_i.k_j e^(gam_i - gam_j)) as in the chunked delta rule, with correlated keys
  (a shared component) so that (I + A)^-1 has large entries and an unstable method would show it."""
  k = rng.normal(size=batch + (n, 32))
  k[..., :4] += 3.0
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  beta = 1.0 / (1.0 + np.exp(-rng.normal(size=batch + (n,))))
  gam = np.cumsum(-np.abs(rng.normal(size=batch + (n,))) * decay_scale, axis=-1)
  i = np.arange(n)
  strict = i[:, None] > i[None, :]
  decay = np.exp(np.where(strict, gam[..., :, None] - gam[..., None, :], -np.inf))
  a = np.where(strict, beta[..., :, None] * np.einsum("...ik,...jk->...ij", k, k) * decay, 0.0)
  return a, rng.normal(size=batch + (n, 8))


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("decay_scale", [0.0, 0.05, 1.0])
def test_solve_matches_float64_numpy(n, decay_scale):
  a, b = _delta_rule_like_system(np.random.default_rng(n), n, decay_scale)
  expected = np.linalg.solve(np.eye(n) + a, b)
  got = triangular.unit_lower_solve(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  # LAPACK's float32 trsm reaches 1.4e-6 on the hardest of these systems (solution scale ~5).
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6, rtol=0)


def test_inverse_ignores_diagonal_and_upper_part():
  a, _ = _delta_rule_like_system(np.random.default_rng(0), 20, 0.05, batch=())
  junk = a + np.triu(np.random.default_rng(1).normal(size=(20, 20)))
  inv = triangular.unit_lower_inverse(jnp.asarray(junk, jnp.float32))
  np.testing.assert_allclose(np.asarray(inv), np.linalg.inv(np.eye(20) + a), atol=2e-6, rtol=0)


def test_custom_gradient_equals_autodiff_of_the_forward():
  """The closed-form backward (dB = T^T dX, dA = -strict_lower(dB X^T)) against reverse-mode autodiff
  through the plain matmul forward, for a loss that weights every output entry differently."""
  a_np, b_np = _delta_rule_like_system(np.random.default_rng(3), 40, 0.05)
  a, b = jnp.asarray(a_np, jnp.float32), jnp.asarray(b_np, jnp.float32)
  weights = jnp.asarray(np.random.default_rng(4).normal(size=b.shape), jnp.float32)

  def plain_solve(a, b):
    return jnp.einsum("...ij,...jk->...ik", triangular.unit_lower_inverse(a), b, precision=jax.lax.Precision.HIGHEST)

  def loss(solve):
    return lambda a, b: jnp.sum(jnp.sin(solve(a, b)) * weights)

  da, db = jax.grad(loss(triangular.unit_lower_solve), argnums=(0, 1))(a, b)
  da_ref, db_ref = jax.grad(loss(plain_solve), argnums=(0, 1))(a, b)
  np.testing.assert_allclose(np.asarray(db), np.asarray(db_ref), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(da), np.asarray(da_ref), atol=2e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(jnp.triu(da)))) == 0.0  # no gradient into the ignored part
