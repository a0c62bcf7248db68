"""Public generation API used by the CLIs, OPD rollouts and evaluation.

    result = generate(params, config, prompt_ids_BT, prompt_valid_BT, mode="pipo", sampling=SamplingParams(),
                      conf_threshold=0.95, max_new_tokens=256, rng=jax.random.PRNGKey(0))

Axis vocabulary: B batch, T prompt bucket (left-padded), M = max_new_tokens, N raw output slots.

Everything from the prompt to the last token runs in one jitted function (token loop in `lax.while_loop`,
no host round trip per token). Compiled functions are cached per (config, mode, sampling, B, T, M, ...);
the threshold, stop ids, prompts, params and the RNG key are traced, so sweeping tau does not recompile.

`max_new_tokens` counts emitted non-PAD tokens in every mode; a row stops at its first stop id (kept in
`tokens`) or when it has emitted max_new_tokens tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pipo_jax.config import ModelConfig
from pipo_jax.inference import ar as ar_lib
from pipo_jax.inference import common as C
from pipo_jax.inference import pipo_decode as pipo_lib
from pipo_jax.inference import spec as spec_lib
from pipo_jax.inference.sampling import SamplingParams

MODES = ("ar", "mtp", "mtp_spec", "pipo")


class GenerateResult(NamedTuple):
  """A pytree of arrays (per row b).

  tokens [B, M] int32       emitted tokens, PAD slots removed, left-aligned; entries >= num_tokens[b] are PAD id
  num_tokens [B]            = tokens_emitted
  raw [B, N] int32          every output slot in order, PAD slots included (pipo: token1, token2-or-PAD, ...;
                            what OPD rollouts need); N = 2M for pipo, M otherwise; entries >= raw_len are PAD id
  raw_is_pad [B, N] bool    which raw slots are PAD slots (a rejected/skipped token2, or a PAD drawn as token2)
  raw_len [B]               raw slots written
  steps [B]                 model steps that emitted for the row, prefill included
  tokens_emitted [B]        non-PAD tokens emitted
  drafts_proposed [B]       second tokens drafted (mtp / mtp_spec / pipo phase 2 runs for the row)
  drafts_kept [B]           drafts emitted (mtp: all; mtp_spec: accepted; pipo: non-PAD token2)
  pad_ratio [B] float32     PAD slots / all raw slots
  phase2_runs [] int32      pipo only: executions of phase 2 (batched; the prefill's counts as one)
  """

  tokens: jax.Array
  num_tokens: jax.Array
  raw: jax.Array
  raw_is_pad: jax.Array
  raw_len: jax.Array
  steps: jax.Array
  tokens_emitted: jax.Array
  drafts_proposed: jax.Array
  drafts_kept: jax.Array
  pad_ratio: jax.Array
  phase2_runs: jax.Array


def _check_mode(mode: str, config: ModelConfig):
  if mode not in MODES:
    raise ValueError(f"decode mode {mode!r}: expected one of {MODES}")
  if mode != "ar" and not config.mtp_num_hidden_layers:
    raise ValueError(f"decode mode {mode!r} needs the MTP head, but config.mtp_num_hidden_layers=0")
  if mode == "pipo" and config.pad_token_id is None:
    raise ValueError("decode mode 'pipo' needs config.pad_token_id (the PAD written as a rejected token2)")


def stop_id_array(config: ModelConfig, mode: str, stop_ids: Sequence[int] | None) -> jax.Array:
  """int32 [E] stop ids: `stop_ids`, default (config.eos_token_id,). In pipo mode PAD is removed (a PAD is
  a no-op token2 there, and Qwen3.5's eos_token_id is the PAD id). Padded with -1 to at least one entry."""
  ids = [config.eos_token_id] if stop_ids is None else list(stop_ids)
  ids = [int(i) for i in ids if i is not None and int(i) >= 0]
  if mode == "pipo":
    ids = [i for i in ids if i != config.pad_token_id]
  return jnp.asarray(sorted(set(ids)) or [-1], jnp.int32)


class _Static:
  """Hashable wrapper for a (mutable, unhashable) config dataclass passed as a static jit argument."""

  def __init__(self, obj):
    self.obj, self._key = obj, repr(obj)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key == other._key


def params_for_backend(config: ModelConfig, params: dict) -> dict:
  """The params layout the decode programs run fastest with on the default backend: on CPU the layers split
  per repeat once (common.decode_layout); elsewhere unchanged (the TPU reads a stacked layer's slice in place).
  It copies the backbone weights, so a caller that generates batch after batch converts once and passes the
  result (generate leaves params already in this layout as they are)."""
  return C.decode_layout(config, params) if jax.default_backend() == "cpu" else params


def _finish(state, max_new, pad_id, phase2_runs=None):
  return GenerateResult(**C.finalize(state["out"], max_new, pad_id, phase2_runs))


# -- jitted pieces, cached per static shape (jax.jit caches by static args and input shapes) ---------------


@functools.partial(jax.jit, static_argnames=("config", "mode", "sp", "max_new"))
def prefill_fn(params, ids_BT, valid_BT, stop_ids_E, rng, tau, random_pad=None, *, config, mode, sp, max_new):
  """The prompt pass and first output step(s); returns the loop state (for timing TTFT separately)."""
  kw = dict(sp=sp, max_new=max_new)
  config = config.obj
  if mode == "ar":
    return ar_lib.ar_prefill(config, params, ids_BT, valid_BT, stop_ids_E, rng, **kw)
  if mode == "mtp":
    return ar_lib.mtp_prefill(config, params, ids_BT, valid_BT, stop_ids_E, rng, **kw)
  if mode == "mtp_spec":
    return spec_lib.spec_prefill(config, params, ids_BT, valid_BT, stop_ids_E, rng, **kw)
  return pipo_lib.pipo_prefill(config, params, ids_BT, valid_BT, stop_ids_E, rng, tau, random_pad=random_pad, **kw)


@functools.partial(jax.jit, static_argnames=("config", "mode", "sp", "max_new"))
def decode_fn(params, state, stop_ids_E, tau, random_pad=None, *, config, mode, sp, max_new):
  """The token loop from a prefill state to the end; returns GenerateResult."""
  kw = dict(sp=sp, max_new=max_new)
  config = config.obj
  if mode == "ar":
    state = ar_lib.ar_decode(config, params, state, stop_ids_E, **kw)
  elif mode == "mtp":
    state = ar_lib.mtp_decode(config, params, state, stop_ids_E, **kw)
  elif mode == "mtp_spec":
    state = spec_lib.spec_decode(config, params, state, stop_ids_E, **kw)
  else:
    state = pipo_lib.pipo_decode(config, params, state, stop_ids_E, tau, random_pad=random_pad, **kw)
    return _finish(state, max_new, config.pad_token_id, state["phase2_runs"])
  return _finish(state, max_new, config.pad_token_id or 0)


@functools.partial(jax.jit, static_argnames=("config", "mode", "sp", "max_new"))
def _generate_jit(params, ids_BT, valid_BT, stop_ids_E, rng, tau, random_pad=None, *, config, mode, sp, max_new):
  state = prefill_fn.__wrapped__(
    params, ids_BT, valid_BT, stop_ids_E, rng, tau, random_pad, config=config, mode=mode, sp=sp, max_new=max_new
  )
  return decode_fn.__wrapped__(
    params, state, stop_ids_E, tau, random_pad, config=config, mode=mode, sp=sp, max_new=max_new
  )


def generate(
  params: dict,
  config: ModelConfig,
  prompt_ids_BT,
  prompt_valid_BT=None,
  mode: str = "pipo",
  sampling: SamplingParams = SamplingParams(),
  conf_threshold: float = 0.95,
  max_new_tokens: int = 256,
  rng: jax.Array | None = None,
  stop_ids: Sequence[int] | None = None,
  random_pad_ratio: float | None = None,
) -> GenerateResult:
  """Generate for a batch of left-padded prompts.

  params: full PIPO params tree; prompt_ids_BT int [B, T] left-padded to a fixed bucket T;
  prompt_valid_BT bool [B, T] (None: all valid); mode: ar | mtp | mtp_spec | pipo; conf_threshold: pipo's
  tau (< 0 keep every token2, >= 1 no phase 2); max_new_tokens: emitted non-PAD tokens per row (static);
  rng: PRNG key (ignored when greedy); stop_ids: default (config.eos_token_id,).
  random_pad_ratio (pipo only): the random-PAD control: token2 becomes PAD with this probability by an
  independent coin flip per step, ignoring the confidence (conf_threshold is then unused); None = the gate.
  """
  _check_mode(mode, config)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
  ids = jnp.asarray(prompt_ids_BT, jnp.int32)
  valid = jnp.ones(ids.shape, bool) if prompt_valid_BT is None else jnp.asarray(prompt_valid_BT, bool)
  if not bool(np.all(np.asarray(valid)[:, -1])):
    raise ValueError("prompts must be left-padded: prompt_valid_BT[:, -1] must be True for every row")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  sp = sampling.validate()
  rpad = None
  if random_pad_ratio is not None:
    if mode != "pipo" or not 0.0 <= random_pad_ratio <= 1.0:
      raise ValueError(f"random_pad_ratio={random_pad_ratio} needs mode='pipo' and a value in [0, 1]")
    rpad = jnp.asarray(random_pad_ratio, jnp.float32)
    conf_threshold = -1.0  # phase 2 always runs; the coin flip alone decides the PADs
  return _generate_jit(
    params_for_backend(config, params),
    ids,
    valid,
    stop_id_array(config, mode, stop_ids),
    rng,
    jnp.asarray(conf_threshold, jnp.float32),
    rpad,
    config=_Static(config),
    mode=mode,
    sp=sp,
    max_new=int(max_new_tokens),
  )


def left_pad(seqs: Sequence[Sequence[int]], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Host helper: token lists -> (ids [B, bucket] int32, valid [B, bucket] bool), left-padded. Raises when a
  prompt is longer than the bucket or empty."""
  B = len(seqs)
  ids = np.full((B, bucket), pad_id, np.int32)
  valid = np.zeros((B, bucket), bool)
  for b, s in enumerate(seqs):
    n = len(s)
    if n == 0 or n > bucket:
      raise ValueError(f"prompt {b} has {n} tokens; expected 1..{bucket} (the prompt bucket)")
    ids[b, bucket - n :] = np.asarray(s, np.int32)
    valid[b, bucket - n :] = True
  return ids, valid


def result_rows(res: GenerateResult) -> list:
  """Host-side per-row dicts: tokens (PAD slots removed), raw (with PADs), stats."""
  r = jax.device_get(res)
  rows = []
  for b in range(r.tokens.shape[0]):
    n, nr = int(r.num_tokens[b]), int(r.raw_len[b])
    rows.append(
      {
        "tokens": r.tokens[b, :n].tolist(),
        "raw": r.raw[b, :nr].tolist(),
        "stats": {
          "steps": int(r.steps[b]),
          "tokens_emitted": n,
          "drafts_proposed": int(r.drafts_proposed[b]),
          "drafts_kept": int(r.drafts_kept[b]),
          "pad_ratio": float(r.pad_ratio[b]),
        },
      }
    )
  return rows
