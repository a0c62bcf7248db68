r"""Where a decode step's time goes: the model's layers, the LM heads and sampling, and the rest of the loop.

  python -m pipo_jax.decode_profile [--checkpoint=DIR | --preset=qwen3_5_4b_narrow] --prompt_len=128 \
      --new_tokens=128 --batch_size=1 --decode=ar,mtp,mtp_spec,pipo --output=profile.json

For every mode three programs of the same number of steps and the same cache sizes are timed:
  full     the mode's real token loop (inference.api.decode_fn, greedy, no stop ids), per decode step;
  layers   a fori_loop that runs only the mode's model layers on its step shape: ar the backbone on 1 token;
           mtp and mtp_spec the backbone on 2 tokens then the MTP layer on 2 slots (mtp_spec with the rollback
           cache); pipo the compressor + backbone on 1 pair then MTP on 1 slot (the full loop runs at
           tau = -1, which keeps every draft without the confidence head);
  +heads   the same plus the LM heads the mode computes per step (ar 1, mtp 2, mtp_spec 3: both verified
           positions and the next draft, pipo 2) and their greedy argmax.
Each step's tokens come from the previous step's outputs, so nothing is hoisted out of the loop. heads =
(+heads) - layers; loop = full - (+heads) is what an iteration costs beyond the model: the output tracker,
presence sets, acceptance and rollback bookkeeping, stop checks, while-loop carry copies. Figures are medians
over --repeats rounds (modes timed in turn), with the min-max spread.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pipo_jax import bench, cli
from pipo_jax.config import ModelConfig
from pipo_jax.inference import common as C
from pipo_jax.inference.api import MODES, params_for_backend
from pipo_jax.io import loading
from pipo_jax.models.pipo import init_mtp_cache

FLAGS = flags.FLAGS

# Per mode: (backbone tokens per step, compressed pairs?, MTP slots per step, LM heads per step).
STEP_SHAPES = {"ar": (1, False, 0, 1), "mtp": (2, False, 2, 2), "mtp_spec": (2, False, 2, 3), "pipo": (2, True, 1, 2)}


def define_flags():
  flags.DEFINE_string("checkpoint", "", "orbax workdir / step dir, or HF directory")
  flags.DEFINE_string("preset", "", "without --checkpoint: a preset of pipo_jax.config.PRESETS, random init")
  flags.DEFINE_integer("prompt_len", 128, "prompt tokens (the caches start this full)")
  flags.DEFINE_integer("batch_size", 1, "rows")
  flags.DEFINE_list("decode", list(MODES), "modes to profile")
  flags.DEFINE_integer("new_tokens", 128, "max_new_tokens of the real loop; the layer loops run as many steps")
  flags.DEFINE_integer("repeats", 5, "timed rounds")
  flags.DEFINE_float("min_window_s", 0.2, "each timed window repeats its call until it lasts this long")
  flags.DEFINE_string("output", "", "JSON file for the records (optional)")
  flags.DEFINE_integer("seed", 0, "prompt and init seed")


def _filled(cache: dict, used: int) -> dict:
  """A cache whose first `used` slots count as written (valid), as after a prompt of that length."""
  valid_BS = cache["valid_BS"].at[:, :used].set(True)
  return dict(cache, valid_BS=valid_BS, index=jnp.asarray(used, jnp.int32))


def layer_loop(cfg: ModelConfig, mode: str, batch: int, prompt_len: int, steps: int, heads: bool):
  """fn(params) running `steps` of the mode's layer work (module docstring) -> the last tokens [B]."""
  T, paired, J, n_heads = STEP_SHAPES[mode]
  B = batch
  P = prompt_len // 2 if paired else prompt_len
  per_step = 1 if paired else T
  S = P + per_step * steps + 2

  def next_tokens(params, h_BXD, m_BJD):
    """[B] token ids that depend on this step's outputs: the argmax of the LM heads (heads=True) or a cheap
    function of the hidden states (layers only)."""
    outs_BXD = h_BXD if m_BJD is None else jnp.concatenate([h_BXD, m_BJD], axis=1)
    if not heads:
      return jnp.argmax(outs_BXD[:, -1], axis=-1).astype(jnp.int32) % cfg.vocab_size
    picked_BXD = outs_BXD[:, -n_heads:] if outs_BXD.shape[1] >= n_heads else outs_BXD
    toks_BX = jnp.argmax(C.logits(cfg, params, picked_BXD), axis=-1).astype(jnp.int32)
    return toks_BX[:, -1]

  def run(params):
    cache = _filled(C.init_backbone_cache(cfg, params, B, S, rollback=mode == "mtp_spec"), P)
    mcache = _filled(init_mtp_cache(cfg, B, S), P) if J else None
    tok_B = jnp.full((B,), 2, jnp.int32)

    def body(i, carry):
      cache, mcache, tok_B = carry
      pos_B = P + per_step * i + jnp.zeros((B,), jnp.int32)
      ids_BT = jnp.stack([tok_B] * T, axis=1)
      if paired:
        h_BXD, cache = C.pairs(cfg, params, ids_BT, pos_B[:, None], jnp.ones((B, 1), bool), cache)
      else:
        pos_BT = pos_B[:, None] + jnp.arange(T)[None]
        h_BXD, cache = C.backbone(cfg, params, C.embed(cfg, params, ids_BT), pos_BT, jnp.ones((B, T), bool), cache)
      m_BJD = None
      if J:
        mpos_BJ = pos_B[:, None] + jnp.arange(J)[None]
        mtok_BJ = jnp.stack([tok_B] * J, axis=1)
        m_BJD, mcache = C.mtp_only(cfg, params, mtok_BJ, h_BXD, mpos_BJ, jnp.ones((B, J), bool), mcache)
      return cache, mcache, next_tokens(params, h_BXD, m_BJD)

    return jax.lax.fori_loop(0, steps, body, (cache, mcache, tok_B))[2]

  return jax.jit(run)


def profile(config, params, modes, prompt_len, batch, new_tokens, repeats, min_window_s, seed=0, log=print) -> list:
  """One record per mode: full / layers / +heads step times (median, min, max) and the derived shares."""
  params = params_for_backend(config, params)  # the layout bench.prepare runs the real loop in, made once
  cases = []
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"--decode: unknown mode {mode!r}; expected some of {MODES}")
    log(f"[decode_profile] compiling {mode}")
    rec, _, decode = bench.prepare(config, params, mode, -1.0, prompt_len, batch, new_tokens, seed)
    steps = rec["decode_steps"]
    fns = {"full": decode}
    for name, heads in (("layers", False), ("+heads", True)):
      fns[name] = functools.partial(layer_loop(config, mode, batch, prompt_len, steps, heads), params)
    for fn in fns.values():
      jax.block_until_ready(fn())  # compile + warm-up
    cases.append((mode, steps, fns))
  times = {(m, k): [] for m, _, fns in cases for k in fns}
  for r in range(repeats):
    for mode, steps, fns in cases:
      for k, fn in fns.items():
        times[(mode, k)].append(bench.timed_window(fn, min_window_s) / steps)
    log(f"[decode_profile] round {r + 1}/{repeats} done")
  records = []
  for mode, steps, fns in cases:
    full, layers, with_heads = (np.asarray(times[(mode, k)]) for k in fns)
    rec = {"mode": mode, "batch_size": batch, "prompt_len": prompt_len, "decode_steps": steps}
    per_round = {
      "full_step_s": full,
      "layers_step_s": layers,
      "heads_step_s": with_heads - layers,
      "loop_step_s": full - with_heads,
      "loop_share": (full - with_heads) / full,
    }
    rec = bench.with_spread(rec, per_round)
    records.append(rec)
  return records


def main(argv):
  del argv
  m = loading.load_for_cli(FLAGS.checkpoint, "", FLAGS.preset, FLAGS.seed, need_pad="pipo" in FLAGS.decode)
  records = profile(
    m.config,
    m.params,
    FLAGS.decode,
    FLAGS.prompt_len,
    FLAGS.batch_size,
    FLAGS.new_tokens,
    FLAGS.repeats,
    FLAGS.min_window_s,
    FLAGS.seed,
  )
  print(f"per decode step, median over {FLAGS.repeats} rounds (min-max), batch {FLAGS.batch_size}:")
  for r in records:

    def us(name, r=r):
      return f"{r[name] * 1e6:7.1f} ({r[name + '_min'] * 1e6:.1f}-{r[name + '_max'] * 1e6:.1f})us"

    print(
      f"{r['mode']:9s} full {us('full_step_s')}  layers {us('layers_step_s')}  heads+argmax {us('heads_step_s')}"
      f"  loop {us('loop_step_s')} = {100 * r['loop_share']:.0f}% of the step"
    )
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  cli.run(main, define_flags)
