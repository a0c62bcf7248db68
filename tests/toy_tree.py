"""A toy params tree with the real naming (WORKSPACE.md contract) for infrastructure tests."""

import jax
import jax.numpy as jnp
import numpy as np

R, D, V, HD, I = 2, 8, 16, 4, 12  # stacked repeats, model dim, vocab, head dim, MLP dim


def _k(rng, *shape):
  return {"kernel": (rng.standard_normal(shape) * 0.1).astype(np.float32)}


def _s(*shape):
  return {"scale": np.ones(shape, np.float32)}


def toy_params(seed: int = 0) -> dict:
  """Host numpy arrays turned into jax arrays at the end: no per-shape compiles (tests stay fast)."""
  g = np.random.default_rng(seed)
  ks = iter([g] * 64)
  mlp = lambda lead: {
    "gate_proj": _k(next(ks), *lead, D, I),
    "up_proj": _k(next(ks), *lead, D, I),
    "down_proj": _k(next(ks), *lead, I, D),
  }
  attn = lambda lead: {
    "q_proj": _k(next(ks), *lead, D, 2 * 2 * HD),
    "k_proj": _k(next(ks), *lead, D, HD),
    "v_proj": _k(next(ks), *lead, D, HD),
    "o_proj": _k(next(ks), *lead, 2 * HD, D),
    "q_norm": _s(*lead, HD),
    "k_norm": _s(*lead, HD),
  }
  tree = {
    "backbone": {
      "embed_tokens": {"embedding": g.standard_normal((V, D)).astype(np.float32)},
      "layers": {
        "layer_0": {
          "linear_attn": {
            "in_proj_qkv": _k(next(ks), R, D, 3 * HD),
            "out_proj": _k(next(ks), R, HD, D),
            "A_log": np.zeros((R, 2), np.float32),
          },
          "mlp": mlp((R,)),
          "input_layernorm": _s(R, D),
        },
        "layer_1": {"self_attn": attn((R,)), "mlp": mlp((R,)), "input_layernorm": _s(R, D)},
      },
      "norm": _s(D),
      "lm_head": _k(next(ks), D, V),
    },
    "mtp": {
      "fc": _k(next(ks), 2 * D, D),
      "pre_fc_norm_embedding": _s(D),
      "pre_fc_norm_hidden": _s(D),
      "norm": _s(D),
      "layer": {"input_layernorm": _s(D), "post_attention_layernorm": _s(D), "self_attn": attn(()), "mlp": mlp(())},
    },
    "compressor": {
      "mlp_0": {"kernel": (g.standard_normal((2 * D, D)) * 0.1).astype(np.float32), "bias": np.zeros(D, np.float32)},
      "mlp_2": {"kernel": (g.standard_normal((D, D)) * 0.1).astype(np.float32), "bias": np.zeros(D, np.float32)},
    },
    "confidence_head": {"norm": _s(D), "fc1": _k(next(ks), D, D), "fc2": _k(next(ks), D, 1)},
  }
  return jax.tree_util.tree_map(jnp.asarray, tree)


def leaf_paths(tree, prefix=()):
  out = []
  for k, v in tree.items():
    if isinstance(v, dict):
      out += leaf_paths(v, prefix + (k,))
    else:
      out.append("/".join(prefix + (k,)))
  return out


def toy_loss(params, x_BD, y_B):
  """A scalar mean loss touching every leaf (so frozen params would move if they were trained)."""
  h = x_BD
  total = 0.0
  for leaf in jax.tree_util.tree_leaves(params):
    total = total + jnp.mean(leaf) * 0.01
  w = (
    params["mtp"]["fc"]["kernel"][:D] + params["backbone"]["layers"]["layer_1"]["mlp"]["gate_proj"]["kernel"][0, :, :D]
  )
  pred = jnp.tanh(h @ w).sum(-1)
  return jnp.mean((pred - y_B) ** 2) + total
