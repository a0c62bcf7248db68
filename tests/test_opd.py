"""OPD (pipo_jax/opd/loss.py, rollout.py): PAD compaction on real models, confidence targets and their
gradient isolation, and a tiny on-policy run that must lower the reverse KL and improve calibration.

(The divergences against brute force and the estimators are tested in test_opd_math.py.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax import optim, sharding
from pipo_jax.config import (
  Config,
  LoraConfig,
  LossConfig,
  MeshConfig,
  ModelConfig,
  OPDConfig,
  OptimConfig,
  SamplingConfig,
  resolve_model_config,
)
from pipo_jax.models import lora as lora_lib
from pipo_jax.models.pipo import PipoModel, init_pipo_params
from pipo_jax.models.qwen3_5 import Qwen35
from pipo_jax.opd import loss as opd
from pipo_jax.opd import rollout as opd_rollout

PAD = 1
IGN = -100
STUDENT = resolve_model_config(ModelConfig(preset="tiny", compressor_type="mlp_residual"))
# A wider teacher than the student (its own config), same vocabulary.
TEACHER = resolve_model_config(ModelConfig(preset="tiny", hidden_size=96, intermediate_size=192))


def _teacher_params(seed=1, head_scale=5.0):
  """Random teacher backbone; its LM head is scaled up so its distributions are peaked (a student at init is
  near uniform, so the reverse KL starts large and can be learned down)."""
  bb = init_pipo_params(TEACHER, jax.random.PRNGKey(seed))["backbone"]
  bb = dict(bb, lm_head={"kernel": bb["lm_head"]["kernel"] * head_scale})
  return {"backbone": bb}


def _hand_batch(length=16):
  """Two hand-made rollouts, encoded as the trainer does.
  row 0: odd prompt (+ parity PAD at 3), stream with rejected drafts at 7 and 9, odd total (+ trailing PAD at 11)
  row 1: even prompt, stream with one rejected draft at 5."""
  prompts = [[5, 6, 7, PAD], [20, 21, 22, 23]]  # parity PAD already appended, as PromptPipeline yields them
  raws = [[8, 9, 10, PAD, 11, PAD, 12], [24, PAD, 25, 26, 27, 28]]
  P_ = 4
  pid = np.full((2, P_), PAD, np.int32)
  pvalid = np.zeros((2, P_), bool)
  for b, p in enumerate(prompts):
    pid[b, P_ - len(p) :] = p
    pvalid[b, P_ - len(p) :] = True
  raw = np.full((2, 8), PAD, np.int32)
  for b, r in enumerate(raws):
    raw[b, : len(r)] = r
  return opd_rollout.encode_rollouts(pid, pvalid, raw, np.array([7, 6]), PAD, length)


def test_encode_rollouts_layout_and_fill_rule():
  b = _hand_batch()
  np.testing.assert_array_equal(b["input_ids"][0, :12], [5, 6, 7, PAD, 8, 9, 10, PAD, 11, PAD, 12, PAD])
  np.testing.assert_array_equal(b["labels"][0, :12], [IGN] * 4 + [8, 9, 10, IGN, 11, IGN, 12, IGN])
  assert np.all(b["labels"][:, 12:][0] == IGN) and np.all(b["input_ids"][0, 12:] == PAD)
  np.testing.assert_array_equal(np.flatnonzero(b["response"][0]), np.arange(4, 11))
  np.testing.assert_array_equal(np.flatnonzero(~b["keep"][0]), [3, 7, 9, 11, 12, 13, 14, 15])
  np.testing.assert_array_equal(np.flatnonzero(b["response"][1]), np.arange(4, 10))
  # The fill (docs/method.md#pad-label-fill): only rejected-draft PADs inside the stream; not the prompt-parity PAD (3),
  # the trailing parity PAD (11) or the right padding (13, 15). MTP slot j targets position 2j + 3.
  from pipo_jax.opd import pad_compaction

  fill = np.asarray(pad_compaction.mtp_fill_mask(jnp.asarray(b["input_ids"]), PAD, jnp.asarray(b["fill_allow"])))
  np.testing.assert_array_equal(2 * np.flatnonzero(fill[0]) + 3, [7, 9])
  np.testing.assert_array_equal(2 * np.flatnonzero(fill[1]) + 3, [5])
  ref = np.asarray(pad_compaction.mtp_fill_mask(jnp.asarray(b["input_ids"]), PAD))  # the reference's rule
  np.testing.assert_array_equal(2 * np.flatnonzero(ref[0]) + 3, [3, 7, 9, 11, 13, 15])


def test_teacher_states_equal_direct_forward_on_compacted_sequence():
  """At every aligned position the teacher state is the direct teacher forward over the row's real tokens
  (PADs removed) at the previous-or-same real token: backbone slot j <- position 2j+1, MTP slot j <- 2j+2."""
  b = _hand_batch()
  tp = _teacher_params()
  # The compacted rows built by hand (real tokens, then filler that causal attention never lets back in).
  T = b["input_ids"].shape[1]
  real = np.zeros((2, T), np.int32)
  for r in range(2):
    toks = b["input_ids"][r][b["keep"][r]]
    real[r, : len(toks)] = toks

  def direct(t, ids):
    m, pb = Qwen35(TEACHER), {"params": t["backbone"]}
    return m.apply(pb, m.apply(pb, ids, method=Qwen35.embed), jnp.broadcast_to(jnp.arange(T), ids.shape))[0]

  # One jit for both (compile time dominates).
  (g_back, g_mtp, W), g = jax.jit(lambda t, i, k, r: (opd.teacher_states(TEACHER, t, i, k), direct(t, r)))(
    tp, jnp.asarray(b["input_ids"]), jnp.asarray(b["keep"]), jnp.asarray(real)
  )
  g = np.asarray(g)
  np.testing.assert_allclose(W, tp["backbone"]["lm_head"]["kernel"])
  for r in range(2):
    idx = np.cumsum(b["keep"][r]) - 1
    for j in range(T // 2 - 1):
      np.testing.assert_allclose(g_back[r, j], g[r, idx[2 * j + 1]], rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(g_mtp[r, j], g[r, idx[2 * j + 2]], rtol=2e-5, atol=2e-5)
  # A PAD position takes the previous real token's state: row 0, PAD at 7 -> token 10 at position 6.
  np.testing.assert_allclose(g_back[0, 3], g_mtp[0, 2])
  np.testing.assert_allclose(g_back[0, 3], g[0, 5])


def _loss_fn(mode, lora=None, loss=None, **kw):
  lora = LoraConfig() if lora is None else lora
  loss = LossConfig(logits_chunk=8) if loss is None else loss
  ocfg = OPDConfig(divergence=mode, topk=8, **kw)
  return opd.make_opd_loss(STUDENT, TEACHER, ocfg, loss, lora)


def test_confidence_targets_jsd_full_formula():
  """full / jsd: sum_v min(p_s, p_t) (1 - TV), whatever the label; sampled / topk: min(1, p_t(y) / p_s(y))."""
  from pipo_jax.opd import divergences as opd_losses

  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  zs, zt = 3 * jax.random.normal(k1, (6, 40)), 3 * jax.random.normal(k2, (6, 40))
  y = jax.random.randint(k3, (6,), 0, 40)
  ps, pt = jax.nn.softmax(zs, -1), jax.nn.softmax(zt, -1)
  overlap = jnp.minimum(ps, pt).sum(-1)
  ratio = jnp.minimum(1.0, pt[jnp.arange(6), y] / ps[jnp.arange(6), y])
  for mode, expect in (("full", overlap), ("jsd", overlap), ("sampled", ratio), ("topk", ratio)):
    _, _, target = opd_losses.opd_token_terms(zs, zt, y, mode, topk=4, beta=0.3)
    np.testing.assert_allclose(target, expect, rtol=1e-5, atol=1e-6, err_msg=mode)


def test_confidence_targets_and_bce_gradient_isolation():
  """(1) The topk run's MTP-stream targets are min(1, p_t(y)/p_s(y)) from the two models' full softmaxes, y the
  sampled token2 or, on a filled slot, the student's own argmax. (2) The gradient of the confidence BCE alone is
  zero for every parameter outside the confidence head (LoRA adapters included) and nonzero inside it.
  One jit for both (compile time dominates these tests)."""
  b = {k: jnp.asarray(v) for k, v in _hand_batch().items()}
  lc = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
  params = init_pipo_params(STUDENT, jax.random.PRNGKey(0))
  params = dict(params, **{lora_lib.LORA_KEY: lora_lib.init_lora(params, lc, jax.random.PRNGKey(2))})
  # B nonzero so the adapters would get a gradient if anything flowed into the backbone / MTP.
  params[lora_lib.LORA_KEY] = jax.tree_util.tree_map(lambda x: x + 0.01, params[lora_lib.LORA_KEY])
  loss_fn = _loss_fn("topk", lora=lc)
  tp = _teacher_params()

  def run(params, tp):
    b_t = dict(b, **opd.make_teacher_fn(TEACHER)(tp, b))
    W_t = opd.teacher_head(TEACHER, tp)
    f = loss_fn.forward(params, b_t, W_t)
    merged = {"params": lora_lib.materialize(params, lc)}
    out = PipoModel(STUDENT).apply(merged, b["input_ids"])  # the MTP-stream distributions, straight from the models
    W_s = PipoModel(STUDENT).apply(merged, method=PipoModel.head_kernel)
    _, g_mtp, W_t = opd.teacher_states(TEACHER, tp, b["input_ids"], b["keep"])
    ls, lt = jax.nn.log_softmax(out["m_BJD"] @ W_s, -1), jax.nn.log_softmax(g_mtp @ W_t, -1)
    g = jax.grad(lambda p: loss_fn(p, b_t, None, None, W_t)[1]["loss_conf"])(params)
    return f, ls, lt, g

  f, ls, lt, g = jax.jit(run)(params, tp)

  m = f["mtp"]
  valid = np.asarray(m.valid)
  fill = np.asarray(f["fill_BJ"])
  assert valid.sum() > 0 and fill.sum() == 3
  y = np.asarray(m.labels)
  np.testing.assert_array_equal(y[fill], np.asarray(jnp.argmax(ls, -1))[fill])
  ys = np.where(valid, y, 0)
  lsy = np.take_along_axis(np.asarray(ls), ys[..., None], -1)[..., 0]
  lty = np.take_along_axis(np.asarray(lt), ys[..., None], -1)[..., 0]
  expect = np.minimum(1.0, np.exp(lty - lsy))
  np.testing.assert_allclose(np.asarray(m.conf_target)[valid], expect[valid], rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(m.conf_target)[~valid] == 0)

  for k, sub in g.items():
    top = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(sub))
    if k == "confidence_head":
      assert top > 0
    else:
      assert top == 0.0, k


def _prompts(n, seed, P_=8):
  """n random prompts (3..7 tokens, + parity PAD when odd), left-padded to P_."""
  rng = np.random.default_rng(seed)
  ids = np.full((n, P_), PAD, np.int32)
  valid = np.zeros((n, P_), bool)
  for i in range(n):
    p = list(rng.integers(4, 256, size=int(rng.integers(3, 8))))
    if len(p) % 2:
      p.append(PAD)
    ids[i, P_ - len(p) :] = p
    valid[i, P_ - len(p) :] = True
  return {"prompt_ids": ids, "prompt_valid": valid}


@pytest.mark.slow  # ~3 min of training; the OPD loss, targets and gradients are tested exactly above
def test_tiny_opd_run_lowers_kl_and_improves_calibration():
  """A tiny student distils a wider, sharper tiny teacher on its own pipo rollouts for 60 steps (fixed seeds);
  on 16 held-out prompts (fresh on-policy rollouts at start and end, same RNG) the reverse KL of both streams
  drops and the confidence head's BCE and ECE against the acceptance target drop.

  `full` (exact reverse KL): with a near-uniform random student the top-k union holds a small share of its
  mass, so `topk` would mostly reshape mass inside the union (it does lower its own loss, not the full KL)."""
  cfg = Config(
    mode="opd",
    lora=LoraConfig(rank=0),
    loss=LossConfig(logits_chunk=64),
    optim=OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, weight_decay=0.0),
    opd=OPDConfig(
      divergence="full",
      conf_threshold=0.5,
      max_new_tokens=12,
      prompt_length=8,
      sampling=SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, presence_penalty=0.0),
    ),
  )
  steps = 60
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=steps))
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  params = init_pipo_params(STUDENT, jax.random.PRNGKey(0))
  tp = _teacher_params()
  mask = jax.tree_util.tree_map(lambda _: True, params)
  tx = optim.make_optimizer(cfg.optim, steps)
  state = optim.TrainState.create(params, mask, tx, jax.random.PRNGKey(3))
  loss_fn = opd.make_opd_loss(STUDENT, TEACHER, cfg.opd, cfg.loss, cfg.lora)
  step = jax.jit(optim.make_train_step(loss_fn, 1, optim.make_schedule(cfg.optim, steps)), donate_argnums=0)
  score = jax.jit(opd.make_teacher_fn(TEACHER))
  W_t = opd.teacher_head(TEACHER, tp)

  def scored(batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return dict(batch, **score(tp, batch))

  roll = opd_rollout.Rollout(STUDENT, cfg, mesh, stop_ids=[3])
  held = [_prompts(8, seed=100), _prompts(8, seed=101)]

  def evaluate(state):
    """Mean metrics over two held-out batches of 8 (rollout and step are compiled for B = 8). The step's metrics
    are those of the params it starts from, so running it on a throwaway copy of the state is an evaluation
    (and saves compiling a separate eval function)."""
    ms = []
    for i, h in enumerate(held):
      batch, _ = roll(state.params, h, jax.random.PRNGKey(123 + i))
      copy = jax.tree_util.tree_map(jnp.copy, state)
      ms.append(jax.device_get(step(copy, scored(batch), W_t)[1]))
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}

  with sharding.use_rules(mesh):
    start = evaluate(state)
    for i in range(steps):
      batch, _ = roll(state.params, _prompts(8, seed=i), jax.random.PRNGKey(1000 + i))
      state, m = step(state, scored(batch), W_t)
    end = evaluate(state)
  keys = (
    "kl_backbone",
    "kl_mtp",
    "loss_conf",
    "conf_ece",
    "conf_pred_mean",
    "conf_target_mean",
    "pad_ratio",
    "rollout_length",
  )
  print("\ntiny OPD held-out start -> end: " + ", ".join(f"{k} {start[k]:.3f} -> {end[k]:.3f}" for k in keys))
  assert np.isfinite(float(m["loss"]))
  assert end["kl_backbone"] < 0.95 * start["kl_backbone"]
  assert end["kl_mtp"] < 0.9 * start["kl_mtp"]
  assert end["loss_conf"] < start["loss_conf"]
  assert end["conf_ece"] < start["conf_ece"]


@pytest.mark.parametrize(
  "field,override",
  [
    ("opd.teacher_checkpoint", {"opd": OPDConfig(teacher_checkpoint="")}),
    ("opd.divergence", {"opd": OPDConfig(teacher_checkpoint="/nonexistent/teacher", divergence="kl")}),
    ("opd.prompt_length", {"opd": OPDConfig(teacher_checkpoint="/nonexistent/teacher", prompt_length=63)}),
    ("data.train_path", {"data": None}),
    ("optim.grad_accum_steps", {"optim": OptimConfig(grad_accum_steps=0)}),
  ],
)
def test_bad_opd_config_fails_in_one_line_before_any_load(field, override, tmp_path):
  """Config.validate() runs first in Trainer.__init__: the error names the field, and nothing was read (the
  student checkpoint path does not exist, so any attempt to load would fail differently)."""
  from pipo_jax.config import DataConfig
  from pipo_jax.opd.trainer import OPDTrainer

  kw = dict(
    mode="opd",
    workdir=str(tmp_path / "w"),
    data=DataConfig(train_path="/nonexistent/prompts.jsonl"),
    opd=OPDConfig(teacher_checkpoint="/nonexistent/teacher"),
  )
  kw.update({k: v for k, v in override.items() if v is not None})
  if override.get("data", 0) is None:
    kw["data"] = DataConfig(train_path="")
  cfg = Config(**kw)
  cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from="/nonexistent/student"))
  with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
    OPDTrainer(cfg)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w").exists()  # failed before the trainer created anything
