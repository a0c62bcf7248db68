"""A run's checkpoint finds its tokenizer without --tokenizer (pipo_jax.io.loading.find_tokenizer_dir)."""

import json
import os

import pytest

from pipo_jax.data import synthetic
from pipo_jax.io import loading


def _fake_run(workdir, step, saved):
  """The on-disk layout of an orbax workdir as far as the loader reads it: checkpoints/<step>/state/ and the
  run config saved next to it."""
  d = os.path.join(workdir, "checkpoints", str(step))
  os.makedirs(os.path.join(d, "state"))
  os.makedirs(os.path.join(d, "config"))
  with open(os.path.join(d, "config", "metadata"), "w") as f:
    json.dump(saved, f)
  return workdir


def test_tokenizer_from_the_run_config_and_init_from_chain(tmp_path):
  tok = synthetic.save_tokenizer(str(tmp_path / "data" / "tokenizer"))
  sft = _fake_run(
    str(tmp_path / "sft"), 1200, {"mode": "sft", "data": {"tokenizer_path": tok}, "checkpoint": {"init_from": ""}}
  )
  # OPD run: trained on prompts with no tokenizer_path of its own, started from the SFT checkpoint.
  opd = _fake_run(
    str(tmp_path / "opd"), 100, {"mode": "opd", "data": {"tokenizer_path": ""}, "checkpoint": {"init_from": sft}}
  )
  assert loading.find_tokenizer_dir(sft) == tok
  assert loading.find_tokenizer_dir(os.path.join(sft, "checkpoints", "1200")) == tok  # a step dir too
  assert loading.find_tokenizer_dir(opd) == tok
  assert loading.find_tokenizer_dir(opd, tok) == tok
  with pytest.raises(FileNotFoundError, match=r"--tokenizer=.*: no tokenizer.json there"):
    loading.find_tokenizer_dir(opd, str(tmp_path))
  # A copy inside the workdir wins over the configured path (a run moved to another machine).
  own = synthetic.save_tokenizer(os.path.join(opd, "tokenizer"))
  assert loading.find_tokenizer_dir(opd) == own


def test_no_tokenizer_anywhere(tmp_path):
  run = _fake_run(
    str(tmp_path / "r"), 1, {"data": {"tokenizer_path": str(tmp_path / "gone")}, "checkpoint": {"init_from": ""}}
  )
  assert loading.find_tokenizer_dir(run) == ""


def test_relative_paths_of_a_run_started_elsewhere(tmp_path, monkeypatch):
  """The demo saves relative paths (workdir runs/demo/opd, tokenizer runs/demo/data/tokenizer); from another
  directory they are resolved against the directory the run was started from."""
  repo = tmp_path / "repo"
  synthetic.save_tokenizer(str(repo / "runs" / "demo" / "data" / "tokenizer"))
  _fake_run(
    str(repo / "runs" / "demo" / "sft"),
    3,
    {
      "workdir": "runs/demo/sft",
      "data": {"tokenizer_path": "runs/demo/data/tokenizer"},
      "checkpoint": {"init_from": ""},
    },
  )
  _fake_run(
    str(repo / "runs" / "demo" / "opd"),
    4,
    {"workdir": "runs/demo/opd", "data": {"tokenizer_path": ""}, "checkpoint": {"init_from": "runs/demo/sft"}},
  )
  monkeypatch.chdir(tmp_path)
  assert loading.find_tokenizer_dir("repo/runs/demo/opd") == str(repo / "runs" / "demo" / "data" / "tokenizer")
