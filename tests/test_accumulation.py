"""Token-weighted gradient accumulation: k micro-batches of deliberately unequal token counts give the loss,
gradients, metrics and updated params of ONE un-accumulated step over the same sequences (the reference), for
SFT (both streams and the confidence BCE, each with its own token count), AR (+ native-MTP loss) and OPD
(per-sample means over every rollout of the step). The old rule (a mean of micro-batch means) is computed too,
to show that the micro-batches are unequal enough for it to differ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax import objectives, optim
from pipo_jax.config import (
  FULL,
  LINEAR,
  LoraConfig,
  LossConfig,
  ModelConfig,
  OPDConfig,
  OptimConfig,
  TrainConfig,
  resolve_model_config,
)
from pipo_jax.models.pipo import init_pipo_params

# Compile-heavy: run by name, `pytest -m slow tests/test_accumulation.py`.
pytestmark = pytest.mark.slow

# Two layers (one Gated DeltaNet, one full attention): every kind of layer, half the compile time of `tiny`.
MC = resolve_model_config(ModelConfig(preset="tiny", num_hidden_layers=2, layer_types=(LINEAR, FULL)))
IGN = -100
B, T, K = 4, 32, 2


def _sft_batch(seed=0):
  """4 sequences; micro-batch 0 = rows 0-1 (28 and 26 supervised tokens), micro-batch 1 = rows 2-3 (4 and 2)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, MC.vocab_size, (B, T)).astype(np.int32)
  labels = ids.copy()
  for b, n in enumerate((28, 26, 4, 2)):
    labels[b, : T - n] = IGN  # a long prompt leaves n supervised tokens
  return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}


def _split(batch):
  """[B, ...] -> [K, B / K, ...], micro-batch i = rows i*B/K .. (i+1)*B/K - 1."""
  return jax.tree_util.tree_map(lambda x: x.reshape((K, x.shape[0] // K) + x.shape[1:]), batch)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(loss_fn, params, batch, extra=(), mode="sft"):
  """Accumulated (K micro-batches) vs one batch, through the real train step (clipped AdamW): loss, additive
  metrics, gradient norm and the updated params; plus the old rule (each micro-batch normalised by its own
  counts, micro-batch gradients averaged) against the same reference. Three compiles in all."""
  mask = optim.trainable_mask(params, TrainConfig(full_finetune=True, trainable=()), False)
  rng = jax.random.PRNGKey(0)
  # eps 1e-3: Adam's first update g / (|g| + eps) is then linear in small gradients instead of their sign, so
  # the updated params compare the gradients rather than fp32 noise around zero.
  cfg = OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, grad_clip_norm=100.0, eps=1e-3)
  tx = optim.make_optimizer(cfg, 10)
  state = optim.TrainState.create(params, mask, tx, rng)

  def plain(p, mb, key, *e):
    return loss_fn(p, mb, key, None, *e)

  s_acc, m_acc = jax.jit(optim.make_train_step(loss_fn, K))(state, _split(batch), *extra)
  s_one, m_one = jax.jit(optim.make_train_step(loss_fn, 1))(state, batch, *extra)
  s_old, m_old = jax.jit(optim.make_train_step(plain, K))(state, _split(batch), *extra)

  def param_err(s):  # relative to the update's size (lr * g / (|g| + eps) <= lr)
    return max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / cfg.learning_rate
      for a, b in zip(jax.tree_util.tree_leaves(s.trainable), jax.tree_util.tree_leaves(s_one.trainable))
    )

  errs = {"loss": _rel(m_acc["loss"], m_one["loss"])}
  for k in loss_fn.additive:
    if k in m_one:
      errs[k] = _rel(m_acc[k], m_one[k])
  errs["grad_norm"] = _rel(m_acc["grad_norm"], m_one["grad_norm"])
  errs["params"] = param_err(s_acc)
  old = {"grad_norm": _rel(m_old["grad_norm"], m_one["grad_norm"]), "params": param_err(s_old)}
  print(
    f"\n[{mode}] accumulation vs one batch, max relative error: "
    + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    + f"; the old rule (mean of micro-batch means): grad_norm {old['grad_norm']:.1e}, params {old['params']:.1e}"
  )
  return errs, old


def test_sft_accumulation_equals_one_batch():
  params = init_pipo_params(MC, jax.random.PRNGKey(1))
  loss_fn = objectives.make_sft_loss(MC, LossConfig(logits_chunk=16), LoraConfig())
  errs, old = _compare(loss_fn, params, _sft_batch(), mode="sft")
  for k in ("loss", "loss_backbone", "loss_mtp", "loss_conf", "supervised_tokens", "grad_norm", "params"):
    assert errs[k] < 1e-5, (k, errs)
  assert old["params"] > 1e-2  # the micro-batches are unequal enough for the old rule to differ


def test_ar_accumulation_with_native_mtp_equals_one_batch():
  params = init_pipo_params(MC, jax.random.PRNGKey(2))
  params = {k: params[k] for k in ("backbone", "mtp")}
  loss_fn = objectives.make_ar_loss(MC, LossConfig(logits_chunk=16, native_mtp_weight=1.0), LoraConfig())
  errs, old = _compare(loss_fn, params, _sft_batch(1), mode="ar")
  for k in ("loss", "loss_backbone", "loss_mtp", "grad_norm", "params"):
    assert errs[k] < 1e-5, (k, errs)
  assert old["params"] > 1e-2


def _opd_batch():
  """4 rollouts of very unequal lengths (micro-batch 0: long responses; micro-batch 1: short), encoded as the
  trainer does, rejected drafts included."""
  from pipo_jax.opd import rollout

  rng = np.random.default_rng(3)
  pad, P_ = MC.pad_token_id, 8
  pid = np.full((B, P_), pad, np.int32)
  pvalid = np.zeros((B, P_), bool)
  raw = np.full((B, 24), pad, np.int32)
  lens = (23, 20, 3, 2)
  for b in range(B):
    p = rng.integers(4, 200, 6)
    pid[b, P_ - 6 :] = p
    pvalid[b, P_ - 6 :] = True
    r = rng.integers(4, 200, lens[b])
    r[1::5] = pad  # a rejected draft every few slots (token2 positions)
    raw[b, : lens[b]] = r
  return rollout.encode_rollouts(pid, pvalid, raw, np.asarray(lens), pad, T)


def test_opd_accumulation_equals_one_batch(divergence="topk"):
  from pipo_jax.opd import loss as opd_loss

  teacher_cfg = resolve_model_config(
    ModelConfig(preset="tiny", num_hidden_layers=2, layer_types=(LINEAR, FULL), hidden_size=96, intermediate_size=192)
  )
  teacher = {"backbone": init_pipo_params(teacher_cfg, jax.random.PRNGKey(4))["backbone"]}
  params = init_pipo_params(MC, jax.random.PRNGKey(5))
  batch = {k: jnp.asarray(v) for k, v in _opd_batch().items()}
  batch.update(jax.jit(opd_loss.make_teacher_fn(teacher_cfg))(teacher, batch))
  w_t = opd_loss.teacher_head(teacher_cfg, teacher)
  loss_fn = opd_loss.make_opd_loss(
    MC, teacher_cfg, OPDConfig(divergence=divergence, topk=8), LossConfig(logits_chunk=16), LoraConfig()
  )
  # Per-sample means over micro-batches of equal row counts: here the old rule was already exact.
  errs, _ = _compare(loss_fn, params, batch, extra=(w_t,), mode=f"opd {divergence}")
  for k in ("loss", "loss_backbone", "loss_mtp", "loss_conf", "kl_backbone", "kl_mtp", "grad_norm", "params"):
    assert errs[k] < 1e-5, (k, errs)


def test_stacked_teacher_scores_equal_per_micro_batch():
  """The teacher program on k stacked micro-batches ([k, B, T], as the trainer scores an accumulated step)
  equals scoring each micro-batch alone."""
  from pipo_jax.opd import loss as opd_loss

  teacher = {"backbone": init_pipo_params(MC, jax.random.PRNGKey(6))["backbone"]}
  batch = {k: jnp.asarray(v) for k, v in _opd_batch().items()}
  score = jax.jit(opd_loss.make_teacher_fn(MC))
  stacked = score(teacher, _split(batch))
  for i in range(K):
    alone = score(teacher, jax.tree_util.tree_map(lambda x, i=i: x[i], _split(batch)))
    for k in opd_loss.TEACHER_KEYS:
      np.testing.assert_allclose(stacked[k][i], alone[k], rtol=1e-5, atol=1e-5)
