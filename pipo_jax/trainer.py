"""The training loop behind `python -m pipo_jax.train`: the one loop of every mode (ar | sft | opd).

Phases (each a method, run in order by `train`):
  config checks -> model config -> mesh -> data -> params (loaded or initialised, sharded) -> LoRA -> train
  state (trainable / frozen partition, optimizer only over trainable) -> resume -> jitted loop (metrics,
  checkpoints, SIGTERM-safe final save).

A mode plugs in only what differs, by overriding the hooks (as `opd.trainer.OPDTrainer` does): `data_pipeline`
(what `next` yields), `loss_fn`, `step_inputs` (step arguments that are not batch rows), `next_batch` (how
one optimizer step's global batch is produced, with host-side metrics), `run_step` and `sequence_length`.
stop_after_steps, preemption saves, resume, gradient accumulation, progress and metrics live in `train`
alone, so every mode has them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipo_jax import distributed, flop_model, guards, objectives, optim, sharding
from pipo_jax import metrics as metrics_lib
from pipo_jax.config import Config, ModelConfig
from pipo_jax.io import checkpoint as ckpt_lib
from pipo_jax.io import loading
from pipo_jax.io import workdir as wd
from pipo_jax.models import lora as lora_lib
from pipo_jax.models.pipo import PipoModel

AR_KEYS = ("backbone", "mtp")


def _config_dict(cfg) -> dict:
  import json

  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def boxed_params(model_cfg: ModelConfig, mode: str, rng=None):
  """Boxed (logically annotated) params of the run's model: abstract when rng is None."""

  def init(key):
    variables = PipoModel(model_cfg).init(key, jnp.zeros((1, 4), jnp.int32), method=PipoModel.init_all)
    params = variables["params"]
    if mode == "ar":
      params = {k: params[k] for k in AR_KEYS if k in params and (k != "mtp" or model_cfg.mtp_num_hidden_layers)}
    return params

  if rng is None:
    return jax.eval_shape(init, jax.random.PRNGKey(0))
  return init(rng)


def logical_axes(boxed) -> Any:
  return jax.tree_util.tree_map(
    lambda b: tuple(b.names) if isinstance(b, nn.meta.Partitioned) else (),
    boxed,
    is_leaf=lambda x: isinstance(x, nn.meta.Partitioned),
  )


def axes_to_shardings(axes_tree, mesh) -> Any:
  return jax.tree_util.tree_map(
    lambda a: NamedSharding(mesh, sharding.logical_to_mesh_spec(a)), axes_tree, is_leaf=lambda x: isinstance(x, tuple)
  )


def train_state_shardings(params, param_shardings, mask, tx, mesh) -> optim.TrainState:
  """Shardings of `TrainState.create(params, mask, tx, rng)`: every optimizer slot shaped like a trainable
  param (AdamW mu / nu) takes that param's sharding; step, counts and rng are replicated.

  Left to jit's sharding propagation the slots come out replicated (they are zeros, with no data dependence
  on the params), which costs every device a full copy of the optimizer state. `params` may be abstract.
  """
  import optax

  rep = NamedSharding(mesh, P())
  trainable_sh, frozen_sh = optim.partition(param_shardings, mask)
  trainable, _ = optim.partition(params, mask)
  opt_abstract = jax.eval_shape(tx.init, trainable)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, trainable_sh, transform_non_params=lambda _: rep)
  return optim.TrainState(step=rep, trainable=trainable_sh, frozen=frozen_sh, opt_state=opt_sh, rng=rep, tx=tx)


class Trainer:
  def __init__(self, cfg: Config):
    cfg.validate()  # every config check, before any weight is loaded or anything is written
    self.cfg = cfg
    self.workdir = wd.resolve(cfg.workdir)  # gs://... stays a URL
    wd.makedirs(self.workdir)
    wd.prove_shared(self.workdir)  # multi-host: one clear error when the hosts do not share the workdir
    self.model_cfg = loading.model_config_of(cfg)
    self.mesh = sharding.make_mesh(cfg.mesh, self._mesh_devices(cfg.mesh))
    logging.info(
      "mode=%s model=%s mesh=%s workdir=%s",
      cfg.mode,
      cfg.model.preset or cfg.checkpoint.init_from,
      dict(self.mesh.shape),
      self.workdir,
    )

  @staticmethod
  def _mesh_devices(mc):
    """All devices, or the first data*fsdp*tensor of them when every axis is given explicitly (a run on a
    subset of the machine, e.g. 1 of 8 fake CPU devices)."""
    devices = jax.devices()
    sizes = (mc.data, mc.fsdp, mc.tensor)
    if -1 not in sizes and int(np.prod(sizes)) < len(devices):
      logging.info("mesh %s uses %d of %d devices", sizes, int(np.prod(sizes)), len(devices))
      return devices[: int(np.prod(sizes))]
    return devices

  def saved_config(self) -> dict:
    """The run config as saved with checkpoints: the model config *resolved* (preset None), so a checkpoint
    rebuilds the model it holds whatever preset or init_from the run started from."""
    model = dataclasses.replace(self.model_cfg, preset=None)
    return _config_dict(dataclasses.replace(self.cfg, model=model))

  # -- params ------------------------------------------------------------------------------------
  def init_params(self, rng) -> tuple[dict, Any]:
    """(params, shardings): loaded from checkpoint.init_from or initialised, placed on the mesh."""
    cfg, mc = self.cfg, self.model_cfg
    abstract = boxed_params(mc, cfg.mode)
    shardings = sharding.param_shardings(abstract, self.mesh)  # raises naming any non-dividing axis
    if cfg.checkpoint.init_from:
      _, params = loading.load_model(cfg.checkpoint.init_from, cfg.model, init_heads=cfg.mode != "ar")
      params = {k: v for k, v in params.items() if k in shardings}
      missing = [k for k in shardings if k not in params]
      if missing:  # an ar run from a checkpoint without an MTP head: initialise it
        fresh = nn.meta.unbox(boxed_params(mc, cfg.mode, rng))
        params.update({k: fresh[k] for k in missing})
      params = sharding.place(params, shardings)
    else:
      with sharding.use_rules(self.mesh):
        params = jax.jit(lambda k: nn.meta.unbox(boxed_params(mc, cfg.mode, k)), out_shardings=shardings)(rng)
    return params, shardings

  def add_lora(self, params, shardings, rng):
    lc = self.cfg.lora
    if lc.rank <= 0:
      return params, shardings
    adapters = lora_lib.init_lora(params, lc, rng)
    axes = lora_lib.lora_logical_axes(logical_axes(boxed_params(self.model_cfg, self.cfg.mode)), adapters)
    lora_shardings = axes_to_shardings(axes, self.mesh)
    adapters = sharding.place(adapters, lora_shardings)
    logging.info("LoRA r=%d alpha=%g on %d modules", lc.rank, lc.alpha, len(lora_lib.adapter_paths(adapters)))
    return dict(params, **{lora_lib.LORA_KEY: adapters}), dict(shardings, **{lora_lib.LORA_KEY: lora_shardings})

  def trainable_mask(self, params):
    tc = self.cfg.train
    present = tuple(p for p in tc.trainable if p.split("/")[0] in params)
    mask = optim.trainable_mask(params, dataclasses.replace(tc, trainable=present), self.cfg.lora.rank > 0)
    if tc.train_embeddings:
      mask = dict(mask)
      bb = dict(mask["backbone"])
      for k in ("embed_tokens", "lm_head"):
        if k in bb:
          bb[k] = jax.tree_util.tree_map(lambda _: True, bb[k])
      mask["backbone"] = bb
    n_train = sum(
      int(np.prod(x.shape)) for x, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)) if m
    )
    logging.info("trainable params: %s of %s", f"{n_train:,}", f"{optim.count_params(params):,}")
    return mask

  def loss_fn(self):
    cfg = self.cfg
    if cfg.mode == "ar":
      return objectives.make_ar_loss(self.model_cfg, cfg.loss, cfg.lora)
    if cfg.mode == "sft":
      return objectives.make_sft_loss(self.model_cfg, cfg.loss, cfg.lora)
    raise ValueError("mode=opd runs through pipo_jax.opd.trainer.OPDTrainer")

  def step_inputs(self) -> tuple:
    """Arguments of the train step after the batch that are not batch rows (none here; OPD: the teacher head)."""
    return ()

  def sequence_length(self) -> int:
    """Tokens per sequence of a training batch (for the FLOP count)."""
    return self.cfg.data.max_length

  def step_flops(self, state) -> flop_model.Flops:
    """Matmul FLOPs of one optimizer step, all devices (`flop_model.train_step`; OPD: its teacher_cfg is loaded
    by step_inputs, which runs first)."""
    trained = flop_model.trained_modules(state.trainable)
    teacher = getattr(self, "teacher_cfg", None)
    return flop_model.train_step(self.cfg, self.model_cfg, trained, self.sequence_length(), teacher)

  def peak_flops(self) -> float | None:
    """Peak FLOP/s per device for `mfu`: train.peak_flops_per_device, else a timed matmul when
    train.measure_peak_flops, else the vendor table (None on CPU: no mfu)."""
    tc = self.cfg.train
    if tc.peak_flops_per_device <= 0 and tc.measure_peak_flops:
      peak = metrics_lib.measure_matmul_peak()
      logging.info("measured peak (best of 5 fp32 2048^2 matmuls): %.4g FLOP/s per device", peak)
      return peak
    return metrics_lib.peak_flops_per_device(override=tc.peak_flops_per_device)

  # -- data --------------------------------------------------------------------------------------
  def data_pipeline(self):
    from pipo_jax.data import pipeline
    from pipo_jax.data import tokenizer as tok_lib

    dc = self.cfg.data
    if not dc.train_path:
      dc = self._generated_data(dc)
      self.cfg = dataclasses.replace(self.cfg, data=dc)
    tok_dir = dc.tokenizer_path or self.cfg.checkpoint.init_from
    tok = (
      tok_lib.load_tokenizer(tok_dir) if tok_dir and os.path.exists(os.path.join(tok_dir, "tokenizer.json")) else None
    )
    if tok is not None and tok.vocab_size > self.model_cfg.vocab_size:
      raise ValueError(f"tokenizer {tok_dir} has {tok.vocab_size} ids but model.vocab_size={self.model_cfg.vocab_size}")
    pad = None if tok is not None else self.model_cfg.pad_token_id
    return pipeline.TrainPipeline(
      dc, mode=self.cfg.mode, tokenizer=tok, pad_id=pad, vocab_size=self.model_cfg.vocab_size
    )

  def _generated_data(self, dc):
    """No data.train_path: generate the synthetic arithmetic task into the workdir (CPU demo default)."""
    from pipo_jax.data import synthetic

    out = os.path.join(self.workdir, "data")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(out, "train.jsonl")):
      logging.info("data.train_path is empty: generating the synthetic arithmetic task in %s", out)
      synthetic.write_dataset(out, n_train=2000, n_test=100, seed=dc.seed)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("synthetic data written")
    return dataclasses.replace(
      dc,
      train_path=os.path.join(out, "train.jsonl"),
      tokenizer_path=dc.tokenizer_path or os.path.join(out, "tokenizer"),
    )

  def global_batch(self, local_batches: list):
    """k local micro-batches -> one global batch pytree ([B, T], or [k, B, T] with accumulation)."""
    k = len(local_batches)
    if k == 1:
      return sharding.shard_batch(local_batches[0], self.mesh)
    stacked = {key: np.stack([b[key] for b in local_batches]) for key in local_batches[0]}
    s = NamedSharding(self.mesh, P(None, ("data", "fsdp"), None))
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(s, x), stacked)

  @staticmethod
  def host_metrics(m, data) -> dict:
    """Device metrics of a step -> host floats, `learning_rate` named `lr`, plus the data pipeline counters."""
    m = jax.device_get(m)
    m["lr"] = m.pop("learning_rate", None)
    m.update({f"data/{k}": v for k, v in data.stats.as_dict().items()})
    return m

  @staticmethod
  def close_run(step, state, data_state, ckpt, writer, guard, save: bool = True):
    """Final blocking save when `save` (a no-op if this step is saved already), then release the writers and
    handlers. `data_state`: the iterator state at `step` (an `IteratorSnapshot`)."""
    try:
      if save:
        ckpt.save(step, state, data_state, force=True, blocking=True)
    finally:
      ckpt.close()
      writer.close()
      guard.uninstall()

  # -- reliability hooks (shared by every mode's loop) ---------------------------------------------
  def checkpointer(self, state) -> ckpt_lib.Checkpointer:
    """The run's Checkpointer: without the frozen base (fingerprinted) when checkpoint.save_frozen says so."""
    cc = self.cfg.checkpoint
    save_frozen = cc.save_frozen == "always" or (cc.save_frozen == "auto" and not cc.init_from)
    fp = ckpt_lib.frozen_fingerprint(state.frozen, cc.init_from, None if cc.init_from else self.cfg.train.seed)
    return ckpt_lib.Checkpointer(self.workdir, cc, config=self.saved_config(), save_frozen=save_frozen, fingerprint=fp)

  def resume(self, ckpt, state, data):
    """Restore the newest readable checkpoint onto `state`'s shardings (frozen params kept from `state` when
    the checkpoint has none) and trim metrics.jsonl to it. Returns the state."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    restored = ckpt.restore_latest(
      ckpt_lib.abstract_with_shardings(state, shardings), data.iterator, frozen=state.frozen
    )
    if restored is None:
      return state
    state = restored[0]
    if jax.process_index() == 0:
      dropped = wd.trim_metrics(self.workdir, int(state.step))
      if dropped:
        logging.info("metrics.jsonl: dropped %d records after the resumed step", dropped)
    logging.info("resumed at step %d", int(state.step))
    return state

  def next_micro_batches(self, data, k: int):
    """k micro-batches, or None when the data has ended (on any process: all processes agree, so none is
    left waiting in a collective)."""
    try:
      micro, ended = [next(data) for _ in range(k)], False
    except StopIteration:
      micro, ended = None, True
    if jax.process_count() > 1 and self.cfg.data.num_epochs > 0:
      from jax.experimental import multihost_utils

      ended = bool(np.any(multihost_utils.process_allgather(np.int32(ended))))
    return None if ended else micro

  # -- loop --------------------------------------------------------------------------------------
  def build_state(self):
    cfg = self.cfg
    rng = jax.random.PRNGKey(cfg.train.seed)
    k_params, k_lora, k_state = jax.random.split(rng, 3)
    params, shardings = self.init_params(k_params)
    params, shardings = self.add_lora(params, shardings, k_lora)
    mask = self.trainable_mask(params)
    tx = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
    create = jax.jit(
      lambda p, r: optim.TrainState.create(p, mask, tx, r),
      out_shardings=train_state_shardings(params, shardings, mask, tx, self.mesh),
    )
    state = create(params, k_state)
    return state

  def next_batch(self, data, state, step: int) -> tuple[Any, dict] | None:
    """The global batch of optimizer step `step` (k = grad_accum_steps micro-batches) and host-side metrics
    of producing it; `"tokens"` in them counts the batch's non-PAD tokens (for tokens/s). None when the data
    has ended (on every process alike: see `next_micro_batches`)."""
    micro = self.next_micro_batches(data, self.cfg.optim.grad_accum_steps)
    if micro is None:
      return None
    tokens = int(sum((b["input_ids"] != data.pad_id).sum() for b in micro)) * jax.process_count()
    return self.global_batch(micro), {"tokens": tokens}

  def compile_step(self, jitted, state, batch, extra):
    """The step's executable. Multi-process: processes finish compiling at different times, and gloo (CPU
    collectives) gives a peer only 30 s to join a new communicator: compile ahead of time, then line up."""
    if jax.process_count() == 1:
      return jitted
    return distributed.compile_and_meet(jitted, state, batch, *extra, name="pipo_jax.trainer: train step compiled")

  def run_step(self, step_fn, state, batch, extra, info: dict):
    """One optimizer step (dispatched, not waited for); a mode may add host metrics to `info`."""
    return step_fn(state, batch, *extra)

  def train(self) -> dict | None:
    data = self.data_pipeline()
    cfg = self.cfg  # may now name the generated data
    from pipo_jax.data.pipeline import check_data_end

    check_data_end(
      data.steps_available(cfg.optim.grad_accum_steps),
      cfg.train.num_steps,
      f"data.train_path={cfg.data.train_path} x data.num_epochs={cfg.data.num_epochs} at data.batch_size="
      f"{cfg.data.batch_size} x optim.grad_accum_steps={cfg.optim.grad_accum_steps}",
    )
    state = self.build_state()
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    ckpt = self.checkpointer(state)
    state = self.resume(ckpt, state, data)
    schedule = optim.make_schedule(cfg.optim, cfg.train.num_steps)
    extra = self.step_inputs()  # before loss_fn: OPD's loss needs the teacher's config
    step_fn = optim.make_train_step(self.loss_fn(), cfg.optim.grad_accum_steps, schedule)
    with sharding.use_rules(self.mesh):
      jitted = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, None))
    flops = self.step_flops(state)
    logging.info(
      "matmul FLOPs per optimizer step: %.4g (forward %.4g, backward %.4g; %.4g recomputed, not counted in mfu)",
      flops.total,
      flops.forward,
      flops.backward,
      flops.recompute,
    )
    writer = metrics_lib.MetricsWriter(self.workdir, cfg.train.num_steps, flops.total, self.peak_flops())
    guard = ckpt_lib.PreemptionGuard().install()
    step = int(state.step)
    end = cfg.train.num_steps
    if cfg.train.stop_after_steps > 0:
      end = min(end, step + cfg.train.stop_after_steps)
    last, tokens, since_log = None, 0, []
    compiled = None
    nonfinite = guards.NonFiniteCounter(cfg.train.max_nonfinite_steps)
    data_at_step = ckpt_lib.IteratorSnapshot(data.iterator.get_state())  # saves never run ahead of the model
    finished = False  # True: leave with a final save (end, data end, SIGTERM, Ctrl-C); False: an error, no save
    t0 = time.time()
    try:
      while step < end:
        with sharding.use_rules(self.mesh):
          got = self.next_batch(data, state, step)
          if got is None:
            logging.warning(
              "the data ended after step %d (of train.num_steps=%d): stopping there", step, cfg.train.num_steps
            )
            break
          batch, info = got
          tokens += info.pop("tokens")
          if compiled is None:
            compiled = self.compile_step(jitted, state, batch, extra)
          state, m = self.run_step(compiled, state, batch, extra, info)
        since_log.append(info)
        step += 1
        data_at_step = ckpt_lib.IteratorSnapshot(data.iterator.get_state())
        if nonfinite.update(step, m["nonfinite"], ckpt.latest_step):
          logging.warning(
            "step %d: non-finite loss or gradient norm: update skipped (%d so far)", step, nonfinite.skipped
          )
        if step % cfg.train.log_every == 0 or step == end or step == 1:
          m = self.host_metrics(m, data)
          m.update(_mean_dicts(since_log))
          m["skipped_nonfinite"] = nonfinite.skipped
          last = writer.log_progress(step, m, tokens)
          tokens, since_log = 0, []
        ckpt.save(step, state, data_at_step)
        if guard.should_stop(step):
          logging.warning("stop requested (SIGTERM): saving step %d and exiting", step)
          break
      finished = True
    except KeyboardInterrupt:
      finished = True  # a Ctrl-C is a preemption: state, step and data_at_step are those of the last whole step
      raise
    finally:
      self.close_run(step, state, data_at_step, ckpt, writer, guard, save=finished)
    logging.info("finished at step %d in %.1fs", step, time.time() - t0)
    return last


def _mean_dicts(ds: list) -> dict:
  """Key-wise mean of the host metrics of the steps since the last log line (keys absent in some: skipped)."""
  keys = set().union(*ds) if ds else set()
  return {k: float(np.mean([d[k] for d in ds if k in d])) for k in sorted(keys)}
