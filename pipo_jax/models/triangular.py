"""Unit-lower-triangular solves from matmuls only, for the chunked delta rule.

Why not `jax.lax.linalg.triangular_solve`: on CPU (jaxlib 0.10.2) it lowers to a LAPACK FFI custom call that
splits its batch over XLA's intra-op thread pool and then blocks until those tasks finish. When two such calls
run concurrently (the thunk executor schedules independent ops in parallel: the teacher and student forwards
of an OPD step, or two layers' backward solves), each occupies one worker of a 2-thread pool and waits for
tasks that no free worker will ever run: the process stops for good (gdb: both `tf_XLAEigen` threads in
`jax::ParallelBatchMap` -> `BlockingCounter::Wait`, the host in `block_until_ready`). Blocked inversion
below is plain matmuls, as accurate as LAPACK's trsm here (tests/test_triangular.py), and maps onto the
MXU on TPU.

Axis vocabulary: `...` any batch axes, n the matrix size, R right-hand-side columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
# Diagonal blocks up to this size are inverted row by row (forward substitution); larger ones are split in
# halves: inv([[A11, 0], [A21, A22]]) = [[T11, 0], [-T22 A21 T11, T22]].
_ROW_BY_ROW_MAX = 16


def _matmul(a, b):
  return jnp.einsum("...ij,...jk->...ik", a, b, precision=_HI)


def unit_lower_inverse(strict_lower_nn: jax.Array) -> jax.Array:
  """(I + A)^-1 for A strictly lower triangular (entries on and above the diagonal are ignored)."""
  return _inverse_of_strict_lower(jnp.tril(strict_lower_nn, k=-1))


def _inverse_of_strict_lower(a: jax.Array) -> jax.Array:
  """`unit_lower_inverse` for an `a` already zero on and above the diagonal (so are its diagonal blocks)."""
  n = a.shape[-1]
  if n <= _ROW_BY_ROW_MAX:
    eye = jnp.eye(n, dtype=a.dtype)
    inv = jnp.broadcast_to(eye, a.shape)
    for i in range(1, n):  # row i of (I + A) T = I: T_i = e_i - sum_{j<i} A_ij T_j (rows j >= i of A_i are 0)
      inv = inv.at[..., i, :].set(eye[i] - jnp.einsum("...j,...jk->...k", a[..., i, :], inv, precision=_HI))
    return inv
  h = n // 2
  if 2 * h == n:  # equal halves: invert both in one batched call (half the traced ops)
    both = _inverse_of_strict_lower(jnp.stack([a[..., :h, :h], a[..., h:, h:]]))
    t11, t22 = both[0], both[1]
  else:
    t11, t22 = _inverse_of_strict_lower(a[..., :h, :h]), _inverse_of_strict_lower(a[..., h:, h:])
  t21 = -_matmul(t22, _matmul(a[..., h:, :h], t11))
  top = jnp.concatenate([t11, jnp.zeros(t11.shape[:-1] + (n - h,), a.dtype)], axis=-1)
  return jnp.concatenate([top, jnp.concatenate([t21, t22], axis=-1)], axis=-2)


@jax.custom_vjp
def unit_lower_solve(strict_lower_nn: jax.Array, rhs_nR: jax.Array) -> jax.Array:
  """X = (I + A)^-1 B for A strictly lower triangular (the diagonal and above are ignored)."""
  return _matmul(unit_lower_inverse(strict_lower_nn), rhs_nR)


def _solve_fwd(strict_lower_nn, rhs_nR):
  inv_nn = unit_lower_inverse(strict_lower_nn)
  x_nR = _matmul(inv_nn, rhs_nR)
  return x_nR, (inv_nn, x_nR)


def _solve_bwd(residuals, dx_nR):
  # X = T B with T = (I + A)^-1: dB = T^T dX and dA = -T^T dX X^T = -dB X^T, kept on A's strict lower part.
  # Saving T and X (not the substitution's intermediates) keeps the backward's memory at one n x n per block.
  inv_nn, x_nR = residuals
  drhs_nR = jnp.einsum("...ji,...jk->...ik", inv_nn, dx_nR, precision=_HI)
  da_nn = -jnp.einsum("...ik,...jk->...ij", drhs_nR, x_nR, precision=_HI)
  return jnp.tril(da_nn, k=-1), drhs_nR


unit_lower_solve.defvjp(_solve_fwd, _solve_bwd)
