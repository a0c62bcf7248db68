"""Student rollouts for OPD, their training encoding, and the teacher's weights.

Per OPD micro-batch (`opd.trainer.OPDTrainer` drives it):
  1. prompts: this process's rows of the global prompt batch (PromptPipeline: left-padded generation prompts
     ending in `<think>\n` plus their parity PAD, filtered by opd.min_pass_rate) become one global array, the
     way SFT batches do;
  2. rollout: the pipo decode (`inference.api`) with the student's CURRENT params (LoRA merged by a jitted
     `lora.materialize`), sharded on the training mesh (no weight copy to a server), tau =
     opd.conf_threshold, sampling = opd.sampling; the raw output stream is kept exactly as generated (PAD
     slots included). Every process runs the one global program; each then fetches only its own rows;
  3. `encode_rollouts` (host, per process): prompt || raw stream (|| trailing parity PAD), right-padded to
     the fixed T = opd.prompt_length + 2 * opd.max_new_tokens (at most 2 * max_new_tokens raw slots).
Rollout statistics (tokens, PAD slots, drafts) are reduced over the global batch on device, so every
process sees the same numbers.

Every program here is compiled ahead of its first run and the processes meet at a barrier before running it
(`distributed.compile_and_meet`): gloo (CPU collectives) gives a peer only 30 s to join a communicator.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipo_jax import distributed, sharding
from pipo_jax.config import Config, ModelConfig, OPDConfig
from pipo_jax.data import pairs
from pipo_jax.io import loading
from pipo_jax.models import lora as lora_lib
from pipo_jax.trainer import boxed_params


def rollout_length(opd_cfg: OPDConfig) -> int:
  """Fixed training length T: the prompt bucket plus the largest raw stream (2 slots per emitted token)."""
  return int(opd_cfg.prompt_length + 2 * opd_cfg.max_new_tokens)


def encode_rollouts(prompt_ids_BP, prompt_valid_BP, raw_BN, raw_len_B, pad_id: int, length: int) -> dict:
  """Rollouts -> the OPD training batch (numpy, every array [B, length]; keys `opd.loss.ROLLOUT_KEYS`).

  prompt_ids_BP / prompt_valid_BP: left-padded prompts as given to generate (parity PAD already included,
  so each prompt has even length); raw_BN / raw_len_B: the generated raw stream and its length. The encoding
  is `pairs.encode_rollout_batch` (`docs/method.md#opd`): labels -100 on the prompt and on every PAD.
  """
  prompts = [np.asarray(p)[np.asarray(v, bool)] for p, v in zip(prompt_ids_BP, prompt_valid_BP)]
  responses = [np.asarray(r)[: int(n)] for r, n in zip(raw_BN, raw_len_B)]
  ids, labels, valid = pairs.encode_rollout_batch(prompts, responses, pad_id, length)
  pos = np.arange(length)[None]
  p_len = np.asarray([len(p) + len(p) % 2 for p in prompts])[:, None]
  r_len = np.asarray([len(r) for r in responses])[:, None]
  response = (pos >= p_len) & (pos < p_len + r_len)
  return {
    "input_ids": ids,
    "labels": labels,
    "keep": valid & (ids != pad_id),
    "response": response,
    "fill_allow": response.copy(),
  }


def load_teacher(opd_cfg: OPDConfig, mesh) -> tuple[ModelConfig, dict]:
  """(teacher config, {"backbone": params}) from opd.teacher_checkpoint, placed on the mesh's shardings."""
  if not opd_cfg.teacher_checkpoint:
    raise ValueError("mode=opd needs opd.teacher_checkpoint (an orbax checkpoint or an HF directory)")
  tcfg, params = loading.load_model(opd_cfg.teacher_checkpoint, opd_cfg.teacher, init_heads=False)
  shardings = teacher_shardings(tcfg, mesh)
  return tcfg, sharding.place({"backbone": params["backbone"]}, shardings)


def teacher_shardings(tcfg: ModelConfig, mesh) -> dict:
  """NamedShardings of the teacher's {"backbone": ...} tree (same logical rules as the student)."""
  return {"backbone": sharding.param_shardings(boxed_params(tcfg, "ar")["backbone"], mesh)}


class Rollout:
  """Student rollouts with its current params: `__call__(params, prompts, rng) -> (local batch, stats)`.

  prompts: this process's rows ({"prompt_ids", "prompt_valid"} [b, P], b = global batch / processes).
  Returns the process's rows of the encoded batch (numpy, `encode_rollouts`) and global statistics
  (host floats): rows, tokens (non-PAD emitted), raw_slots, pad_slots, drafts_proposed, drafts_kept, and
  seconds (wall time of the whole call: merge, generation, fetch and encoding).
  """

  def __init__(self, model_cfg: ModelConfig, cfg: Config, mesh, stop_ids):
    from pipo_jax.inference import api
    from pipo_jax.inference.sampling import SamplingParams

    self.api, self.model_cfg, self.opd, self.mesh = api, model_cfg, cfg.opd, mesh
    sp = SamplingParams.from_config(cfg.opd.sampling).validate()
    # `api.generate`'s jitted program itself: generate() checks the prompts on the host, which a global
    # array spread over processes does not allow (done here on this process's rows instead).
    self.static = dict(config=api._Static(model_cfg), mode="pipo", sp=sp, max_new=int(cfg.opd.max_new_tokens))
    # Small inputs as replicated global arrays (from host values, equal on every process): a program spanning
    # processes takes no process-local device array.
    self._rep = NamedSharding(mesh, P())
    self.stop_ids = jax.device_put(np.asarray(api.stop_id_array(model_cfg, "pipo", stop_ids)), self._rep)
    self.tau = jax.device_put(np.asarray(cfg.opd.conf_threshold, np.float32), self._rep)
    lora_cfg = cfg.lora
    # Merge on the fly: one jitted materialize per rollout, so generation sees plain (merged) kernels, in the
    # layout the decode programs run fastest with on this backend (api.params_for_backend: per-repeat layers on
    # CPU, where the scanned decode step copies every weight slice it reads).
    self._merge = jax.jit(lambda p: api.params_for_backend(model_cfg, lora_lib.materialize(p, lora_cfg)))
    rows = sharding.batch_sharding(mesh, 2)
    self._finish = jax.jit(_rollout_outputs, out_shardings=(rows, sharding.batch_sharding(mesh, 1), None))
    self._compiled = {}
    self.length = rollout_length(cfg.opd)

  def _run(self, name, fn, *args, **static):
    """fn(*args) through an ahead-of-time compiled executable, compiled (and met at) on first use."""
    if name not in self._compiled:
      self._compiled[name] = distributed.compile_and_meet(fn, *args, name=f"pipo_jax.opd.rollout: {name}", **static)
    return self._compiled[name](*args)

  def __call__(self, params, prompts: dict, rng) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    pid, pvalid = np.asarray(prompts["prompt_ids"]), np.asarray(prompts["prompt_valid"], bool)
    if not pvalid[:, -1].all():
      raise ValueError("OPD prompts must be left-padded: prompt_valid[:, -1] must be True for every row")
    ids = sharding.shard_batch(pid, self.mesh)
    valid = sharding.shard_batch(pvalid, self.mesh)
    merged = self._run("merge", self._merge, params)
    rng = jax.device_put(
      np.asarray(jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng), self._rep
    )
    res = self._run(
      "generate", self.api._generate_jit, merged, ids, valid, self.stop_ids, rng, self.tau, None, **self.static
    )
    raw, raw_len, totals = distributed.wait_until_ready(self._run("finish", self._finish, res))
    raw, raw_len = multihost_utils.global_array_to_host_local_array(
      (raw, raw_len), self.mesh, (P(("data", "fsdp"), None), P(("data", "fsdp")))
    )
    raw, raw_len = np.asarray(raw), np.asarray(raw_len)
    batch = encode_rollouts(pid, pvalid, raw, raw_len, self.model_cfg.pad_token_id, self.length)
    stats = {k: float(v) for k, v in jax.device_get(totals).items()}
    stats["seconds"] = time.perf_counter() - t0
    return batch, stats


def _rollout_outputs(res):
  """(raw [B, N], raw_len [B], global totals): the raw stream laid out like the batch, and its statistics."""
  inside = jnp.arange(res.raw.shape[1])[None] < res.raw_len[:, None]
  f = lambda x: jnp.sum(x).astype(jnp.float32)
  totals = {
    "rows": jnp.float32(res.raw.shape[0]),
    "tokens": f(res.tokens_emitted),
    "raw_slots": f(res.raw_len),
    "pad_slots": f(res.raw_is_pad & inside),
    "drafts_proposed": f(res.drafts_proposed),
    "drafts_kept": f(res.drafts_kept),
  }
  return res.raw, res.raw_len, totals


def rollout_metrics(stats: list[dict], teacher_s: float) -> dict:
  """One step's rollout metrics from the stats of its micro-batches' rollouts (`Rollout.__call__`)."""
  tot = {k: sum(s[k] for s in stats) for k in stats[0]}
  return {
    "time/rollout_s": tot["seconds"],
    "time/teacher_s": teacher_s,
    "rollout/tokens_per_s": tot["tokens"] / max(tot["seconds"], 1e-9),
    "rollout/mean_length": tot["tokens"] / max(tot["rows"], 1.0),
    "rollout/pad_ratio": tot["pad_slots"] / max(tot["raw_slots"], 1.0),
    "rollout/draft_accept_rate": tot["drafts_kept"] / max(tot["drafts_proposed"], 1.0),
  }
