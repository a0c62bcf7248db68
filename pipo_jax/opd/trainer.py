"""`OPDTrainer`: mode `opd` as a plug-in of the one training loop (`trainer.Trainer.train`).

`python -m pipo_jax.train --config.mode=opd` runs `OPDTrainer(cfg).train()`. Everything of the loop
(resume, stop_after_steps, preemption saves, checkpoints, gradient accumulation, progress and metrics) is
the parent's; this class supplies only what differs:

  * data: the prompt pipeline (this process's rows of every global prompt batch), not SFT examples;
  * a batch: for each of the k = optim.grad_accum_steps micro-batches, a rollout of the student's current
    params (`rollout.Rollout`, every process its own rows, one global program), then the teacher scores
    the whole global batch in its own jitted program (`loss.make_teacher_fn`: PAD-compacted forward,
    states aligned with the student's two streams);
  * the step's extra input: the frozen teacher's LM head (the teacher is never part of the TrainState);
  * per-step timing: rollout, teacher and train seconds, rollout tokens/s, mean rollout length, PAD ratio
    (`time/*`, `rollout/*` in metrics.jsonl, means over the steps since the last log line).

The next rollout needs the params this step produces, so nothing can overlap the train step: waiting for
it (`run_step`) costs no time and makes `time/train_s` the step's own.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import logging

from pipo_jax import distributed, sharding
from pipo_jax.config import Config
from pipo_jax.opd import loss as opd_loss
from pipo_jax.opd import rollout as rollout_lib
from pipo_jax.trainer import Trainer


class OPDTrainer(Trainer):
  """Trainer for mode=opd (see module docstring)."""

  def __init__(self, cfg: Config):
    if cfg.mode != "opd":
      raise ValueError(f"OPDTrainer needs mode=opd, got {cfg.mode!r}")
    super().__init__(cfg)
    if self.model_cfg.pad_token_id is None:
      raise ValueError("mode=opd needs the student's model.pad_token_id (the PAD of rejected drafts)")
    self.teacher_cfg = self.teacher = self.rollout = self._score = None

  # -- hooks of Trainer.train ----------------------------------------------------------------------
  def data_pipeline(self):
    from pipo_jax.data import pipeline
    from pipo_jax.data import tokenizer as tok_lib

    dc, oc = self.cfg.data, self.cfg.opd
    path = dc.tokenizer_path or self.cfg.checkpoint.init_from
    if not path or not os.path.exists(os.path.join(path, "tokenizer.json")):
      raise ValueError(f"mode=opd needs a tokenizer: set data.tokenizer_path (got {path!r})")
    self.tokenizer = tok_lib.load_tokenizer(path)
    data = pipeline.PromptPipeline(
      dc.train_path,
      self.tokenizer,
      batch_size=dc.batch_size,
      prompt_length=oc.prompt_length,
      seed=dc.seed,
      num_epochs=dc.num_epochs,
      min_pass_rate=oc.min_pass_rate,
      pad_id=self.model_cfg.pad_token_id,
      fmt=dc.format,
      skip_malformed=dc.skip_malformed,
      vocab_size=self.model_cfg.vocab_size,
    )
    logging.info("OPD prompts: %s", data.stats.as_dict())
    return data

  def loss_fn(self):
    return opd_loss.make_opd_loss(self.model_cfg, self.teacher_cfg, self.cfg.opd, self.cfg.loss, self.cfg.lora)

  def step_inputs(self) -> tuple:
    """Loads the teacher (once, after the student: a bad student checkpoint fails before the big load)."""
    self.teacher_cfg, self.teacher = rollout_lib.load_teacher(self.cfg.opd, self.mesh)
    with sharding.use_rules(self.mesh):
      w_t = jax.jit(lambda t: opd_loss.teacher_head(self.teacher_cfg, t))(self.teacher)
    self.rollout = rollout_lib.Rollout(self.model_cfg, self.cfg, self.mesh, self.tokenizer.special.stop_ids)
    return (w_t,)

  def sequence_length(self) -> int:
    return rollout_lib.rollout_length(self.cfg.opd)

  def next_batch(self, data, state, step: int):
    k = self.cfg.optim.grad_accum_steps
    base = jax.random.fold_in(jax.random.PRNGKey(self.cfg.opd.sampling.seed), step)
    prompts = self.next_micro_batches(data, k)
    if prompts is None:
      return None  # the prompts have ended (on every process alike)
    local, stats = [], []
    for i, p in enumerate(prompts):
      rows, st = self.rollout(state.params, p, base if k == 1 else jax.random.fold_in(base, i))
      local.append(rows)
      stats.append(st)
    batch = self.global_batch(local)
    t0 = time.perf_counter()
    scored, keep_tokens = distributed.wait_until_ready(self._teacher_scores(batch))
    batch.update(scored)
    info = rollout_lib.rollout_metrics(stats, time.perf_counter() - t0)
    info["tokens"] = int(keep_tokens)
    return batch, info

  def run_step(self, step_fn, state, batch, extra, info: dict):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch, *extra)
    distributed.wait_until_ready(m)
    info["time/train_s"] = time.perf_counter() - t0
    return state, m

  # -- teacher scoring -------------------------------------------------------------------------------
  def _teacher_scores(self, batch):
    """({"teacher_back", "teacher_mtp"}, global count of real tokens) of the global rollout batch."""
    score = opd_loss.make_teacher_fn(self.teacher_cfg)

    def fn(teacher, b):
      return score(teacher, b), jnp.sum(b["keep"])

    inputs = {k: batch[k] for k in ("input_ids", "keep")}
    if self._score is None:
      self._score = distributed.compile_and_meet(
        jax.jit(fn), self.teacher, inputs, name="pipo_jax.opd.trainer: teacher compiled"
      )
    return self._score(self.teacher, inputs)
