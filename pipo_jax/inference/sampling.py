"""Token sampling shared by every decode mode (ar, mtp, mtp_spec, pipo; token1 and token2 alike).

Axis vocabulary: B batch, V vocabulary.

Order of the logit transforms (SGLang's order): ban ids -> presence penalty -> temperature -> top-k ->
top-p (on the top-k-renormalised distribution). Greedy (temperature 0) is the argmax of the penalised,
banned logits. `probs` returns the distribution the sampler draws from (one-hot when greedy), which is
what exact speculative sampling needs for both the target and the draft.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pipo_jax.config import SamplingConfig

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Static (hashable) sampling settings; part of the jit cache key.

  temperature 0 = greedy; top_k 0 = off; top_p 1 = off; presence_penalty subtracts a constant from the
  logit of every token already emitted in this completion (PAD is never recorded, so never penalised).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  presence_penalty: float = 0.0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0

  @property
  def uses_presence(self) -> bool:
    """Whether sampling reads the emitted-token sets (the decode loops track them only then)."""
    return self.presence_penalty != 0.0

  @classmethod
  def from_config(cls, cfg: SamplingConfig) -> SamplingParams:
    return cls(float(cfg.temperature), int(cfg.top_k), float(cfg.top_p), float(cfg.presence_penalty))

  def validate(self) -> SamplingParams:
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}: expected >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}: expected in (0, 1]")
    return self


GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0)  # the fallback of the tools that draw k samples per prompt


def resolve(generation: dict, fallback: SamplingParams, **flag_values) -> SamplingParams:
  """The effective sampling settings: each field's flag when given (not None), else generation_config.json's
  value (`generation`, as `loading.read_generation_config` returns it), else `fallback`'s."""
  picked = {}
  for field in dataclasses.fields(SamplingParams):
    flag = flag_values.pop(field.name, None)
    value = flag if flag is not None else generation.get(field.name, getattr(fallback, field.name))
    picked[field.name] = type(getattr(fallback, field.name))(value)
  if flag_values:
    raise TypeError(f"not sampling settings: {sorted(flag_values)}")
  return SamplingParams(**picked).validate()


def describe(sp: SamplingParams, generation: dict) -> str:
  """One log line with the effective values and where the defaults came from."""
  source = "generation_config.json" if any(f.name in generation for f in dataclasses.fields(sp)) else "built-in"
  return (
    f"sampling: temperature={sp.temperature:g} top_k={sp.top_k} top_p={sp.top_p:g} "
    f"presence_penalty={sp.presence_penalty:g} (flags over {source} defaults)"
  )


def _base_logits(
  logits_BV: jax.Array, sp: SamplingParams, presence_BV: jax.Array | None, ban_id: int | None
) -> jax.Array:
  x = logits_BV.astype(jnp.float32)
  if ban_id is not None:
    x = x.at[:, ban_id].set(_NEG)
  if sp.presence_penalty != 0.0 and presence_BV is not None:
    x = x - sp.presence_penalty * presence_BV.astype(jnp.float32)
  return x


def _top_k_top_p(x_BV: jax.Array, k: int, p: float) -> jax.Array:
  """Mask (to -inf) everything outside the top-k, then outside the top-p nucleus of what is left."""
  V = x_BV.shape[-1]
  use_k = 0 < k < V
  if not use_k and p >= 1.0:
    return x_BV
  # Only the kept head of the sorted logits is needed: top_k is far cheaper than a full sort when k << V.
  vals_BK = jax.lax.top_k(x_BV, k)[0] if use_k else -jnp.sort(-x_BV, axis=-1)
  if p < 1.0:
    pr_BK = jax.nn.softmax(vals_BK, axis=-1)
    mass_before_BK = jnp.cumsum(pr_BK, axis=-1) - pr_BK
    n_keep_B = jnp.maximum(jnp.sum(mass_before_BK < p, axis=-1), 1)  # the top token is always kept
  else:
    n_keep_B = jnp.full(x_BV.shape[:1], vals_BK.shape[-1])
  thresh_B1 = jnp.take_along_axis(vals_BK, (n_keep_B - 1)[:, None], axis=-1)
  return jnp.where(x_BV >= thresh_B1, x_BV, _NEG)


def adjusted_logits(
  logits_BV: jax.Array, sp: SamplingParams, presence_BV: jax.Array | None = None, ban_id: int | None = None
) -> jax.Array:
  """fp32 [B, V] logits whose softmax is the sampling distribution (temperature > 0 only)."""
  x = _base_logits(logits_BV, sp, presence_BV, ban_id) / sp.temperature
  return _top_k_top_p(x, sp.top_k, sp.top_p)


def probs(
  logits_BV: jax.Array, sp: SamplingParams, presence_BV: jax.Array | None = None, ban_id: int | None = None
) -> jax.Array:
  """The distribution `sample` draws from, fp32 [B, V] (one-hot of the argmax when greedy)."""
  if sp.greedy:
    top_B = jnp.argmax(_base_logits(logits_BV, sp, presence_BV, ban_id), axis=-1)
    return jax.nn.one_hot(top_B, logits_BV.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(adjusted_logits(logits_BV, sp, presence_BV, ban_id), axis=-1)


def sample(
  key: jax.Array,
  logits_BV: jax.Array,
  sp: SamplingParams,
  presence_BV: jax.Array | None = None,
  ban_id: int | None = None,
) -> jax.Array:
  """Token ids int32 [B]. `key` is unused when greedy."""
  if sp.greedy:
    return jnp.argmax(_base_logits(logits_BV, sp, presence_BV, ban_id), axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, adjusted_logits(logits_BV, sp, presence_BV, ban_id), axis=-1).astype(jnp.int32)


def sample_from_probs(key: jax.Array, p_BV: jax.Array, greedy: bool) -> jax.Array:
  """Draw from an explicit distribution [B, V] (argmax when greedy, so one-hot inputs give their index)."""
  if greedy:
    return jnp.argmax(p_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, jnp.log(jnp.maximum(p_BV, 0.0)), axis=-1).astype(jnp.int32)


def split_keys(rng: jax.Array, n: int, needed: bool) -> tuple:
  """(next rng, n keys) for one decode step. Split only when a key is used (sampling, a random control): a
  greedy loop carries its key unchanged and skips the threefry work every step."""
  if not needed:
    return (rng,) * (n + 1)
  return tuple(jax.random.split(rng, n + 1))
