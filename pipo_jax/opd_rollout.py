"""OPD glue: student rollouts in `pipo` mode, their training encoding, the teacher, and the training loop.

`python -m pipo_jax.train --config.mode=opd` runs `OPDTrainer(cfg).train()`; it reuses `trainer.Trainer` for
the mesh, params (student from `checkpoint.init_from`), LoRA, the trainable/frozen TrainState, checkpoints
and metrics, and adds per step:

  1. prompts (PromptPipeline: left-padded generation prompts ending in `<think>\\n` plus their parity PAD,
     filtered by opd.min_pass_rate) ->
  2. rollout: `inference.api.generate(mode="pipo")` with the student's CURRENT params (LoRA merged by a
     jitted `lora.materialize`, on the same mesh, no weight copy to a server), tau = opd.conf_threshold,
     sampling = opd.sampling; the raw output stream is kept exactly as generated (PAD slots included) ->
  3. `encode_rollouts`: prompt || raw stream (|| trailing parity PAD), right-padded to the fixed
     T = opd.prompt_length + 2 * opd.max_new_tokens (the raw stream has at most 2 * max_new_tokens slots) ->
  4. the jitted OPD step (pipo_jax/opd.py) with the frozen teacher as a separate argument.

Single-process rollouts: the generated arrays are fetched with device_get (a multi-host run would need
process-local slices of the prompt batch; not done yet).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pipo_jax import checkpoint as ckpt_lib
from pipo_jax import guards, loading, metrics as metrics_lib, optim, sharding
from pipo_jax import opd as opd_lib
from pipo_jax.config import Config, ModelConfig, OPDConfig
from pipo_jax.data import pairs
from pipo_jax.models import lora as lora_lib
from pipo_jax.trainer import Trainer, boxed_params


def rollout_length(opd_cfg: OPDConfig) -> int:
  """Fixed training length T: the prompt bucket plus the largest raw stream (2 slots per emitted token)."""
  return int(opd_cfg.prompt_length + 2 * opd_cfg.max_new_tokens)


def encode_rollouts(prompt_ids_BP, prompt_valid_BP, raw_BN, raw_len_B, pad_id: int, length: int) -> dict:
  """Rollouts -> the OPD training batch (numpy, every array [B, length]; keys `opd.BATCH_KEYS`).

  prompt_ids_BP / prompt_valid_BP: left-padded prompts as given to generate (parity PAD already included,
  so each prompt has even length); raw_BN / raw_len_B: the generated raw stream and its length. The encoding
  is `pairs.encode_rollout_batch` (pipo_method.md 8.2): labels -100 on the prompt and on every PAD.
  """
  prompts = [np.asarray(p)[np.asarray(v, bool)] for p, v in zip(prompt_ids_BP, prompt_valid_BP)]
  responses = [np.asarray(r)[: int(n)] for r, n in zip(raw_BN, raw_len_B)]
  ids, labels, valid = pairs.encode_rollout_batch(prompts, responses, pad_id, length)
  pos = np.arange(length)[None]
  p_len = np.asarray([len(p) + len(p) % 2 for p in prompts])[:, None]
  r_len = np.asarray([len(r) for r in responses])[:, None]
  response = (pos >= p_len) & (pos < p_len + r_len)
  return {"input_ids": ids, "labels": labels, "keep": valid & (ids != pad_id), "response": response,
          "fill_allow": response.copy()}


def load_teacher(opd_cfg: OPDConfig, mesh) -> tuple[ModelConfig, dict]:
  """(teacher config, {"backbone": params}) from opd.teacher_checkpoint, placed on the mesh's shardings."""
  if not opd_cfg.teacher_checkpoint:
    raise ValueError("mode=opd needs opd.teacher_checkpoint (an orbax checkpoint or an HF directory)")
  tcfg, params = loading.load_model(opd_cfg.teacher_checkpoint, opd_cfg.teacher, init_heads=False)
  shardings = teacher_shardings(tcfg, mesh)
  return tcfg, jax.device_put({"backbone": params["backbone"]}, shardings)


def teacher_shardings(tcfg: ModelConfig, mesh) -> dict:
  """NamedShardings of the teacher's {"backbone": ...} tree (same logical rules as the student)."""
  return {"backbone": sharding.param_shardings(boxed_params(tcfg, "ar")["backbone"], mesh)}


class Rollout:
  """Student rollouts with its current params: `__call__(params, prompts, rng) -> (batch dict, stats)`."""

  def __init__(self, model_cfg: ModelConfig, cfg: Config, mesh, stop_ids):
    from pipo_jax.inference import api
    from pipo_jax.inference.sampling import SamplingParams
    self.api, self.model_cfg, self.opd, self.mesh = api, model_cfg, cfg.opd, mesh
    self.sampling = SamplingParams.from_config(cfg.opd.sampling)
    self.stop_ids = stop_ids
    lora_cfg = cfg.lora
    # Merge on the fly: one jitted materialize per rollout, so generation sees plain (merged) kernels.
    self._merge = jax.jit(lambda p: lora_lib.materialize(p, lora_cfg))
    self.length = rollout_length(cfg.opd)

  def __call__(self, params, prompts: dict, rng) -> tuple[dict, dict]:
    ids = sharding.shard_batch(prompts["prompt_ids"], self.mesh)
    valid = sharding.shard_batch(prompts["prompt_valid"], self.mesh)
    res = self.api.generate(self._merge(params), self.model_cfg, ids, valid, mode="pipo", sampling=self.sampling,
                            conf_threshold=self.opd.conf_threshold, max_new_tokens=self.opd.max_new_tokens,
                            rng=rng, stop_ids=self.stop_ids)
    raw, raw_len, drafts, kept = jax.device_get((res.raw, res.raw_len, res.drafts_proposed, res.drafts_kept))
    batch = encode_rollouts(prompts["prompt_ids"], prompts["prompt_valid"], raw, raw_len,
                            self.model_cfg.pad_token_id, self.length)
    stats = {"rollout/draft_accept_rate": float(kept.sum()) / max(1.0, float(drafts.sum()))}
    return batch, stats


class OPDTrainer(Trainer):
  """Trainer for mode=opd: the parent's params/LoRA/state/checkpoint machinery, an OPD data loop."""

  def __init__(self, cfg: Config):
    if cfg.mode != "opd":
      raise ValueError(f"OPDTrainer needs mode=opd, got {cfg.mode!r}")
    super().__init__(cfg)
    if self.model_cfg.pad_token_id is None:
      raise ValueError("OPD needs the student's pad_token_id (the PAD of rejected drafts)")

  def prompt_pipeline(self, tokenizer):
    from pipo_jax.data import pipeline
    dc, oc = self.cfg.data, self.cfg.opd
    if not dc.train_path:
      raise ValueError("mode=opd needs data.train_path: a prompt JSONL (reference RL schema or {'prompt': ...})")
    return pipeline.PromptPipeline(
        dc.train_path, tokenizer, batch_size=dc.batch_size, prompt_length=oc.prompt_length, seed=dc.seed,
        num_epochs=dc.num_epochs, min_pass_rate=oc.min_pass_rate, pad_id=self.model_cfg.pad_token_id,
        fmt=dc.format, skip_malformed=dc.skip_malformed, vocab_size=self.model_cfg.vocab_size)

  def tokenizer(self):
    from pipo_jax.data import tokenizer as tok_lib
    path = self.cfg.data.tokenizer_path or self.cfg.checkpoint.init_from
    if not path or not os.path.exists(os.path.join(path, "tokenizer.json")):
      raise ValueError(f"mode=opd needs a tokenizer: set data.tokenizer_path (got {path!r})")
    return tok_lib.load_tokenizer(path)

  def train(self) -> Optional[dict]:
    cfg = self.cfg
    tok = self.tokenizer()
    data = self.prompt_pipeline(tok)
    logging.info("OPD prompts: %s", data.stats.as_dict())
    from pipo_jax.data.pipeline import check_data_end
    check_data_end(data.steps_available(), cfg.train.num_steps,
                   f"data.train_path={cfg.data.train_path} x data.num_epochs={cfg.data.num_epochs}")
    tcfg, teacher = load_teacher(cfg.opd, self.mesh)
    state = self.build_state()
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    ckpt = self.checkpointer(state)
    state = self.resume(ckpt, state, data)
    loss_fn = opd_lib.make_opd_loss(self.model_cfg, tcfg, cfg.opd, cfg.loss, cfg.lora)
    schedule = optim.make_schedule(cfg.optim, cfg.train.num_steps)
    step_fn = opd_lib.make_opd_train_step(loss_fn, 1, schedule)
    with sharding.use_rules(self.mesh):
      jitted = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, None))
    rollout = Rollout(self.model_cfg, cfg, self.mesh, tok.special.stop_ids)
    T = rollout.length
    flops = metrics_lib.estimate_flops_per_token(self.model_cfg, T)
    writer = metrics_lib.MetricsWriter(self.workdir, cfg.train.num_steps, flops,
                                       metrics_lib.peak_flops_per_device(override=cfg.train.peak_flops_per_device))
    guard = ckpt_lib.PreemptionGuard().install()
    step, last, tokens = int(state.step), None, 0
    base_key = jax.random.PRNGKey(cfg.opd.sampling.seed)
    nonfinite = guards.NonFiniteCounter(cfg.train.max_nonfinite_steps)
    data_at_step = ckpt_lib.IteratorSnapshot(data.iterator.get_state())
    finished = False
    t0 = time.time()
    try:
      while step < cfg.train.num_steps:
        micro = self.next_micro_batches(data, 1)
        if micro is None:
          logging.warning("the prompts ended after step %d: stopping there", step)
          break
        prompts = micro[0]
        tr = time.perf_counter()
        with sharding.use_rules(self.mesh):
          host_batch, rstats = rollout(state.params, prompts, jax.random.fold_in(base_key, step))
        t_roll = time.perf_counter() - tr
        tokens += int(host_batch["keep"].sum()) * jax.process_count()
        batch = sharding.shard_batch(host_batch, self.mesh)
        ts = time.perf_counter()
        with sharding.use_rules(self.mesh):
          state, m = jitted(state, teacher, batch)
        # Wait for the step before the next rollout is dispatched: on XLA:CPU the generate program launched
        # while the train step still runs has hung (all threads idle in futex waits) in the tiny CPU run.
        jax.block_until_ready(m)
        step += 1
        data_at_step = ckpt_lib.IteratorSnapshot(data.iterator.get_state())
        nonfinite.update(step, m["nonfinite"], ckpt.latest_step)
        if step % cfg.train.log_every == 0 or step == cfg.train.num_steps or step == 1:
          m = self.host_metrics(m, data)
          m["skipped_nonfinite"] = nonfinite.skipped
          m.update(rstats)
          m["time/rollout_s"] = t_roll
          m["time/train_step_s"] = time.perf_counter() - ts
          last = writer.log_progress(step, m, tokens)
          tokens = 0
        ckpt.save(step, state, data_at_step)
        if guard.should_stop(step):
          logging.warning("stop requested (SIGTERM): saving step %d and exiting", step)
          break
      finished = True
    except KeyboardInterrupt:
      finished = True
      raise
    finally:
      self.close_run(step, state, data_at_step, ckpt, writer, guard, save=finished)
    logging.info("finished at step %d in %.1fs", step, time.time() - t0)
    return last
