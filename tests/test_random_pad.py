"""The random-PAD control of PIPO decoding (`generate(..., random_pad_ratio=r)`), the paper's Fig. 6 baseline.

The coin flip uses a key folded from token2's sampling key, so at r = 0 the control must reproduce the
keep-everything decode (tau < 0) and at r = 1 the no-draft decode (tau >= 1) slot for slot; in between its
PAD share must track r.
"""

import jax
import numpy as np
import pytest

from pipo_jax.config import ModelConfig, resolve_model_config
from pipo_jax.inference.api import generate, left_pad
from pipo_jax.inference.sampling import SamplingParams
from pipo_jax.models.pipo import init_pipo_params

SP = SamplingParams(temperature=1.0)
PAD = 1


@pytest.fixture(scope="module")
def setup():
  cfg = resolve_model_config(ModelConfig(preset="tiny", vocab_size=32))
  params = init_pipo_params(cfg, jax.random.PRNGKey(0))
  ids, valid = left_pad([[5, 6, 7, 8], [9, 10, 11, 12]] * 8, 4, PAD)
  return cfg, params, ids, valid


def _gen(setup, **kw):
  cfg, params, ids, valid = setup
  return jax.device_get(
    generate(
      params, cfg, ids, valid, mode="pipo", sampling=SP, max_new_tokens=24, rng=jax.random.PRNGKey(3), stop_ids=[], **kw
    )
  )


def _pad_share(r):
  """PAD slots / token2 slots written (the evaluator's PAD ratio)."""
  return r.raw_is_pad.sum() / (r.raw_len // 2).sum()


def test_ratio_zero_equals_keep_all(setup):
  ctl, ref = _gen(setup, random_pad_ratio=0.0), _gen(setup, conf_threshold=-1.0)
  np.testing.assert_array_equal(ctl.raw, ref.raw)
  assert _pad_share(ctl) == 0.0


def test_ratio_one_equals_no_drafts(setup):
  ctl, ref = _gen(setup, random_pad_ratio=1.0), _gen(setup, conf_threshold=1.0)
  np.testing.assert_array_equal(ctl.raw, ref.raw)
  np.testing.assert_array_equal(ctl.raw_is_pad, ref.raw_is_pad)
  assert _pad_share(ctl) == 1.0


def test_ratio_tracks_probability(setup):
  share = _pad_share(_gen(setup, random_pad_ratio=0.4))
  # 16 rows x ~12-24 token2 decisions: the share is within a few standard errors of 0.4.
  assert 0.25 < share < 0.55


def test_rejects_other_modes(setup):
  cfg, params, ids, valid = setup
  with pytest.raises(ValueError, match="random_pad_ratio"):
    generate(params, cfg, ids, valid, mode="ar", sampling=SP, max_new_tokens=4, random_pad_ratio=0.5)
