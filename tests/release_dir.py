"""A tiny directory laid out like a Qwen3.5 release: what a user downloads from the hub, in miniature.

* config.json: the VLM wrapper (`Qwen3_5ForConditionalGeneration`) with the text model under `text_config`,
  `pad_token_id: null` (as released), `eos_token_id` naming `<|endoftext|>`, `mtp_num_hidden_layers: 1`;
* weights as `model.language_model.*` (+ one `model.visual.*` tensor, + `mtp.*`) in two safetensors shards
  with a `model.safetensors.index.json`;
* tokenizer.json / tokenizer_config.json (pad `<|endoftext|>`, eos `<|im_end|>`) of the synthetic task's
  character tokenizer, plus chat_template.jinja (the Qwen3.5-style template of tests/qwen3_5_template.jinja);
* generation_config.json with Qwen3.5's sampling defaults.

The backbone is transformers' random Qwen3_5ForCausalLM of tests/hf_tiny.py, so transformers is the
reference for everything the backbone computes.
"""

from __future__ import annotations

import json
import os

import hf_tiny
import numpy as np
import torch
from safetensors.numpy import save_file

TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "qwen3_5_template.jinja")
GENERATION_CONFIG = {
  "do_sample": True,
  "temperature": 0.6,
  "top_k": 20,
  "top_p": 0.95,
  "eos_token_id": [3, 1],
  "bos_token_id": None,
}


def make_release_dir(path: str, seed: int = 0):
  """Write the release-like directory; returns the transformers model its backbone is."""
  import jax

  from pipo_jax.config import model_config_from_hf
  from pipo_jax.data import synthetic
  from pipo_jax.io import hf
  from pipo_jax.models.pipo import init_pipo_params

  model = hf_tiny.make_hf_model([hf_tiny.LIN, hf_tiny.FULL], tie=False, seed=seed)
  os.makedirs(path, exist_ok=True)
  text = model.config.to_dict()
  for k in ("architectures", "transformers_version", "torch_dtype", "dtype"):
    text.pop(k, None)
  text.update(model_type="qwen3_5_text", pad_token_id=None, eos_token_id=1, bos_token_id=None, mtp_num_hidden_layers=1)
  config = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "text_config": text,
    "vision_config": {"depth": 1, "hidden_size": 8},
    "image_token_id": 99,
    "tie_word_embeddings": False,
  }
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=1)

  tensors = {}
  for name, p in model.state_dict().items():
    arr = p.detach().to(torch.float32).numpy()
    tensors[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name] = arr
  tensors["model.visual.patch_embed.proj.weight"] = np.zeros((8, 3), np.float32)
  ours = init_pipo_params(model_config_from_hf(config), jax.random.PRNGKey(seed))
  tensors.update({k: np.asarray(v, np.float32) for k, v in hf.mtp_to_hf_tensors(ours["mtp"]).items()})
  names = sorted(tensors)
  half = len(names) // 2
  weight_map = {}
  for i, part in enumerate((names[:half], names[half:])):
    fname = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({n: np.ascontiguousarray(tensors[n]) for n in part}, os.path.join(path, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)

  synthetic.save_tokenizer(path)
  with open(TEMPLATE_PATH) as f:
    template = f.read()
  with open(os.path.join(path, "chat_template.jinja"), "w") as f:
    f.write(template)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(GENERATION_CONFIG, f)
  return model
