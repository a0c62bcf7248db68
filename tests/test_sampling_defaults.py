"""Sampling defaults: a flag over generation_config.json over the tool's built-in fallback, field by field."""

import json

import pytest

from pipo_jax.inference import sampling
from pipo_jax.inference.sampling import SamplingParams
from pipo_jax.io import loading


def _generation_config(tmp_path, **fields):
  (tmp_path / "generation_config.json").write_text(json.dumps(fields))
  return loading.read_generation_config(str(tmp_path))


def test_flag_over_file_over_fallback(tmp_path):
  generation = _generation_config(tmp_path, do_sample=True, temperature=0.6, top_k=20, top_p=0.95, eos_token_id=[3])
  sp = sampling.resolve(generation, sampling.SAMPLED, temperature=None, top_k=5, top_p=None)
  # temperature and top_p from the file, top_k from the flag, presence_penalty from the fallback
  assert sp == SamplingParams(temperature=0.6, top_k=5, top_p=0.95, presence_penalty=0.0)
  assert sampling.describe(sp, generation) == (
    "sampling: temperature=0.6 top_k=5 top_p=0.95 presence_penalty=0 (flags over generation_config.json defaults)"
  )


def test_no_file_gives_the_tool_fallback(tmp_path):
  assert loading.read_generation_config(str(tmp_path)) == {}
  assert sampling.resolve({}, sampling.SAMPLED, temperature=None) == SamplingParams(temperature=1.0)
  assert sampling.resolve({}, sampling.GREEDY) == SamplingParams()
  assert sampling.describe(SamplingParams(), {}).endswith("(flags over built-in defaults)")


def test_do_sample_false_means_greedy_and_a_flag_still_wins(tmp_path):
  generation = _generation_config(tmp_path, do_sample=False, temperature=0.7, top_p=0.8)
  assert sampling.resolve(generation, sampling.SAMPLED) == SamplingParams(temperature=0.0, top_p=0.8)
  assert sampling.resolve(generation, sampling.SAMPLED, temperature=0.3).temperature == 0.3


def test_bad_values_and_unknown_settings_are_refused():
  with pytest.raises(ValueError, match="top_p=1.5"):
    sampling.resolve({"top_p": 1.5}, sampling.SAMPLED)
  with pytest.raises(TypeError, match="min_p"):
    sampling.resolve({}, sampling.SAMPLED, min_p=0.1)
