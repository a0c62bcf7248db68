"""On-policy distillation (mode `opd`): teacher scoring and the loss on an already rolled-out batch.

Method: docs/method.md#opd; where it differs from the reference: docs/method.md#sampled-kl-gradient,
docs/method.md#pad-label-fill-scope, docs/method.md#pad-never-sampled, docs/method.md#batched-opd.
Rollouts and the trainer live in `pipo_jax/opd/rollout.py` and `pipo_jax/opd/trainer.py`; this module is pure
jnp and knows nothing about
generation.

Axis names: B rollouts, T tokens (prompt bucket + response bucket, even), L = T/2 pairs, J = L - 1 slots,
D student hidden, E teacher hidden, V vocabulary (shared by student and teacher).

Batch (rollout keys host-built by `opd.rollout.encode_rollouts`, every array [B, T]):
  input_ids    int32  prompt (left-aligned, parity PAD included) || raw response stream (PADs included) ||
                      trailing parity PAD if odd || right padding with PAD
  labels       int32  unshifted; -100 on the prompt, on every PAD and on the padding
  keep         bool   real (non-PAD) tokens of prompt + response: what the teacher sees after compaction
  response     bool   the raw response slots (PAD slots included): where a PAD is a rejected draft
  fill_allow   bool   the PAD positions whose MTP slot may be filled (see below)
and the teacher's scoring (`make_teacher_fn`, its own jitted program before the train step, [B, J, E]):
  teacher_back, teacher_mtp   the teacher's post-norm states aligned with the student's two streams

One step (docs/method.md#opd, teacher and PAD compaction to normalisation):
  * teacher (`teacher_states`): a separate frozen model (its own config, never in the TrainState), run
    uncompressed and without gradient on the PAD-compacted sequence (`pad_compaction.compact`), its
    post-norm states gathered back per stream with the cumsum map (backbone stream: position 2j+1, MTP
    stream: position 2j+2; a PAD position takes the previous real token's state). Its LM head `W_t` is an
    extra argument of the train step;
  * student: the compressed forward `PipoModel(ids)` -> h_BJD, m_BJD, conf_logit_BJ (LoRA applied);
  * per stream, `divergences.opd_stream_loss` (chunked, never [T, V] logits) with opd.divergence;
  * normalisation "sample": each rollout's token-mean per stream, then the mean over rollouts (over every
    rollout of the step when micro-batches are accumulated: `denominators` counts rows);
  * confidence BCE (MTP slots, inputs detached) against the stop-gradient acceptance target.

PAD label fill (opd.fill_pad_label; docs/method.md#pad-label-fill-scope): an MTP slot whose target x_{2j+3} is
PAD gets the student MTP's own argmax as label only when that PAD has a serving counterpart, i.e. it is a token2 slot of
the generated stream: a draft the confidence gate rejected (or, with tau >= 1, a draft never run), the
prefill step's draft included. The prompt-parity PAD (its slot drafts nothing at serving: the MTP slot over
the last prompt token is only teacher-forced cache), the trailing parity PAD (appended by the encoder after
the stream ended) and the batch right padding are never filled. `fill_allow` = `response`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pipo_jax import losses
from pipo_jax.config import LoraConfig, LossConfig, ModelConfig, OPDConfig
from pipo_jax.models import lora as lora_lib
from pipo_jax.models.pipo import PipoModel
from pipo_jax.models.qwen3_5 import Qwen35
from pipo_jax.opd import divergences, pad_compaction

IGNORE = losses.IGNORE_INDEX
ROLLOUT_KEYS = ("input_ids", "labels", "keep", "response", "fill_allow")
TEACHER_KEYS = ("teacher_back", "teacher_mtp")
BATCH_KEYS = ROLLOUT_KEYS + TEACHER_KEYS
ADDITIVE = ("loss_backbone", "loss_mtp", "loss_conf", "kl_backbone", "kl_mtp", "mtp_filled", "supervised_tokens")


def teacher_states(teacher_cfg: ModelConfig, teacher_params: dict, ids_BT: jax.Array, keep_BT: jax.Array):
  """The teacher on the PAD-compacted sequence, states mapped back per stream.

  teacher_params: {"backbone": ...} (other keys ignored). Returns (g_back_BJE, g_mtp_BJE, W_EV), all
  stop-gradient: g_back[j] = state at position 2j+1, g_mtp[j] = state at 2j+2 after the cumsum map.
  """
  model = Qwen35(teacher_cfg)
  p = {"params": jax.lax.stop_gradient(teacher_params["backbone"])}
  B, T = ids_BT.shape
  c = pad_compaction.compact(ids_BT, keep_BT, filler_id=0)
  pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  # Compact slots past n_keep are filler after every real token: causal attention keeps them out of the
  # real states, so no mask is needed (a mask would only cost the GDN a masked scan).
  g_c_BTE, _ = model.apply(p, model.apply(p, c.ids, method=Qwen35.embed), pos_BT)
  g_back, g_mtp = pad_compaction.teacher_stream_states(g_c_BTE, keep_BT)
  W = model.apply(p, method=Qwen35.head_kernel)
  return jax.lax.stop_gradient(g_back), jax.lax.stop_gradient(g_mtp), jax.lax.stop_gradient(W)


def make_teacher_fn(teacher_cfg: ModelConfig):
  """`score(teacher_params, batch) -> {"teacher_back", "teacher_mtp"}` ([B, J, E] each) for one rollout
  batch, or for k stacked micro-batches ([k, B, T] in, [k, B, J, E] out, one micro-batch at a time)."""

  def one(teacher_params, ids_BT, keep_BT):
    g_back, g_mtp, _ = teacher_states(teacher_cfg, teacher_params, ids_BT, keep_BT)
    return {"teacher_back": g_back, "teacher_mtp": g_mtp}

  def score(teacher_params, batch):
    ids, keep = batch["input_ids"], batch["keep"]
    if ids.ndim == 2:
      return one(teacher_params, ids, keep)
    return jax.lax.map(lambda xs: one(teacher_params, *xs), (ids, keep))

  return score


def teacher_head(teacher_cfg: ModelConfig, teacher_params: dict) -> jax.Array:
  """The teacher's LM-head matrix W_EV (tied or not), the OPD step's extra argument."""
  model = Qwen35(teacher_cfg)
  return model.apply({"params": teacher_params["backbone"]}, method=Qwen35.head_kernel)


def make_opd_loss(
  student_cfg: ModelConfig,
  teacher_cfg: ModelConfig,
  opd_cfg: OPDConfig,
  loss_cfg: LossConfig,
  lora_cfg: LoraConfig,
  pad_id: int | None = None,
):
  """`loss_fn(params, batch, rng, denominators, W_t) -> (loss, metrics)` (the `optim.make_train_step`
  protocol; `loss_fn.denominators`, `loss_fn.additive`); params is the student's combined tree, batch holds
  `BATCH_KEYS` (teacher states included), W_t is `teacher_head`."""
  if opd_cfg.divergence not in divergences.MODES:
    raise ValueError(f"opd.divergence={opd_cfg.divergence!r}: expected one of {divergences.MODES}")
  if student_cfg.vocab_size != teacher_cfg.vocab_size:
    raise ValueError(f"student vocab {student_cfg.vocab_size} != teacher vocab {teacher_cfg.vocab_size}")
  pad = student_cfg.pad_token_id if pad_id is None else pad_id
  model = PipoModel(student_cfg)
  kw = dict(chunk=loss_cfg.logits_chunk, topk=opd_cfg.topk, beta=opd_cfg.jsd_beta, temperature=opd_cfg.temperature)

  def denominators(batch) -> dict:
    """Both streams and the confidence BCE are per-sample means: they divide by the rows of the step."""
    return {"rows": jnp.float32(batch["labels"].shape[0])}

  def forward(params, batch, W_t, rng=None, denoms=None) -> dict:
    """The student and both streams: {"back", "mtp": OPDStream, "conf_logit_BJ", "fill_BJ", "w_b", "w_m"}.

    rng None: evaluation (LoRA dropout off). denoms None: this batch's own."""
    denoms = denominators(batch) if denoms is None else denoms
    deterministic = rng is None or not (lora_cfg.rank > 0 and lora_cfg.dropout > 0)
    p = {"params": lora_lib.materialize(params, lora_cfg, rng=rng, deterministic=deterministic)}
    ids_BT, labels_BT = batch["input_ids"], batch["labels"]
    out = model.apply(p, ids_BT, None, loss_cfg.conf_detach_inputs)
    W_s = model.apply(p, method=PipoModel.head_kernel)
    g_back, g_mtp = batch["teacher_back"], batch["teacher_mtp"]

    lb_BJ, lm_BJ = pad_compaction.stream_labels(labels_BT)
    fill_BJ = None
    if opd_cfg.fill_pad_label:
      fill_BJ = pad_compaction.mtp_fill_mask(ids_BT, pad, batch["fill_allow"])
    w_b = losses.normalisation_weights(lb_BJ != IGNORE, "sample", denoms["rows"])
    w_m = losses.normalisation_weights(divergences.stream_valid(lm_BJ, fill_BJ), "sample", denoms["rows"])
    back = divergences.opd_stream_loss(out["h_BJD"], W_s, g_back, W_t, lb_BJ, opd_cfg.divergence, weights_N=w_b, **kw)
    mtp = divergences.opd_stream_loss(
      out["m_BJD"], W_s, g_mtp, W_t, lm_BJ, opd_cfg.divergence, fill_N=fill_BJ, weights_N=w_m, **kw
    )
    return {"back": back, "mtp": mtp, "conf_logit_BJ": out["conf_logit_BJ"], "fill_BJ": fill_BJ, "w_b": w_b, "w_m": w_m}

  def loss_fn(params, batch, rng, denoms, W_t):
    f = forward(params, batch, W_t, rng, denoms)
    back, mtp, fill_BJ, w_b, w_m = f["back"], f["mtp"], f["fill_BJ"], f["w_b"], f["w_m"]
    conf_logit = f["conf_logit_BJ"]
    loss_c = losses.confidence_bce(conf_logit, mtp.conf_target, mtp.valid, weights_N=w_m)
    total = (
      loss_cfg.backbone_weight * back.loss_sum + loss_cfg.mtp_weight * mtp.loss_sum + loss_cfg.conf_weight * loss_c
    )
    conf = losses.confidence_metrics(
      jax.nn.sigmoid(conf_logit), mtp.conf_target, mtp.valid, threshold=opd_cfg.conf_threshold
    )
    resp = batch["response"]
    n_resp = jnp.sum(resp, axis=-1).astype(jnp.float32)
    n_real = jnp.sum(resp & batch["keep"], axis=-1).astype(jnp.float32)
    metrics = {
      "loss_backbone": back.loss_sum,
      "loss_mtp": mtp.loss_sum,
      "loss_conf": loss_c,
      # Exact full-vocabulary reverse KL(student || teacher), same per-sample normalisation as the loss.
      "kl_backbone": jnp.sum(back.kl_tok * w_b),
      "kl_mtp": jnp.sum(mtp.kl_tok * w_m),
      "conf_pred_mean": conf["mean_pred"],
      "conf_target_mean": conf["mean_target"],
      "conf_ece": conf["ece"],
      "conf_kept_rate": conf["kept_rate"],
      "kept_rejected_rate": conf["kept_rejected_rate"],
      "rollout_length": jnp.mean(n_real),
      "pad_ratio": jnp.sum(n_resp - n_real) / jnp.maximum(jnp.sum(n_resp), 1.0),
      "mtp_filled": jnp.sum(fill_BJ).astype(jnp.float32) if fill_BJ is not None else jnp.float32(0),
      "supervised_tokens": back.n_valid + mtp.n_valid,
    }
    return total, metrics

  loss_fn.forward = forward
  loss_fn.denominators = denominators
  loss_fn.additive = ADDITIVE
  return loss_fn
