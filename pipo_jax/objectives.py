"""Training objectives: `loss_fn(params, batch, rng) -> (loss, metrics)` for modes `ar` and `sft`.

Batches hold `input_ids` int32 [B, T] and unshifted `labels` int32 [B, T] (-100 = unsupervised),
right-padded to a fixed T (trailing pads are harmless under causal attention and carry -100 labels).
`params` is the combined train-state tree; LoRA adapters under "lora" are applied here.

sft (docs/method.md#sft-losses): compressed forward; backbone CE on labels[2::2], MTP CE on labels[3::2], each
its own token-mean over the batch; confidence BCE against sg(p_mtp(gold token2)) on valid MTP slots (a
token-mean over the MTP stream's tokens).
ar: plain next-token CE of the backbone; optionally the native-MTP auxiliary CE (MTP(e(x_{t+1}), h_t)
predicts x_{t+2}, RoPE position t as vLLM serves it), so a model trained from scratch gets a working
MTP head for the `mtp` / `mtp_spec` baselines and for PIPO's MTP initialisation.

Every loss is token-weighted under gradient accumulation (see `optim`): `loss_fn.denominators(batch)`
counts each term's valid tokens, `loss_fn(params, batch, rng, denominators)` divides by the step's totals
(default: this batch's own), and `loss_fn.additive` names the metrics that add up over micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pipo_jax import losses
from pipo_jax.config import LoraConfig, LossConfig, ModelConfig
from pipo_jax.models import lora as lora_lib
from pipo_jax.models.pipo import MTPHead, PipoModel
from pipo_jax.models.qwen3_5 import Qwen35

IGNORE = losses.IGNORE_INDEX


def _effective_params(params, lora_cfg: LoraConfig, rng):
  deterministic = not (lora_cfg.rank > 0 and lora_cfg.dropout > 0)
  return lora_lib.materialize(params, lora_cfg, rng=rng, deterministic=deterministic)


def stream_labels(labels_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(backbone labels x_{2j+2}, MTP labels x_{2j+3}) for slots j = 0..L-2, each [B, L-1]."""
  return labels_BT[:, 2::2], labels_BT[:, 3::2]


ADDITIVE = ("loss_backbone", "loss_mtp", "loss_conf", "supervised_tokens", "real_tokens")


def _count(mask) -> jax.Array:
  return jnp.sum(mask).astype(jnp.float32)


def make_sft_loss(model_cfg: ModelConfig, loss_cfg: LossConfig, lora_cfg: LoraConfig):
  model = PipoModel(model_cfg)

  def denominators(batch) -> dict:
    """Valid tokens per stream; the confidence BCE is a mean over the MTP stream's valid slots."""
    lb_BJ, lm_BJ = stream_labels(batch["labels"])
    return {"backbone": _count(lb_BJ != IGNORE), "mtp": _count(lm_BJ != IGNORE)}

  def loss_fn(params, batch, rng, denoms=None):
    denoms = denominators(batch) if denoms is None else denoms
    p = {"params": _effective_params(params, lora_cfg, rng)}
    ids_BT, labels_BT = batch["input_ids"], batch["labels"]
    out = model.apply(p, ids_BT, None, loss_cfg.conf_detach_inputs)
    W_DV = model.apply(p, method=PipoModel.head_kernel)
    lb_BJ, lm_BJ = stream_labels(labels_BT)
    loss_b, n_b, _ = losses.cross_entropy_mean(
      out["h_BJD"], W_DV, lb_BJ, loss_cfg.logits_chunk, denominator=denoms["backbone"]
    )
    loss_m, n_m, gold_m_BJ = losses.cross_entropy_mean(
      out["m_BJD"], W_DV, lm_BJ, loss_cfg.logits_chunk, denominator=denoms["mtp"]
    )
    mask_BJ = lm_BJ != IGNORE
    target_BJ = losses.sft_confidence_target(gold_m_BJ)
    loss_c = losses.confidence_bce(out["conf_logit_BJ"], target_BJ, mask_BJ, denominator=denoms["mtp"])
    total = loss_cfg.backbone_weight * loss_b + loss_cfg.mtp_weight * loss_m + loss_cfg.conf_weight * loss_c
    conf = losses.confidence_metrics(jax.nn.sigmoid(out["conf_logit_BJ"]), target_BJ, mask_BJ)
    metrics = {
      "loss_backbone": loss_b,
      "loss_mtp": loss_m,
      "loss_conf": loss_c,
      "conf_pred_mean": conf["mean_pred"],
      "conf_target_mean": conf["mean_target"],
      "conf_ece": conf["ece"],
      "supervised_tokens": n_b + n_m,
      "real_tokens": _count(labels_BT != IGNORE),
    }
    return total, metrics

  loss_fn.denominators = denominators  # type: ignore[attr-defined]
  loss_fn.additive = ADDITIVE  # type: ignore[attr-defined]
  return loss_fn


def make_ar_loss(model_cfg: ModelConfig, loss_cfg: LossConfig, lora_cfg: LoraConfig):
  backbone = Qwen35(model_cfg)
  mtp = MTPHead(model_cfg)

  def denominators(batch) -> dict:
    """Valid next-token targets (labels[1:]) and native-MTP targets (labels[2:]) per batch."""
    labels_BT = batch["labels"]
    return {"backbone": _count(labels_BT[:, 1:] != IGNORE), "mtp": _count(labels_BT[:, 2:] != IGNORE)}

  def loss_fn(params, batch, rng, denoms=None):
    denoms = denominators(batch) if denoms is None else denoms
    p = _effective_params(params, lora_cfg, rng)
    pb = {"params": p["backbone"]}
    ids_BT, labels_BT = batch["input_ids"], batch["labels"]
    B, T = ids_BT.shape
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD = backbone.apply(pb, ids_BT, method=Qwen35.embed)
    h_BTD, _ = backbone.apply(pb, x_BTD, pos_BT)
    W_DV = backbone.apply(pb, method=Qwen35.head_kernel)
    loss_b, n_b, _ = losses.cross_entropy_mean(
      h_BTD[:, :-1], W_DV, labels_BT[:, 1:], loss_cfg.logits_chunk, denominator=denoms["backbone"]
    )
    metrics = {"loss_backbone": loss_b, "supervised_tokens": n_b, "real_tokens": _count(labels_BT != IGNORE)}
    total = loss_cfg.backbone_weight * loss_b
    if loss_cfg.native_mtp_weight > 0:
      if "mtp" not in p:
        raise ValueError("loss.native_mtp_weight > 0 needs an MTP head (model.mtp_num_hidden_layers >= 1)")
      # Slot t (0..T-3): MTP(e(x_{t+1}), h_t) at RoPE position t predicts x_{t+2}.
      e_BSD = x_BTD[:, 1 : T - 1]
      m_BSD, _ = mtp.apply({"params": p["mtp"]}, e_BSD, h_BTD[:, : T - 2], pos_BT[:, : T - 2])
      loss_m, _, _ = losses.cross_entropy_mean(
        m_BSD, W_DV, labels_BT[:, 2:], loss_cfg.logits_chunk, denominator=denoms["mtp"]
      )
      metrics["loss_mtp"] = loss_m
      total = total + loss_cfg.native_mtp_weight * loss_m
    return total, metrics

  loss_fn.denominators = denominators  # type: ignore[attr-defined]
  loss_fn.additive = ADDITIVE  # type: ignore[attr-defined]
  return loss_fn
