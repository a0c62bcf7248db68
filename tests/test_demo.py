"""The CPU miniature (experiments/demo.sh): the rollout and evaluate building blocks on a random tiny model, and
a smoke run of the whole pipeline at minimal sizes (marked slow: each stage is a separate Python process that
pays JAX start-up and compilation, about 3 minutes alone on an idle 2-core CPU; `pytest -m slow tests/test_demo.py`).

What a smoke run can assert is the plumbing and the invariants, not the numbers (the models see 2 steps):
  * report.json / report.md / sweep.png exist and every row has the required fields;
  * accuracies are fractions; ar / MTP rows have pad_ratio 0; pipo rows have pad_ratio in [0, 1] with
    tau = -1 -> 0 exactly (PAD is never sampled) and tau = 1 -> 1 exactly (every token2 decision is a PAD);
  * Regular's speed-up is 1; random-PAD rows are controls of a confidence row at the same tau.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pipo_jax import evaluate, rollout
from pipo_jax.config import ModelConfig, resolve_model_config
from pipo_jax.data import synthetic
from pipo_jax.data.tokenizer import load_tokenizer
from pipo_jax.evaluation import batch_sampling
from pipo_jax.inference.sampling import SamplingParams
from pipo_jax.models.pipo import init_pipo_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("method", "conf_threshold", "avg_at_k", "pass_at_k", "pad_ratio", "effective_tokens_per_s", "speedup_vs_ar")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("task"))
  paths = synthetic.write_dataset(out, n_train=8, n_test=3, n_opd=3, seed=0)
  return out, paths


@pytest.fixture(scope="module")
def model(task):
  cfg = resolve_model_config(ModelConfig(preset="demo_teacher"))
  tok = load_tokenizer(task[1]["tokenizer"])
  return batch_sampling.Model(cfg, init_pipo_params(cfg, jax.random.PRNGKey(0)), tok)


def test_demo_teacher_covers_tokenizer(model):
  assert model.tokenizer.vocab_size <= model.config.vocab_size
  assert model.config.pad_token_id == model.tokenizer.pad_id


def test_sample_shapes_and_pad_accounting(model):
  prompts = [[{"role": "user", "content": "Compute (1+2)."}], [{"role": "user", "content": "Compute (3*4-5)."}]]
  sp = SamplingParams(temperature=1.0)
  for tau, want in ((-1.0, 0.0), (1.0, 1.0)):
    run = batch_sampling.sample(model, prompts, 3, "pipo", sp, conf_threshold=tau, max_new_tokens=6, batch_size=4)
    flat = [s for q in run.samples for s in q]
    assert len(run.samples) == 2 and all(len(q) == 3 for q in run.samples)
    assert all(s.text.startswith("<think>\n") for s in flat)
    assert sum(s.n_pad for s in flat) / sum(s.token2_slots for s in flat) == want
  run = batch_sampling.sample(model, prompts, 2, "ar", sp, max_new_tokens=6, batch_size=4)
  assert all(s.n_pad == 0 and 1 <= len(s.tokens) <= 6 for q in run.samples for s in q)


def test_rollout_grading_and_schemas(model, task, tmp_path, monkeypatch):
  """A fake sampler answers question 0 correctly twice and question 1 never: SFT rows and pass rates follow."""
  rows = rollout.read_prompts(task[1]["opd"])

  def fake_sample(m, prompts, n, mode, sp, **kw):
    assert mode == "ar" and n == 2
    good = [synthetic.THINK_TOKENS[0] + "\n1=1\n</think>\n\\boxed{" + rows[0]["answer"] + "}", "no box"]
    samples = [
      [batch_sampling.Sample(good[i] if q == 0 else "\\boxed{-1}", [], [], 1, 0, 0) for i in range(n)]
      for q in range(len(prompts))
    ]
    samples[0][1] = batch_sampling.Sample(good[0], [], [], 1, 0, 0)
    return batch_sampling.SampleRun(samples, 1.0, 0.0, 1)

  monkeypatch.setattr(batch_sampling, "sample", fake_sample)
  monkeypatch.setattr(batch_sampling, "load", lambda c, t: model)
  sft, opd = str(tmp_path / "sft.jsonl"), str(tmp_path / "opd.jsonl")
  summary = rollout.run("unused", "", task[1]["opd"], 2, sft, opd, min_pass_rate=0.5)
  sft_rows = [json.loads(line) for line in open(sft)]
  opd_rows = [json.loads(line) for line in open(opd)]
  assert len(sft_rows) == 2 and [m["role"] for m in sft_rows[0]["messages"]] == ["user", "assistant"]
  assert len(opd_rows) == 1 and opd_rows[0]["pass_rate"] == 1.0 and opd_rows[0]["answer"] == rows[0]["answer"]
  assert summary["opd_prompts"] == 1 and summary["sft_rows"] == 2
  assert os.path.exists(tmp_path / "rollout_summary.json")


def test_evaluate_rows(model, task, tmp_path, monkeypatch):
  monkeypatch.setattr(batch_sampling, "load", lambda c, t: model)
  out = str(tmp_path / "rows.json")
  rows = evaluate.run(
    "unused",
    "",
    [task[1]["test"]],
    ["ar", "pipo"],
    [-1.0, 0.5, 1.0],
    k=2,
    output=out,
    methods=["Regular", "PIPO"],
    random_pad_control=True,
    max_new_tokens=6,
    batch_size=8,
    log=lambda s: None,
  )
  assert rows == json.load(open(out))
  by = {(r["method"], r["conf_threshold"], r["control"]): r for r in rows}
  assert by[("Regular", None, None)]["pad_ratio"] == 0.0
  assert by[("PIPO", -1.0, None)]["pad_ratio"] == 0.0 and by[("PIPO", 1.0, None)]["pad_ratio"] == 1.0
  for r in rows:
    assert 0.0 <= r["avg_at_k"] <= 1.0 and 0.0 <= r["pass_at_k"] <= 1.0 and r["effective_tokens_per_s"] > 0
    assert r["benchmarks"]["test"]["n_questions"] == 3
  ctl = [r for r in rows if r["control"]]
  assert ctl, "no random-PAD control row: the gate's PAD ratio at tau 0.5 is not strictly inside (0, 1)"
  for c in ctl:  # a control exists only where the gate's ratio is strictly inside (0, 1), at that ratio
    gate = by[("PIPO", c["conf_threshold"], None)]
    assert 0.0 < gate["pad_ratio"] < 1.0 and c["random_pad_ratio"] == gate["pad_ratio"]


# Slow: 8 stage processes, each paying JAX start-up and compilation (3 min alone on an idle 2-core CPU, 14 min
# beside the rest of the suite); the stages' own logic is tested above.
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_smoke(tmp_path):
  """experiments/demo.sh end to end at minimal sizes (PIPO_DEMO_SMOKE=1)."""
  work = str(tmp_path / "demo")
  env = dict(os.environ, PIPO_DEMO_SMOKE="1", PIPO_DEMO_TAUS="-1,0.5,1", PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)  # one CPU device per stage, as a user runs it
  proc = subprocess.run(
    ["bash", "experiments/demo.sh", work], cwd=REPO, env=env, capture_output=True, text=True, timeout=2300
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  for name in ("report.json", "report.md", "sweep.png", "timings.json"):
    assert os.path.exists(os.path.join(work, name)), name
  rows = json.load(open(os.path.join(work, "report.json")))["rows"]
  methods = {r["method"] for r in rows}
  assert {"Regular", "MTP", "MTP-spec", "PIPO-SFT", "PIPO+OPD"} <= methods
  for r in rows:
    for key in REQUIRED:
      assert key in r, (r["method"], key)
    assert 0.0 <= r["avg_at_k"] <= 1.0 and 0.0 <= r["pass_at_k"] <= 1.0
    assert 0.0 <= r["pad_ratio"] <= 1.0
    if r["decode"] != "pipo":
      assert r["pad_ratio"] == 0.0 and r["conf_threshold"] is None
  regular = next(r for r in rows if r["method"] == "Regular")
  assert np.isclose(regular["speedup_vs_ar"], 1.0)
  sweep = {r["conf_threshold"]: r for r in rows if r["method"] == "PIPO+OPD" and not r["control"]}
  assert sweep[-1.0]["pad_ratio"] == 0.0 and sweep[1.0]["pad_ratio"] == 1.0
