"""Draft difficulty annotation (pipo_jax.draft_difficulty): every response token's 1 - p under the teacher's
native MTP head, checked against a brute-force forward of the prefix that ends at that token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax import draft_difficulty
from pipo_jax.config import ModelConfig, resolve_model_config
from pipo_jax.data import schemas, synthetic
from pipo_jax.data import tokenizer as tok_lib
from pipo_jax.models.pipo import MTPHead, init_pipo_params
from pipo_jax.models.qwen3_5 import Qwen35


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("difficulty"))
  synthetic.write_dataset(out, n_train=8, n_test=4, seed=1)
  return out


def _brute_force_mtp_prob(cfg, params, ids: np.ndarray, t: int) -> float:
  """p(x_t) of the native MTP head from a forward of the prefix x_0..x_{t-1} alone (no padding, no batching):
  the MTP layer at its last position reads h_{t-2} and e(x_{t-1})."""
  backbone, mtp = Qwen35(cfg), MTPHead(cfg)

  @jax.jit  # one compilation per prefix length, still much faster than op-by-op
  def last_mtp_logits(params, prefix_1T):
    pb = {"params": params["backbone"]}
    pos = jnp.arange(t)[None]
    x = backbone.apply(pb, prefix_1T, method=Qwen35.embed)
    h, _ = backbone.apply(pb, x, pos)
    m, _ = mtp.apply({"params": params["mtp"]}, x[:, 1:t], h[:, : t - 1], pos[:, : t - 1])
    return backbone.apply(pb, m[:, -1:], method=Qwen35.logits)[0, -1]

  logits = last_mtp_logits(params, jnp.asarray(ids[:t])[None])
  return float(jax.nn.softmax(logits.astype(jnp.float32))[ids[t]])


def test_difficulty_is_one_minus_mtp_probability_per_response_token(task):
  tok = tok_lib.load_tokenizer(f"{task}/tokenizer")
  records, _ = schemas.read_jsonl(f"{task}/test_sft.jsonl", require_response=True)
  sequences = [tok_lib.record_token_ids(r, tok) for r in records[:3]]
  cfg = resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size))
  params = jax.jit(lambda key: init_pipo_params(cfg, key))(jax.random.PRNGKey(0))  # eager init: ~20 s
  # Sharpen the random model so that probabilities spread over (0, 1) instead of all sitting near 1/V.
  params["backbone"]["embed_tokens"]["embedding"] = params["backbone"]["embed_tokens"]["embedding"] * 30.0
  ds = draft_difficulty.difficulties(cfg, params, tok, sequences, batch_size=2)  # 2 batches, one padded
  assert [len(d) for d in ds] == [len(r) for _, r in sequences]
  # A prefix forward per checked token is slow (one compilation each): the first and last response token of the
  # first sequence, and a middle one of the third (the row of the second, padded batch).
  for i, j in [(0, 0), (0, len(sequences[0][1]) - 1), (2, len(sequences[2][1]) // 2)]:
    p, r = sequences[i]
    expected = 1.0 - _brute_force_mtp_prob(cfg, params, np.concatenate([p, r]), len(p) + j)
    assert ds[i][j] == pytest.approx(expected, abs=2e-5), (i, j)
  assert np.concatenate(ds).std() > 1e-4  # the values differ from token to token: alignment errors would show


def test_teacher_without_mtp_head_is_refused(task):
  tok = tok_lib.load_tokenizer(f"{task}/tokenizer")
  cfg = resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size, mtp_num_hidden_layers=0))
  with pytest.raises(ValueError, match="no native MTP head"):
    draft_difficulty.difficulties(cfg, {}, tok, [(np.arange(3), np.arange(4))])
