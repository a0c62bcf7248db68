"""Trainable/frozen partition, AdamW + warmup-cosine, gradient accumulation and the train state.

Partitioning. `trainable_mask` marks leaves of the params tree by '/'-joined path prefixes
(`TrainConfig.trainable`, e.g. "mtp/fc" matches "mtp/fc/kernel" but not "mtp/fc2/kernel"), by
`full_finetune` (everything but `backbone/embed_tokens` and `backbone/lm_head`), and, with LoRA,
every adapter under the top-level `lora` key (see `models/lora.py`). `partition` then splits the tree
into two *sparse* nested dicts with disjoint leaves; the optimizer is built over the trainable one
only, so its state has no slot, not even an empty one, for a frozen parameter. `combine` merges them
back for the forward pass.

Gradient accumulation is an explicit `lax.scan` over k micro-batches inside the one jitted step
(chosen over `optax.MultiSteps`): one host call and one checkpointable step per optimizer update, no
persistent accumulator in the optimizer state, and the schedule counts optimizer steps. It is
token-weighted (as MaxText and Tunix do): a loss function with a `denominators(batch)` attribute (every
loss of `objectives` and `opd.loss`) reports each term's denominator (valid tokens of a stream, or rows
for a per-sample mean); the step adds them up over the k micro-batches first, then every micro-batch
divides by those step totals, so the micro-batch losses and gradients (summed in fp32) are exactly those
of one batch holding all the sequences, whatever their lengths; clipping then sees the big batch's norm.
A plain `loss_fn(params, batch, rng)` without it is taken as a mean, and micro-batch means are averaged
(exact only for micro-batches of equal weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from pipo_jax import guards
from pipo_jax.models.lora import LORA_KEY

Params = dict
FROZEN_ALWAYS = ("backbone/embed_tokens", "backbone/lm_head")


# ----------------------------------------------------------------------------------------------
# Masks and partitions (params are nested dicts; anything that is not a dict is a leaf)
# ----------------------------------------------------------------------------------------------


def _map_with_path(fn, tree: Params, path=()):
  return {
    k: _map_with_path(fn, v, path + (k,)) if isinstance(v, dict) else fn("/".join(path + (k,)), v)
    for k, v in tree.items()
  }


def _matches(path: str, prefix: str) -> bool:
  prefix = prefix.strip("/")
  return path == prefix or path.startswith(prefix + "/")


def trainable_mask(params: Params, train_cfg, lora_active: bool) -> Params:
  """Bool tree like `params`: True where the leaf is trained.

  Raises ValueError for prefixes in `train_cfg.trainable` that match no leaf, for full fine-tuning
  combined with LoRA, and when `lora_active` disagrees with the presence of `params['lora']`.
  """
  has_lora = LORA_KEY in params
  if lora_active and not has_lora:
    raise ValueError(f"LoRA is active but the params tree has no {LORA_KEY!r} subtree (run lora.init_lora)")
  if has_lora and not lora_active:
    raise ValueError(f"params hold a {LORA_KEY!r} subtree but LoRA is not active (lora.rank=0)")
  if lora_active and train_cfg.full_finetune:
    raise ValueError("train.full_finetune=True and lora.rank>0 contradict each other: pick one")
  prefixes = tuple(train_cfg.trainable)
  used = set()

  def leaf(path, _):
    if path == LORA_KEY or path.startswith(LORA_KEY + "/"):
      return True
    hit = [p for p in prefixes if _matches(path, p)]
    used.update(hit)
    if train_cfg.full_finetune:
      return not any(_matches(path, p) for p in FROZEN_ALWAYS)
    return bool(hit)

  mask = _map_with_path(leaf, params)
  unused = [p for p in prefixes if p not in used]
  if unused:
    raise ValueError(
      f"train.trainable prefixes match no parameter: {unused}. Top-level keys are "
      f"{sorted(params)}; paths look like 'mtp/fc/kernel'."
    )
  return mask


def partition(tree: Params, mask: Params) -> tuple[Params, Params]:
  """(trainable, frozen): two sparse nested dicts holding the leaves where mask is True / False.

  Works on any tree shaped like the params (arrays, shardings, ShapeDtypeStructs, logical axes).
  Subtrees left empty are dropped.
  """
  train, frozen = {}, {}
  for k, v in tree.items():
    m = mask[k]
    if isinstance(v, dict):
      t, f = partition(v, m)
      if t:
        train[k] = t
      if f:
        frozen[k] = f
    elif m:
      train[k] = v
    else:
      frozen[k] = v
  return train, frozen


def combine(a: Params, b: Params) -> Params:
  """Inverse of `partition`: the union of two trees with disjoint leaves."""
  out = dict(a)
  for k, v in b.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = combine(out[k], v)
    else:
      raise ValueError(f"combine: key {k!r} is a leaf in both trees")
  return out


def count_params(tree: Params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Schedule and optimizer
# ----------------------------------------------------------------------------------------------


def warmup_steps(optim_cfg, total_steps: int) -> int:
  """ceil(warmup_ratio * total), as HF's `TrainingArguments.get_warmup_steps` does."""
  return int(math.ceil(optim_cfg.warmup_ratio * total_steps))


def make_schedule(optim_cfg, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """lr(step) for optimizer step indices 0, 1, ...: HF `cosine_with_min_lr` with linear warmup.

  step < W:  lr = peak * step / W            (so the first update uses lr 0, as in HF)
  step >= W: lr = peak * (m + (1 - m) * 0.5 * (1 + cos(pi * min(1, (step - W) / max(1, N - W)))))
  with W = warmup steps, N = total_steps, m = min_lr_ratio.
  """
  peak = float(optim_cfg.learning_rate)
  m = float(optim_cfg.min_lr_ratio)
  w = warmup_steps(optim_cfg, total_steps)
  decay = max(1, total_steps - w)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(1, w)
    progress = jnp.clip((step - w) / decay, 0.0, 1.0)
    cos = peak * (m + (1.0 - m) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return jnp.where(step < w, warm, cos)

  return schedule


def decay_mask(params: Params) -> Params:
  """Weight decay only on matrices (>= 2-D): not on norms scales, biases or other vectors."""
  return jax.tree_util.tree_map(lambda x: len(x.shape) >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decoupled decay, lr-scaled like torch.optim.AdamW)."""
  adamw = optax.adamw(
    make_schedule(optim_cfg, total_steps),
    b1=optim_cfg.b1,
    b2=optim_cfg.b2,
    eps=optim_cfg.eps,
    weight_decay=optim_cfg.weight_decay,
    mask=decay_mask,
  )
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), adamw)
  return adamw


# ----------------------------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """step: int32 []; trainable/frozen: disjoint sparse params trees; rng: PRNGKey uint32 [2]."""

  step: jax.Array
  trainable: Params
  frozen: Params
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Params, mask: Params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    trainable, frozen = partition(params, mask)
    return cls(
      step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable), rng=rng, tx=tx
    )

  @property
  def params(self) -> Params:
    return combine(self.trainable, self.frozen)

  def apply_gradients(self, grads: Params, rng: jax.Array | None = None) -> TrainState:
    """One optimizer update from gradients shaped like `trainable`; frozen leaves pass through."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.trainable)
    trainable = optax.apply_updates(self.trainable, updates)
    return self.replace(
      step=self.step + 1, trainable=trainable, opt_state=opt_state, rng=self.rng if rng is None else rng
    )


LossFn = Callable[..., tuple[jax.Array, dict]]


def step_denominators(loss_fn: LossFn, batch: Any, accum_steps: int) -> dict | None:
  """The denominators of the whole step (summed over micro-batches), or None for a plain mean loss."""
  fn = getattr(loss_fn, "denominators", None)
  if fn is None:
    return None
  if accum_steps == 1:
    return fn(batch)
  return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), jax.vmap(fn)(batch))


def accumulate_gradients(
  loss_fn: LossFn, trainable: Params, frozen: Params, batch: Any, rng: jax.Array, accum_steps: int, extra: tuple = ()
) -> tuple[Params, jax.Array, dict]:
  """Gradient (w.r.t. `trainable`), loss and metrics of one optimizer step over k micro-batches.

  `loss_fn` sees the combined params tree. Two kinds (module docstring):
    * token-weighted: `loss_fn(params, batch, rng, denominators, *extra) -> (loss, metrics)` with attributes
      `denominators(batch) -> {name: fp32 scalar}` and `additive` (metric names that are sums over
      micro-batches: the loss terms, token counts); loss, gradient and additive metrics are summed over
      micro-batches, the other metrics (ratios such as calibration) averaged;
    * plain: `loss_fn(params, batch, rng, *extra) -> (mean loss, metrics)`: everything averaged.
  With accum_steps == 1, `batch` is one micro-batch; with k > 1 every batch leaf has a leading axis of
  size k (micro-batch i is `batch[i]`, rng `fold_in(rng, i)`).
  """
  denoms = step_denominators(loss_fn, batch, accum_steps)
  if denoms is None:
    call, additive, scale = (lambda p, mb, key: loss_fn(p, mb, key, *extra)), frozenset(), 1.0 / accum_steps
  else:
    call, additive, scale = (lambda p, mb, key: loss_fn(p, mb, key, denoms, *extra)), frozenset(loss_fn.additive), 1.0

  def micro(tr, mb, key):
    return call(combine(tr, frozen), mb, key)

  grad_fn = jax.value_and_grad(micro, has_aux=True)
  if accum_steps == 1:
    (loss, metrics), grads = grad_fn(trainable, batch, jax.random.fold_in(rng, 0))
    return grads, loss, metrics

  def body(acc, xs):
    i, mb = xs
    (loss, metrics), g = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
    acc = jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), acc, g)
    return acc, (loss, metrics)

  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
  acc, (losses, metrics) = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), batch))
  grads = jax.tree_util.tree_map(lambda a, p: (a * scale).astype(p.dtype), acc, trainable)
  metrics = {k: (v.sum(0) if k in additive else v.mean(0)) for k, v in metrics.items()}
  return grads, losses.sum() * scale, metrics


def make_train_step(loss_fn: LossFn, accum_steps: int = 1, schedule: Callable | None = None):
  """`step(state, batch, *extra) -> (state, metrics)`, to be wrapped in `jax.jit(..., donate_argnums=0)`.

  extra: step inputs that are not batch rows (OPD: the frozen teacher's LM head), passed to loss_fn after
  the batch arguments. metrics: loss, grad_norm (global norm before clipping), nonfinite (1 when the step was
  skipped because loss or grad_norm is not finite: see `guards.keep_if_finite`) and, given the schedule,
  learning_rate (the rate this update used), plus loss_fn's own metrics (see `accumulate_gradients`).
  """
  if accum_steps < 1:
    raise ValueError(f"optim.grad_accum_steps={accum_steps}: must be >= 1")

  def step(state: TrainState, batch, *extra):
    rng, step_rng = jax.random.split(state.rng)
    grads, loss, metrics = accumulate_gradients(
      loss_fn, state.trainable, state.frozen, batch, step_rng, accum_steps, extra
    )
    out = dict(metrics)
    out["loss"] = loss
    out["grad_norm"] = optax.tree.norm(grads)
    if schedule is not None:
      out["learning_rate"] = schedule(state.step)
    # The one place where the update is decided, for every mode: a step whose loss or gradient norm is not
    # finite leaves the state as it was (the trainer counts these and stops after train.max_nonfinite_steps).
    new_state, out["nonfinite"] = guards.keep_if_finite(
      state, state.apply_gradients(grads, rng=rng), loss, out["grad_norm"]
    )
    return new_state, out

  return step
