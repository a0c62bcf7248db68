"""Decoding modes against independent references (full forwards, the compressed training forward, exact
distributions). One tiny model (vocab 16, LM head scaled up so distributions are peaked and ties rare) is
shared by every test so that the number of compilations stays small.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

from pipo_jax.config import ModelConfig, resolve_model_config
from pipo_jax.inference import common, pipo_decode
from pipo_jax.inference.api import _Static, generate, left_pad, stop_id_array
from pipo_jax.inference.sampling import SamplingParams
from pipo_jax.models.pipo import PipoModel, init_pipo_params
from pipo_jax.models.qwen3_5 import Qwen35

V = 16
PAD = 1
GREEDY = SamplingParams()
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 13, 14, 15, 2]]  # mixed lengths, bucket 6
BUCKET = 6
CHI2_ALPHA = 1e-3  # significance level of the distribution tests


@pytest.fixture(scope="module")
def model():
  cfg = resolve_model_config(ModelConfig(preset="tiny", vocab_size=V))
  params = init_pipo_params(cfg, jax.random.PRNGKey(0))
  # Peaked distributions: logits std ~2 instead of ~0.15 at random init.
  params["backbone"]["lm_head"]["kernel"] = params["backbone"]["lm_head"]["kernel"] * 15.0
  return cfg, params


def full_logits(cfg, params, ids_BT):
  """Reference: uncompressed full forward without a cache, fp32 logits [B, T, V]."""
  return np.asarray(_full_logits(params, jnp.asarray(ids_BT), cfg_key=_Static(cfg)), np.float64)


@functools.partial(jax.jit, static_argnames=("cfg_key",))
def _full_logits(params, ids_BT, *, cfg_key):
  m = Qwen35(cfg_key.obj)
  p = {"params": params["backbone"]}
  B, T = ids_BT.shape
  h, _ = m.apply(p, m.apply(p, ids_BT, method=Qwen35.embed), jnp.broadcast_to(jnp.arange(T), (B, T)))
  return m.apply(p, h, method=Qwen35.logits).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg_key",))
def _training_forward(params, ids_BT, *, cfg_key):
  """Reference: the compressed teacher-forced training forward -> (logits1, logits2, conf) over its slots."""
  m = PipoModel(cfg_key.obj)
  v = {"params": params}
  out = m.apply(v, ids_BT)
  return (
    m.apply(v, out["h_BJD"], method=PipoModel.logits),
    m.apply(v, out["m_BJD"], method=PipoModel.logits),
    out["conf_logit_BJ"],
  )


@pytest.fixture(scope="module")
def ar_greedy(model):
  cfg, params = model
  ids, valid = left_pad(PROMPTS, BUCKET, PAD)
  return generate(params, cfg, ids, valid, mode="ar", max_new_tokens=8, stop_ids=[])


def test_ar_greedy_teacher_forced_and_batch_independent(model, ar_greedy):
  cfg, params = model
  toks = np.asarray(ar_greedy.tokens)
  assert np.all(np.asarray(ar_greedy.num_tokens) == 8)
  # Right-padded to one length (one compilation): causal layers make the padding invisible to earlier positions.
  seqs = [prompt + toks[b].tolist() for b, prompt in enumerate(PROMPTS)]
  width = max(map(len, seqs))
  lg = full_logits(cfg, params, jnp.asarray([q + [PAD] * (width - len(q)) for q in seqs]))
  for b, prompt in enumerate(PROMPTS):
    n = len(prompt)
    np.testing.assert_array_equal(lg[b, n - 1 : n + 7].argmax(-1), toks[b])
  # Rows are independent: each prompt alone (replicated over the batch, so no other prompt length is present
  # and the compiled function is reused) gives the same tokens as in the mixed-length batch.
  for b, prompt in enumerate(PROMPTS):
    ids, valid = left_pad([prompt] * len(PROMPTS), BUCKET, PAD)
    one = generate(params, cfg, ids, valid, mode="ar", max_new_tokens=8, stop_ids=[])
    np.testing.assert_array_equal(np.asarray(one.tokens), np.tile(toks[b], (len(PROMPTS), 1)))


def test_ar_stops_at_stop_id(model, ar_greedy):
  cfg, params = model
  row = np.asarray(ar_greedy.tokens)[0].tolist()
  i = next(i for i in range(1, 8) if row[i] not in row[:i])
  ids, valid = left_pad(PROMPTS, BUCKET, PAD)
  res = generate(params, cfg, ids, valid, mode="ar", max_new_tokens=8, stop_ids=[row[i]])
  assert int(res.num_tokens[0]) == i + 1
  assert np.asarray(res.tokens)[0, : i + 1].tolist() == row[: i + 1]


def test_mtp_spec_greedy_equals_ar(model, ar_greedy):
  cfg, params = model
  ids, valid = left_pad(PROMPTS, BUCKET, PAD)
  res = generate(params, cfg, ids, valid, mode="mtp_spec", max_new_tokens=8, stop_ids=[])
  np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ar_greedy.tokens))
  kept, prop = np.asarray(res.drafts_kept), np.asarray(res.drafts_proposed)
  # Both branches ran (some accepted drafts, some rejected ones rolled back), so the equality covers both.
  assert kept.sum() > 0 and (prop - kept).sum() > 0, (kept, prop)
  assert np.all(np.asarray(res.steps) + kept >= 8)


def _reference_joint(cfg, params, prompt, sp: SamplingParams):
  """Exact P(t1, t2) [V, V] of the first two sampled tokens, from full forwards and a numpy sampler."""

  def dist(lg, penal):
    x = (lg - sp.presence_penalty * penal) / sp.temperature
    order = np.argsort(-x)
    keep = np.zeros(V, bool)
    keep[order[: sp.top_k]] = True
    x = np.where(keep, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    ps = p[order]
    before = np.cumsum(ps) - ps
    nucleus = np.zeros(V, bool)
    nucleus[order[before < sp.top_p]] = True
    p = np.where(nucleus, p, 0.0)
    return p / p.sum()

  p1 = dist(full_logits(cfg, params, jnp.asarray([prompt]))[0, -1], np.zeros(V))
  seqs = jnp.asarray([prompt + [t] for t in range(V)])
  lg2 = full_logits(cfg, params, seqs)[:, -1]
  return np.stack([p1[t] * dist(lg2[t], np.eye(V)[t]) for t in range(V)])


def _chi2_pvalue(counts, probs):
  """Pearson goodness of fit; cells with expected count < 5 pooled into one."""
  n = counts.sum()
  exp = probs * n
  small = exp < 5
  obs_c = np.append(counts[~small], counts[small].sum())
  exp_c = np.append(exp[~small], exp[small].sum())
  if exp_c[-1] == 0:
    obs_c, exp_c = obs_c[:-1], exp_c[:-1]
  assert obs_c.sum() == n and np.all(exp_c > 0), "samples fell in cells of probability 0"
  stat = float(((obs_c - exp_c) ** 2 / exp_c).sum())
  df = len(exp_c) - 1
  return stat, df, float(gammaincc(df / 2.0, stat / 2.0))


# mtp_spec only: its samples are compared with the exact *ar* distribution computed by an independent numpy
# sampler over full-forward logits, which checks the sampler and the speculative rule together (an ar run
# of the same test passes too, p = 0.96; it is left out to save a compilation).
@pytest.mark.parametrize("mode", ["mtp_spec"])
def test_sampled_first_two_tokens_match_exact_distribution(model, mode):
  cfg, params = model
  sp = SamplingParams(temperature=0.8, top_k=10, top_p=0.95, presence_penalty=0.7)
  prompt = [5, 6, 7, 8]
  joint = _reference_joint(cfg, params, prompt, sp)
  B = 2048
  ids, valid = left_pad([prompt] * B, 4, PAD)
  counts = np.zeros((V, V))
  accepted = 0
  for seed in range(2):
    res = generate(
      params, cfg, ids, valid, mode=mode, sampling=sp, max_new_tokens=2, rng=jax.random.PRNGKey(100 + seed), stop_ids=[]
    )
    t = np.asarray(res.tokens)
    np.add.at(counts, (t[:, 0], t[:, 1]), 1)
    accepted += int(np.asarray(res.drafts_kept).sum())
  stat, df, p = _chi2_pvalue(counts.ravel(), joint.ravel())
  print(f"{mode}: chi2={stat:.1f} df={df} p={p:.3f} drafts accepted {accepted}/{2 * B}")
  assert p > CHI2_ALPHA, (stat, df, p)
  if mode == "mtp_spec":  # both the accept and the residual-resampling branch were exercised
    assert 0 < accepted < 2 * B


# -- pipo ---------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg_key", "max_new"))
def _pipo_forced(params, ids, valid, forced, *, cfg_key, max_new):
  cfg = cfg_key.obj
  stop = jnp.asarray([-1], jnp.int32)
  tau = jnp.float32(-1.0)
  st = pipo_decode.pipo_prefill(
    cfg, params, ids, valid, stop, jax.random.PRNGKey(0), tau, sp=GREEDY, max_new=max_new, forced_BN=forced, trace=True
  )
  st = pipo_decode.pipo_decode(cfg, params, st, stop, tau, sp=GREEDY, max_new=max_new)
  return st["trace"], common.finalize(st["out"], max_new, cfg.pad_token_id)["raw"]


def test_pipo_teacher_forced_logits_equal_training_forward(model):
  cfg, params = model
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]]  # odd (parity PAD) and even, left-padded to 8
  K = 5  # output pairs (prefill + 4 decode steps)
  rng = np.random.default_rng(0)
  M = 2 * K  # max_new_tokens: the budget (non-PAD tokens) must outlast K pairs
  forced = rng.integers(2, V, size=(2, 2 * M))
  forced[:, 3] = PAD  # a gated token2 fed back as a real input
  forced[1, 7] = PAD
  ids, valid = left_pad(prompts, 8, PAD)
  trace, raw = _pipo_forced(
    params, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(forced, jnp.int32), cfg_key=_Static(cfg), max_new=M
  )
  np.testing.assert_array_equal(np.asarray(raw)[:, : 2 * K], forced[:, : 2 * K])
  worst = 0.0
  seqs = [prompt + [PAD] * (len(prompt) % 2) + forced[b, : 2 * K].tolist() for b, prompt in enumerate(prompts)]
  width = max(map(len, seqs))  # right-padded (with whole pairs) to one length: causal, so invisible
  lg1_all, lg2_all, conf_all = _training_forward(
    params, jnp.asarray([q + [PAD] * (width - len(q)) for q in seqs]), cfg_key=_Static(cfg)
  )
  for b, prompt in enumerate(prompts):
    Lp = (len(prompt) + 1) // 2
    lg1, lg2, conf = lg1_all[b], lg2_all[b], conf_all[b]
    for name, ref, got in [
      ("logits1", lg1, trace["logits1"][b]),
      ("logits2", lg2, trace["logits2"][b]),
      ("conf", conf, trace["conf"][b]),
    ]:
      got = np.asarray(got)[:K]
      ref = np.asarray(ref)[Lp - 1 : Lp - 1 + K]
      diff = float(np.max(np.abs(ref - np.asarray(got))))
      worst = max(worst, diff)
      assert diff <= 1e-4, (b, name, diff)
  print(f"pipo teacher-forced max |diff| = {worst:.2e}")


@pytest.fixture(scope="module")
def pipo_run(model):
  cfg, params = model
  ids, valid = left_pad(PROMPTS, BUCKET, PAD)

  def run(tau, stop_ids=(), max_new=8):
    return generate(
      params, cfg, ids, valid, mode="pipo", conf_threshold=tau, max_new_tokens=max_new, stop_ids=list(stop_ids)
    )

  return run


def test_pipo_threshold_extremes(pipo_run):
  never = pipo_run(1.0)
  raw, rlen = np.asarray(never.raw), np.asarray(never.raw_len)
  assert int(never.phase2_runs) == 0
  assert np.all(np.asarray(never.drafts_proposed) == 0)
  for b in range(raw.shape[0]):
    assert np.all(raw[b, 1 : rlen[b] : 2] == PAD) and np.all(raw[b, 0 : rlen[b] : 2] != PAD)
  # max_new_tokens counts non-PAD tokens: 8 tokens in 15 slots (the last token2 is not reached)
  assert np.all(np.asarray(never.tokens_emitted) == 8) and np.all(rlen == 15)
  np.testing.assert_allclose(np.asarray(never.pad_ratio), 7 / 15, rtol=1e-6)

  always = pipo_run(-1.0)
  raw, rlen = np.asarray(always.raw), np.asarray(always.raw_len)
  assert np.all(np.asarray(always.raw_is_pad) == False)  # noqa: E712
  assert all(np.all(raw[b, : rlen[b]] != PAD) for b in range(raw.shape[0]))
  assert np.all(rlen == 8) and np.all(np.asarray(always.steps) == 4)
  assert int(always.phase2_runs) == 4  # prefill + 3 decode steps, batched
  np.testing.assert_array_equal(always.drafts_kept, always.drafts_proposed)
  # tau <= 0 runs the token loop without the confidence head; the gated loop (tau just above 0), whose gate
  # keeps every draft here, must emit the same stream.
  gated = pipo_run(1e-30)
  np.testing.assert_array_equal(gated.drafts_kept, gated.drafts_proposed)
  np.testing.assert_array_equal(np.asarray(gated.raw), raw)
  # Same greedy token1 stream at step 0 whatever tau (phase 1 at prefill does not depend on tau).
  np.testing.assert_array_equal(np.asarray(never.raw)[:, 0], raw[:, 0])


def test_pipo_stop_ids(pipo_run, model):
  cfg, _ = model
  base = pipo_run(-1.0)
  R = np.asarray(base.raw)[0, : int(base.raw_len[0])].tolist()
  assert len(R) == 8
  # at prefill: token1 is a stop id -> one token, token2 dropped
  res = pipo_run(-1.0, [R[0]])
  assert int(res.raw_len[0]) == 1 and np.asarray(res.tokens)[0, :1].tolist() == R[:1]
  assert int(res.steps[0]) == 1
  first_new = [i for i in range(1, 8) if R[i] not in R[:i]]
  i2 = next(i for i in first_new if i % 2 == 1)  # as token2: kept, sequence ends
  res = pipo_run(-1.0, [R[i2]])
  assert int(res.num_tokens[0]) == i2 + 1 and np.asarray(res.tokens)[0, : i2 + 1].tolist() == R[: i2 + 1]
  i1 = next(i for i in first_new if i % 2 == 0)  # as token1 after the prefill: token2 dropped
  res = pipo_run(-1.0, [R[i1]])
  assert int(res.raw_len[0]) == i1 + 1 and np.asarray(res.tokens)[0, : i1 + 1].tolist() == R[: i1 + 1]
  # PAD is never a stop id in pipo mode (it is a no-op token2), even when it is the config's EOS.
  assert cfg.eos_token_id == PAD and stop_id_array(cfg, "pipo", None).tolist() == [-1]


def test_decode_layout_equals_the_scanned_layers(model, pipo_run):
  """generate on CPU runs the layers split per repeat (common.decode_layout); the programs on the stacked params
  (the scan, as a TPU runs them) must emit the same pipo stream with the same confidences' gating."""
  from pipo_jax.inference import api
  from pipo_jax.inference import common as C

  cfg, params = model
  assert "layers_by_repeat" in api.params_for_backend(cfg, params)["backbone"]  # CPU: the decode layout
  assert "layers_by_repeat" not in params["backbone"]
  ids, valid = left_pad(PROMPTS, BUCKET, PAD)
  stop, tau = stop_id_array(cfg, "pipo", []), jnp.float32(0.5)
  kw = dict(config=_Static(cfg), mode="pipo", sp=GREEDY, max_new=8)
  args = (jnp.asarray(ids), jnp.asarray(valid), stop, jax.random.PRNGKey(0), tau)
  scanned = api.decode_fn(params, api.prefill_fn(params, *args, **kw), stop, tau, **kw)
  split = C.decode_layout(cfg, params)
  unrolled = api.decode_fn(split, api.prefill_fn(split, *args, **kw), stop, tau, **kw)
  np.testing.assert_array_equal(np.asarray(unrolled.raw), np.asarray(scanned.raw))
  np.testing.assert_array_equal(np.asarray(unrolled.raw_is_pad), np.asarray(scanned.raw_is_pad))
  # the gate both kept and dropped drafts
  assert int(np.asarray(scanned.drafts_kept).sum()) > 0 and int(np.asarray(scanned.raw_is_pad).sum()) > 0
  np.testing.assert_array_equal(np.asarray(pipo_run(0.5).raw), np.asarray(scanned.raw))
