"""Non-finite guards: a bad step changes nothing, a bad tree is never saved or exported.

`keep_if_finite(old, new, loss, grad_norm)` runs inside the jitted train step of every mode (sft, ar, opd all
go through `optim.make_train_step`): when the step's loss or global gradient norm is NaN / inf, the trainable
params and the optimizer state stay those of `old` (the optimizer's own step count, and with it the LR
schedule, does not advance either, as in `optax.apply_if_finite`), while the step counter and the RNG move on
with the data, so a resumed run stays aligned with its data iterator. The step reports `nonfinite` = 1.

The host side (`NonFiniteCounter`) counts skipped steps (`skipped_nonfinite` in metrics.jsonl and on the
console) and stops the run after `train.max_nonfinite_steps` consecutive ones, without saving: the last
checkpoint on disk is the last good state. `assert_finite` is the check before every save and export.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(RuntimeError):
  """Training stopped (nothing saved) because steps or params were not finite."""


def keep_if_finite(old_state, new_state, loss, grad_norm):
  """(state, nonfinite int32 []) : `new_state`, or `old_state`'s trainable/opt_state when the step is bad.

  Both states are `optim.TrainState`s (any dataclass with `trainable`, `opt_state` and `replace`). Works on
  traced values inside jit; `jnp.where` selects leaf by leaf (no host round trip).
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  pick = lambda n, o: jnp.where(ok, n, o)
  state = new_state.replace(
    trainable=jax.tree_util.tree_map(pick, new_state.trainable, old_state.trainable),
    opt_state=jax.tree_util.tree_map(pick, new_state.opt_state, old_state.opt_state),
  )
  return state, (~ok).astype(jnp.int32)


@jax.jit
def _leaf_finite(tree) -> list:
  return [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]


def nonfinite_leaves(tree: Any) -> list:
  """'/'-joined paths of the floating-point leaves of `tree` holding a NaN or inf (device reduction)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  flat = [(p, x) for p, x in flat if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not flat:
    return []
  ok = jax.device_get(_leaf_finite([x for _, x in flat]))
  return [
    "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
    for (p, _), good in zip(flat, ok)
    if not bool(np.asarray(good))
  ]


def assert_finite(tree: Any, what: str) -> None:
  """Raise NonFiniteError naming (up to 5 of) the non-finite leaves of `tree`."""
  bad = nonfinite_leaves(tree)
  if bad:
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise NonFiniteError(f"{what}: non-finite values in {', '.join(bad[:5])}{more}")


class NonFiniteCounter:
  """Host-side bookkeeping of skipped steps: `update(step, nonfinite)` after each step."""

  def __init__(self, max_consecutive: int):
    if max_consecutive < 1:
      raise ValueError(f"train.max_nonfinite_steps={max_consecutive}: must be >= 1")
    self.max_consecutive = int(max_consecutive)
    self.skipped = 0  # this invocation's total
    self.consecutive = 0

  def update(self, step: int, nonfinite, last_saved=None) -> bool:
    """Count one step; raise NonFiniteError at the limit. Returns whether this step was skipped.
    `last_saved`: the newest checkpoint step (or a callable giving it), for the error message."""
    bad = bool(np.asarray(jax.device_get(nonfinite)))
    if not bad:
      self.consecutive = 0
      return False
    self.skipped += 1
    self.consecutive += 1
    if self.consecutive >= self.max_consecutive:
      last_saved = last_saved() if callable(last_saved) else last_saved
      saved = f"; the newest checkpoint is step {last_saved}" if last_saved is not None else ""
      raise NonFiniteError(
        f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradient norm "
        f"(train.max_nonfinite_steps={self.max_consecutive}); stopping without saving{saved}"
      )
    return True
