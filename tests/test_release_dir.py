"""Every CLI on a Qwen3.5 release-like directory (tests/release_dir.py): nested text_config, VLM weight names in
two shards, null pad_token_id, the tokenizer's own chat template, generation_config.json.

In-process tests check the one loader and the generation / bench / score cores against transformers; the
subprocess tests run `python -m pipo_jax.<tool>` as a user would (generate and bench by default, the other
tools under `-m slow`: each subprocess pays jax start-up and compilation).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import release_dir
import torch

from pipo_jax.io import loading

# Compile-heavy: run by name, `pytest -m slow tests/test_release_dir.py`.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_MSG = [{"role": "user", "content": "What is 3+4?"}]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("release") / "Qwen3.5-tiny")
  model = release_dir.make_release_dir(path)
  return model, path


@pytest.fixture(scope="module")
def loaded(release):
  return loading.load_for_cli(release[1])


def test_loader_resolves_ids_template_and_defaults(release, loaded):
  model, path = release
  assert json.load(open(os.path.join(path, "config.json")))["text_config"]["pad_token_id"] is None
  tok = loaded.tokenizer
  # PAD from tokenizer_config.json (<|endoftext|> = id 1), EOS from config.json (1); stop: <|im_end|> (3) only,
  # since EOS is the PAD id here (as in Qwen3.5, where eos_token_id names <|endoftext|>).
  assert (loaded.config.pad_token_id, loaded.config.eos_token_id) == (1, 1)
  assert tok.special.pad == 1 and tok.token_to_id("<|im_end|>") == 3
  assert loaded.stop_ids == (3,)
  assert loaded.generation == {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": [3, 1]}
  assert tok.template is not None and loaded.tokenizer_dir == path
  assert loaded.config.vocab_size == model.config.vocab_size
  assert loaded.config.num_hidden_layers == 2 and loaded.config.mtp_num_hidden_layers == 1
  assert not loaded.pipo_trained
  # The backbone is transformers' weights: embedding and (untied) head equal after the layout change.
  emb = model.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(loaded.params["backbone"]["embed_tokens"]["embedding"]), emb)
  head = model.lm_head.weight.detach().numpy().T
  np.testing.assert_array_equal(np.asarray(loaded.params["backbone"]["lm_head"]["kernel"]), head)


def test_pad_override_and_missing_pad_is_one_line(release, tmp_path):
  _, path = release
  assert loading.load_for_cli(path, pad_token_id=0).config.pad_token_id == 0
  # Without a tokenizer the PAD cannot be found: one clear line naming the directory and the flags.
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in os.listdir(path):
    if not f.startswith("tokenizer") and f != "chat_template.jinja":
      os.symlink(os.path.join(path, f), bare / f)
  with pytest.raises(ValueError, match=r"bare: no PAD id: .*--tokenizer=DIR or --pad_token_id=N"):
    loading.load_for_cli(str(bare))
  assert loading.load_for_cli(str(bare), need_pad=False).config.pad_token_id is None


def test_not_a_checkpoint_is_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"neither an HF directory"):
    loading.load_for_cli(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no such file or directory"):
    loading.load_for_cli(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
  with pytest.raises((ValueError, FileNotFoundError)):
    loading.load_for_cli(str(tmp_path))


def _hf_greedy(model, prompt_ids, n, stop):
  with torch.no_grad():
    out = model.generate(
      torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=stop[0]
    )
  gen = out[0, len(prompt_ids) :].tolist()
  return gen[: gen.index(stop[0]) + 1] if stop[0] in gen else gen


def test_generate_ar_matches_transformers_greedy(release, loaded):
  """generate's core on the release dir: the template's generation prompt, greedy ar decoding, the release's
  stop id: the same tokens as transformers' greedy generate of the same checkpoint."""
  from pipo_jax import generate
  from pipo_jax.inference.sampling import SamplingParams

  model, _ = release
  prompts = generate.read_prompts_from_records([{"messages": USER_MSG}, {"prompt": "2*5?"}], loaded.tokenizer)
  assert prompts[0] == loaded.tokenizer.generation_prompt_ids(USER_MSG).tolist()
  rows = generate.run(
    prompts,
    loaded.config,
    loaded.params,
    loaded.tokenizer,
    "ar",
    SamplingParams(),
    0.95,
    12,
    2,
    0,
    16,
    stop_ids=list(loaded.stop_ids),
  )
  for p, r in zip(prompts, rows):
    assert r["tokens"] == _hf_greedy(model, p, 12, list(loaded.stop_ids))


def test_bench_pipo_on_release_dir(loaded):
  """The crash of the issue: bench --decode=ar,pipo on a directory whose config.json has a null PAD."""
  from pipo_jax import bench
  from pipo_jax.inference import flops

  out = bench.run(loaded.config, loaded.params, ["ar", "pipo"], 0.95, 16, 1, 8, 1, random_init=True)
  recs = {(r["mode"], r["conf_threshold"]): r for r in out["records"]}
  assert recs[("pipo", -1.0)]["tokens_per_step"] == 2.0  # every token2 kept
  assert recs[("pipo", 1.0)]["tokens_per_step"] == 1.0  # phase 2 skipped
  f = flops.per_step(loaded.config, 16 + 8 // 2)
  # The FLOP model of each record, by hand: tokens per step x FLOPs(ar) / FLOPs(the mode's step).
  # At tau <= 0 the decode loop skips the confidence head, and so does its FLOP model.
  assert recs[("pipo", -1.0)]["flop_model_speedup"] == pytest.approx(2 * f["ar"] / f["pipo_tau_le_0"])
  assert f["pipo_tau_lt_1"] - f["pipo_tau_le_0"] == flops.confidence_head(loaded.config)
  assert recs[("pipo", 1.0)]["flop_model_speedup"] == pytest.approx(f["ar"] / f["pipo_tau_ge_1"])
  assert recs[("pipo", -1.0)]["flop_model_speedup"] == pytest.approx(f["bound_tau_le_0"])


def _cli(tool, *args, cwd=None, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
    [sys.executable, "-m", f"pipo_jax.{tool}", *args],
    capture_output=True,
    text=True,
    cwd=cwd or REPO,
    env=env,
    timeout=timeout,
  )


def test_generate_cli_end_to_end(release, tmp_path):
  """`python -m pipo_jax.generate` on the release dir, run from another directory: greedy ar output equals
  transformers' greedy generate; the effective sampling values are printed; a bad input line is one line."""
  model, path = release
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"messages": USER_MSG}) + "\n")
  out = tmp_path / "out.jsonl"
  r = _cli(
    "generate",
    f"--checkpoint={path}",
    f"--prompts={prompts}",
    f"--output={out}",
    "--decode=ar",
    "--temperature=0",
    "--max_new_tokens=10",
    "--batch_size=1",
    cwd=str(tmp_path),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "sampling: temperature=0 top_k=20 top_p=0.95" in r.stderr
  got = json.loads(out.read_text())
  tok = loading.find_tokenizer_dir(path)
  from pipo_jax.data.tokenizer import load_tokenizer

  ids = load_tokenizer(tok).generation_prompt_ids(USER_MSG).tolist()
  assert got["tokens"] == _hf_greedy(model, ids, 10, [3])
  # A user mistake: one line on stderr naming file and line, non-zero exit.
  prompts.write_text('{"prompt": "ok"}\n{"prompt": \n')
  r = _cli("generate", f"--checkpoint={path}", f"--prompts={prompts}", f"--output={out}", cwd=str(tmp_path))
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith(f"generate: error: {prompts}:2: not JSON")
  assert "Traceback" not in r.stderr


def test_bench_cli_end_to_end(release, tmp_path):
  _, path = release
  out = tmp_path / "bench.json"
  r = _cli(
    "bench",
    f"--checkpoint={path}",
    "--decode=ar,pipo",
    "--prompt_len=16",
    "--new_tokens=8",
    "--repeats=1",
    f"--output={out}",
    cwd=str(tmp_path),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  modes = [(x["mode"], x["conf_threshold"]) for x in res["records"]]
  assert modes == [("ar", None), ("pipo", 0.95)]
  assert res["records"][0]["tokens_per_step"] == 1.0
  assert "matmul-FLOP model" in r.stdout and (tmp_path / "bench.png").exists()


@pytest.mark.slow
def test_every_other_cli_on_the_release_dir(release, tmp_path):
  """score (plain and --pipo), convert both ways, rollout, evaluate and train (SFT init_from) on the release
  directory, each as a subprocess from another directory; outputs checked against transformers or by hand."""
  model, path = release
  tw = str(tmp_path)
  # score: log-probs equal transformers'; --pipo needs the PAD the loader resolves from the tokenizer.
  seq = [5, 9, 17, 33, 60, 2, 7]
  (tmp_path / "toks.jsonl").write_text(json.dumps({"tokens": seq}) + "\n")
  r = _cli("score", f"--checkpoint={path}", "--input=toks.jsonl", "--output=lp.jsonl", cwd=tw)
  assert r.returncode == 0, r.stderr[-3000:]
  with torch.no_grad():
    ref = torch.log_softmax(model(torch.tensor([seq])).logits.float(), -1)[0, :-1]
  ref = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].numpy()
  np.testing.assert_allclose(json.loads((tmp_path / "lp.jsonl").read_text())["logprobs"], ref, atol=1e-4)
  r = _cli("score", f"--checkpoint={path}", "--input=toks.jsonl", "--output=pipo.jsonl", "--pipo", cwd=tw)
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(json.loads((tmp_path / "pipo.jsonl").read_text())["mtp_logprobs"]) == len(seq) - 1

  # convert: HF -> orbax (the tokenizer referenced), then orbax -> HF (the tokenizer copied, PAD written).
  r = _cli("convert", f"--from_hf={path}", "--to_checkpoint=ck", cwd=tw)
  assert r.returncode == 0, r.stderr[-3000:]
  assert loading.find_tokenizer_dir(os.path.join(tw, "ck")) == os.path.abspath(path)
  r = _cli("convert", "--checkpoint=ck", "--to_hf=exported", cwd=tw)
  assert r.returncode == 0, r.stderr[-3000:]
  exported = json.load(open(os.path.join(tw, "exported", "config.json")))
  assert exported["pad_token_id"] == 1 and os.path.exists(os.path.join(tw, "exported", "tokenizer.json"))

  # rollout / evaluate: a benchmark graded by rule; every row sampled (k = n = 2).
  bench = tmp_path / "b.jsonl"
  bench.write_text(
    "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1), "type": "math"}) + "\n" for i in range(3))
  )
  sampled = {
    "rollout": [f"--prompts={bench}", "--n=2", "--output_sft=ro/sft.jsonl", "--output_opd=ro/opd.jsonl"],
    "evaluate": [f"--benchmark={bench}", "--decode=ar,pipo", "--k=2", "--output=ev/rows.json"],
  }
  for tool, args in sampled.items():
    r = _cli(tool, f"--checkpoint={path}", *args, "--max_new_tokens=8", "--batch_size=6", cwd=tw)
    assert r.returncode == 0, r.stderr[-3000:]
  summary = json.load(open(os.path.join(tw, "ro", "rollout_summary.json")))
  assert summary["prompts"] == 3 and summary["samples"] == 6
  rows = json.load(open(os.path.join(tw, "ev", "rows.json")))
  assert [row["decode"] for row in rows] == ["ar", "pipo"]

  # train: PIPO SFT from the release directory (its null PAD resolved from the tokenizer), two steps.
  sft = tmp_path / "sft.jsonl"
  sft.write_text(
    "".join(
      json.dumps(
        {
          "messages": [
            {"role": "user", "content": f"{i}+1?"},
            {"role": "assistant", "content": f"<think>\n{i}+1\n</think>\n\n\\boxed{{{i + 1}}}"},
          ]
        }
      )
      + "\n"
      for i in range(16)
    )
  )
  r = _cli(
    "train",
    "--config.mode=sft",
    f"--config.checkpoint.init_from={path}",
    "--config.workdir=run",
    f"--config.data.train_path={sft}",
    "--config.data.max_length=64",
    "--config.data.batch_size=4",
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=2",
    cwd=tw,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert loading.find_tokenizer_dir(os.path.join(tw, "run")) == path
