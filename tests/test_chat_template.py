"""The checkpoint's own Jinja chat template, rendered by us vs transformers' apply_chat_template, token for token."""

import json
import os
import shutil

import numpy as np
import pytest
import transformers

from pipo_jax.data import synthetic
from pipo_jax.data.tokenizer import NO_THINK_SUFFIX, load_tokenizer

TEMPLATE = os.path.join(os.path.dirname(__file__), "qwen3_5_template.jinja")

CONVERSATIONS = {
  "single": [{"role": "user", "content": "What is 2+3?"}],
  "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Add 4 and 5."}],
  "multi_turn_reasoning_earlier": [
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "<think>\nones\n</think>\n\nIt is \\boxed{2}."},
    {"role": "user", "content": "and 2+2?"},
  ],
  "multi_turn_system": [
    {"role": "system", "content": "Be exact."},
    {"role": "user", "content": "7*6?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "minus 2?"},
  ],
}
RESPONSES = [
  "<think>\n7*6=42\n</think>\nThe answer is \\boxed{42}.",
  "no think block at all",
  "<think>\n\nleading blank\n\n</think>\n\n\nanswer",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """(directory with chat_template.jinja, directory with the template inside tokenizer_config.json)."""
  root = tmp_path_factory.mktemp("tmpl")
  a, b = str(root / "file"), str(root / "config")
  synthetic.save_tokenizer(a)
  shutil.copy(TEMPLATE, os.path.join(a, "chat_template.jinja"))
  synthetic.save_tokenizer(b)
  cfg = json.load(open(os.path.join(b, "tokenizer_config.json")))
  cfg["chat_template"] = open(TEMPLATE).read()
  json.dump(cfg, open(os.path.join(b, "tokenizer_config.json"), "w"))
  return a, b


def _hf(d):
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
  tok.chat_template = open(TEMPLATE).read()
  return tok


def _hf_ids(hf, messages, **kw):
  return list(hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [True, False])
def test_generation_prompt_matches_transformers(dirs, which, name, thinking):
  ours = load_tokenizer(dirs[which])
  assert ours.template is not None
  hf = _hf(dirs[which])
  msgs = CONVERSATIONS[name]
  want = _hf_ids(hf, msgs, add_generation_prompt=True, enable_thinking=thinking)
  assert ours.generation_prompt_ids(msgs, enable_thinking=thinking).tolist() == want
  tail = "<think>\n" if thinking else NO_THINK_SUFFIX
  assert hf.decode(want).endswith("<|im_start|>assistant\n" + tail)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("response", RESPONSES)
def test_sft_example_matches_transformers(dirs, name, response):
  ours = load_tokenizer(dirs[0])
  hf = _hf(dirs[0])
  msgs = CONVERSATIONS[name]
  p, r = ours.encode_chat(msgs, response)
  full = _hf_ids(hf, msgs + [{"role": "assistant", "content": response}])
  assert np.concatenate([p, r]).tolist() == full
  # The unsupervised think prefix of the response is exactly where the generation prompt ends.
  assert np.concatenate([p, r[: len(ours.think_prefix_ids)]]).tolist() == _hf_ids(
    hf, msgs, add_generation_prompt=True, enable_thinking=True
  )
  assert r[: len(ours.think_prefix_ids)].tolist() == ours.think_prefix_ids.tolist()


def test_builtin_fallback_without_template(tmp_path):
  """A directory without a template keeps the built-in Qwen3.5 template, equal to the fixture's rendering."""
  d = str(tmp_path)
  synthetic.save_tokenizer(d)
  ours = load_tokenizer(d)
  assert ours.template is None
  hf = _hf(d)
  for msgs in CONVERSATIONS.values():
    if any(m["role"] == "assistant" for m in msgs):
      continue  # the built-in template keeps earlier assistant turns verbatim
    for thinking in (True, False):
      assert ours.generation_prompt_ids(msgs, thinking).tolist() == _hf_ids(
        hf, msgs, add_generation_prompt=True, enable_thinking=thinking
      )
    resp = RESPONSES[0].replace("</think>\n", "\n</think>\n\n").replace("\n\n</think>", "\n</think>")
    p, r = ours.encode_chat(msgs, resp)
    assert np.concatenate([p, r]).tolist() == _hf_ids(hf, msgs + [{"role": "assistant", "content": resp}])


def test_broken_template_is_one_clear_line(tmp_path):
  d = str(tmp_path)
  synthetic.save_tokenizer(d)
  (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
  with pytest.raises(ValueError, match=r"chat_template.jinja: the chat template does not parse"):
    load_tokenizer(d)
  (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
  tok = load_tokenizer(d)
  with pytest.raises(ValueError, match=r"chat_template.jinja: the chat template failed to render.*no system role"):
    tok.generation_prompt_ids([{"role": "user", "content": "x"}])
