"""The PIPO model against independent references.

* Compressor initialisations by hand: linear = [I | I] (z = a + b exactly), mlp_residual = a + b exactly, mlp =
  silu(a) + silu(b) (the reference's init).
* The compressed training forward against transformers: the backbone stream is HF's Qwen3_5ForCausalLM run on
  inputs_embeds = e_2i + e_2i+1; the MTP stream is the MTP head (docs/method.md#mtp-head) assembled in torch from
  HF's own Qwen3_5DecoderLayer / Qwen3_5RMSNorm with our exported `mtp.*` weights, teacher-forced as in
  docs/method.md#index-alignment (slot j: e(x_2j+2) with h_j at RoPE position j).
* `score --pipo` on left-padded batches of odd and even lengths equals one-sequence forwards, in the documented
  per-token alignment.
"""

import dataclasses

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import ModelConfig, resolve_model_config
from pipo_jax.io import hf_pipo, loading
from pipo_jax.models.pipo import Compressor, PipoModel, init_pipo_params


def _compress(kind: str, e_BL2D):
  cfg = resolve_model_config(ModelConfig(preset="tiny", compressor_type=kind))
  params = init_pipo_params(cfg, jax.random.PRNGKey(0))
  return params["compressor"], np.asarray(Compressor(cfg).apply({"params": params["compressor"]}, e_BL2D))


@pytest.fixture(scope="module")
def pairs():
  return np.random.RandomState(0).normal(size=(2, 5, 2, 64)).astype(np.float32)


def test_linear_init_is_identity_pair_sum(pairs):
  params, z = _compress("linear", pairs)
  kernel = np.asarray(params["linear"]["kernel"])  # [2D, D] = torch weight [D, 2D] transposed
  np.testing.assert_array_equal(kernel, np.concatenate([np.eye(64), np.eye(64)], 0))
  np.testing.assert_array_equal(np.asarray(params["linear"]["bias"]), 0)
  np.testing.assert_array_equal(z, pairs[..., 0, :] + pairs[..., 1, :])


def test_mlp_residual_init_is_exactly_the_pair_sum(pairs):
  _, z = _compress("mlp_residual", pairs)
  np.testing.assert_array_equal(z, pairs[..., 0, :] + pairs[..., 1, :])


def test_mlp_init_is_the_reference_silu_sum(pairs):
  _, z = _compress("mlp", pairs)
  silu = lambda x: x / (1 + np.exp(-x))
  np.testing.assert_allclose(z, silu(pairs[..., 0, :]) + silu(pairs[..., 1, :]), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_pipo(tmp_path_factory):
  """(HF model, our config, our params with perturbed MTP norms and a linear compressor)."""
  model = hf_tiny.make_hf_model((hf_tiny.LIN, hf_tiny.LIN, hf_tiny.LIN, hf_tiny.FULL), tie=False, seed=3)
  path = str(tmp_path_factory.mktemp("hf_tiny"))
  model.save_pretrained(path)
  cfg, params = loading.load_model(path, ModelConfig(preset=None, compressor_type="linear", pad_token_id=1))
  rng = np.random.RandomState(1)
  # The MTP head is freshly initialised (the tiny HF model has no mtp.*); perturb its (1+w) norms so they matter.
  params["mtp"] = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32) if x.ndim == 1 else x, params["mtp"]
  )
  return model, cfg, params


def _torch_mtp_logits(model, mtp_tensors, e_BJD, h_BJD):
  """The MTP head in torch from HF modules: norm(layer(fc([norm_e(e); norm_h(h)]))) @ lm_head."""
  import torch
  from transformers.models.qwen3_5 import modeling_qwen3_5 as m

  cfg = model.config
  full_cfg = dataclasses.replace(cfg) if dataclasses.is_dataclass(cfg) else cfg.__class__(**cfg.to_dict())
  full_cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
  full_cfg._attn_implementation = "eager"
  layer = m.Qwen3_5DecoderLayer(full_cfg, layer_idx=0).eval()
  D = cfg.hidden_size
  norm_e, norm_h, norm = (m.Qwen3_5RMSNorm(D, eps=cfg.rms_norm_eps) for _ in range(3))
  fc = torch.nn.Linear(2 * D, D, bias=False)
  t = {k: torch.from_numpy(np.array(v)) for k, v in mtp_tensors.items()}
  layer.load_state_dict({k[len("mtp.layers.0.") :]: v for k, v in t.items() if k.startswith("mtp.layers.0.")})
  norm_e.weight.data, norm_h.weight.data = t["mtp.pre_fc_norm_embedding.weight"], t["mtp.pre_fc_norm_hidden.weight"]
  norm.weight.data, fc.weight.data = t["mtp.norm.weight"], t["mtp.fc.weight"]
  with torch.no_grad():
    e, h = torch.from_numpy(e_BJD), torch.from_numpy(h_BJD)
    x = fc(torch.cat([norm_e(e), norm_h(h)], -1))
    B, J, _ = x.shape
    pos = torch.arange(J)[None].expand(B, J)
    cos_sin = model.model.rotary_emb(x, pos)
    mask = torch.triu(torch.full((J, J), float("-inf")), 1)[None, None].expand(B, 1, J, J)
    x = layer(x, position_embeddings=cos_sin, attention_mask=mask, position_ids=pos)
    return model.lm_head(norm(x)).numpy()


def test_compressed_forward_matches_transformers_both_streams(tiny_pipo):
  import torch

  model, cfg, params = tiny_pipo
  ids = np.random.RandomState(2).randint(2, 256, (2, 24))
  out = PipoModel(cfg).apply({"params": params}, jnp.asarray(ids))
  w = np.asarray(PipoModel(cfg).apply({"params": params}, method=PipoModel.head_kernel))
  ours_b = np.asarray(out["h_BJD"]) @ w
  ours_m = np.asarray(out["m_BJD"]) @ w
  with torch.no_grad():
    emb = model.model.embed_tokens(torch.from_numpy(ids))
    z = emb[:, 0::2] + emb[:, 1::2]  # the linear compressor at init
    hidden = model.model(inputs_embeds=z).last_hidden_state  # post final norm, RoPE positions 0..L-1
    ref_b = model.lm_head(hidden).numpy()[:, :-1]
    e1 = model.model.embed_tokens(torch.from_numpy(ids[:, 2::2])).numpy()
  mtp = {k: v for k, v in hf_pipo.to_hf_tensors(params, cfg).items() if k.startswith("mtp.")}
  ref_m = _torch_mtp_logits(model, mtp, e1, hidden.numpy()[:, :-1])
  err_b, err_m = np.abs(ours_b - ref_b).max(), np.abs(ours_m - ref_m).max()
  print(f"compressed forward vs transformers: backbone {err_b:.3g}, mtp {err_m:.3g}")
  assert err_b <= 1e-4 and err_m <= 1e-4


def test_score_pipo_left_padded_batches_equal_single_forwards(tiny_pipo, tmp_path):
  from pipo_jax.evaluation import score_pipo

  _, cfg, params = tiny_pipo
  rng = np.random.RandomState(4)
  seqs = [rng.randint(2, 256, n) for n in (5, 12, 9, 2)]
  recs = score_pipo.score_sequences_pipo(cfg, params, seqs, batch_size=4, pad_id=1)
  model = PipoModel(cfg)
  w = np.asarray(model.apply({"params": params}, method=PipoModel.head_kernel))
  logsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  for s, rec in zip(seqs, recs):
    n = len(s)
    ids = np.append(s, 1) if n % 2 else s
    out = model.apply({"params": params}, jnp.asarray(ids[None]))
    lb = logsm(np.asarray(out["h_BJD"][0]) @ w)
    lm = logsm(np.asarray(out["m_BJD"][0]) @ w)
    conf = 1 / (1 + np.exp(-np.asarray(out["conf_logit_BJ"][0])))
    assert len(rec["backbone_logprobs"]) == n - 1
    for t in range(1, n):
      b, mm, c = rec["backbone_logprobs"][t - 1], rec["mtp_logprobs"][t - 1], rec["confidence"][t - 1]
      if t % 2 == 0:  # backbone slot j = t/2 - 1 predicts x_t
        assert mm is None and c is None
        assert b == pytest.approx(lb[t // 2 - 1, s[t]], abs=1e-4)
      elif t >= 3:  # MTP slot j = (t-3)/2 predicts x_t
        assert b is None
        assert mm == pytest.approx(lm[(t - 3) // 2, s[t]], abs=1e-4)
        assert c == pytest.approx(conf[(t - 3) // 2], abs=1e-5)
      else:
        assert b is None and mm is None and c is None
