"""`python -m pipo_jax.score` (run in-process) against transformers' log-probabilities."""

import json

import hf_tiny
import numpy as np
import pytest
import torch
from absl import flags

from pipo_jax import score

FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = hf_tiny.make_hf_model([hf_tiny.LIN, hf_tiny.LIN, hf_tiny.LIN, hf_tiny.FULL], tie=True, seed=3)
  path = str(tmp_path_factory.mktemp("score_model"))
  model.save_pretrained(path)
  return model, path


def _run(argv):
  if "pipo" not in FLAGS:  # the CLI defines its flags only when run as a program
    score.define_flags()
  FLAGS.unparse_flags()
  FLAGS(["score"] + argv)
  score.main([])


def test_score_matches_transformers_mixed_lengths(saved, tmp_path):
  model, path = saved
  rng = np.random.RandomState(0)
  lengths = [5, 1, 20, 3, 17]  # buckets 16 and 32, batch 2: one batch holds a 1-token sequence
  seqs = [rng.randint(0, 256, n).tolist() for n in lengths]
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  hf_tiny.write_jsonl(inp, [{"tokens": s} for s in seqs])
  _run([f"--checkpoint={path}", f"--input={inp}", f"--output={out}", "--batch_size=2"])
  got = [json.loads(line)["logprobs"] for line in open(out)]
  assert len(got) == len(seqs)
  worst = 0.0
  for s, lp in zip(seqs, got):
    assert len(lp) == len(s) - 1
    if len(s) == 1:
      continue
    with torch.no_grad():
      ref = torch.log_softmax(model(torch.tensor([s])).logits.float(), -1)[0, :-1]
    ref = ref.gather(-1, torch.tensor(s[1:])[:, None])[:, 0].numpy()
    worst = max(worst, float(np.abs(np.asarray(lp) - ref).max()))
  print(f"score vs transformers max|diff| = {worst:.3g}")
  assert worst <= 1e-4


def test_bad_input_line_names_file_and_line(saved, tmp_path):
  _, path = saved
  inp = tmp_path / "bad.jsonl"
  inp.write_text('{"tokens": [1, 2]}\n{"tokens": [1, "x"]}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: \"tokens\" must be a non-empty list of integers"):
    _run([f"--checkpoint={path}", f"--input={inp}", f"--output={tmp_path / 'o.jsonl'}"])
  inp.write_text('{"tokens": [1, 999]}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: token ids \[999\] outside the vocabulary"):
    _run([f"--checkpoint={path}", f"--input={inp}", f"--output={tmp_path / 'o.jsonl'}"])
