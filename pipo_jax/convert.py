"""Checkpoint conversion between this project's orbax checkpoints and Hugging Face directories.

  python -m pipo_jax.convert --checkpoint=WORKDIR_OR_STEP_DIR --to_hf=OUT_DIR [--tokenizer_dir=DIR]
      orbax (latest step of a workdir, or a given step dir) -> HF directory; LoRA merged; the key layout of a
      merged reference PIPO checkpoint; config.json with compressor_type, mtp_num_hidden_layers, pad id;
      tokenizer files copied (from --tokenizer_dir, else the run's data.tokenizer_path / checkpoint.init_from).
  python -m pipo_jax.convert --from_hf=DIR --to_checkpoint=OUT_DIR
      HF PIPO or plain Qwen3.5 directory -> an orbax checkpoint (step 0) that `score`, `generate` and
      `--config.checkpoint.init_from` accept. PIPO heads a plain Qwen3.5 directory lacks are initialised.

Export is atomic and guarded: written to a temporary sibling, read back and validated (every tensor's shape,
dtype and finiteness, config.json, tokenizer), then renamed into place; a non-empty --to_hf needs --overwrite,
a missing tokenizer needs --allow_missing_tokenizer, non-finite params are refused. --from_hf refuses a
--to_checkpoint that already holds checkpoints.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import app, flags, logging

from pipo_jax import cli
from pipo_jax.config import Config
from pipo_jax.io import checkpoint as ckpt_lib
from pipo_jax.io import hf_pipo, loading

FLAGS = flags.FLAGS


def export_checkpoint(
  checkpoint: str, out_dir: str, tokenizer_dir: str = "", overwrite: bool = False, allow_missing_tokenizer: bool = False
) -> list:
  """orbax checkpoint -> HF directory; returns the written file names.

  Refused (nothing written) when `out_dir` is not empty and not `overwrite`, when the params are not finite,
  or when no tokenizer is found (`loading.find_tokenizer_dir`: the given dir, the checkpoint, its run's
  data.tokenizer_path / checkpoint.init_from) and not `allow_missing_tokenizer`. Written atomically: see
  `hf_pipo.export_hf`.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:  # before the (long) load
    raise FileExistsError(f"{out_dir} is not empty: pass --overwrite to replace it")
  with cli.stage(f"load {checkpoint}"):
    m = loading.load_for_cli(checkpoint, tokenizer_dir, init_heads=False, need_pad=False)
  config, params, tokenizer_dir = m.config, m.params, m.tokenizer_dir
  if not tokenizer_dir and not allow_missing_tokenizer:
    raise FileNotFoundError(
      f"{checkpoint}: no tokenizer.json with the checkpoint or its run's tokenizer_path / "
      "init_from: give --tokenizer_dir or pass --allow_missing_tokenizer"
    )
  if m.pipo_trained:
    logging.warning(
      "%s is a PIPO checkpoint: in the export, the backbone alone (as transformers' "
      "Qwen3_5ForCausalLM loads it) reads pair latents, not tokens; decode it with PIPO "
      "(compressor + backbone + MTP + confidence head), e.g. `python -m pipo_jax.generate`",
      checkpoint,
    )
  files = hf_pipo.export_hf(
    params, config, out_dir, tokenizer_dir or "", overwrite=overwrite, require_tokenizer=not allow_missing_tokenizer
  )
  logging.info("exported %s -> %s (%d files)", ckpt_lib.resolve_step_dir(checkpoint), out_dir, len(files))
  return files


@dataclasses.dataclass
class _Frozen:
  """The minimal train state a converted checkpoint holds: everything frozen, no optimizer state."""

  step: jax.Array
  trainable: dict
  frozen: dict
  opt_state: dict
  rng: jax.Array


def import_hf(model_dir: str, out_workdir: str) -> str:
  """HF directory -> orbax workdir with one step (0); returns the step directory. Refuses a workdir that
  already holds checkpoints (it would otherwise keep them and report their step as the import)."""
  if ckpt_lib.latest_step(out_workdir) is not None:
    raise FileExistsError(
      f"{out_workdir} already holds checkpoints (step {ckpt_lib.latest_step(out_workdir)}): import into a new directory"
    )
  m = loading.load_for_cli(model_dir, need_pad=False)
  config, params = m.config, m.params
  cfg = Config(model=dataclasses.replace(config, preset=None))
  cfg = dataclasses.replace(cfg, workdir=out_workdir)
  cfg.data.tokenizer_path = os.path.abspath(m.tokenizer_dir) if m.tokenizer_dir else ""
  state = _Frozen(
    step=jax.numpy.zeros((), jax.numpy.int32), trainable={}, frozen=params, opt_state={}, rng=jax.random.PRNGKey(0)
  )
  from pipo_jax.config import to_dict

  ckpt = ckpt_lib.Checkpointer(out_workdir, cfg.checkpoint, config=to_dict(cfg))
  with cli.stage(f"save {out_workdir} (step 0)"):
    ckpt.save(0, state, force=True, blocking=True)
  ckpt.close()
  return ckpt_lib.resolve_step_dir(out_workdir)


def main(argv):
  del argv
  if FLAGS.checkpoint and FLAGS.to_hf:
    export_checkpoint(
      FLAGS.checkpoint,
      FLAGS.to_hf,
      FLAGS.tokenizer_dir,
      overwrite=FLAGS.overwrite,
      allow_missing_tokenizer=FLAGS.allow_missing_tokenizer,
    )
  elif FLAGS.from_hf and FLAGS.to_checkpoint:
    print(import_hf(FLAGS.from_hf, FLAGS.to_checkpoint))
  else:
    raise app.UsageError("give --checkpoint=DIR --to_hf=OUT, or --from_hf=DIR --to_checkpoint=OUT")


def define_flags():
  """The CLI's flags (defined by `cli.run`, only when this module is the program)."""
  flags.DEFINE_string("checkpoint", "", "orbax workdir or step dir to export")
  flags.DEFINE_string("to_hf", "", "output HF directory")
  flags.DEFINE_string("tokenizer_dir", "", "directory whose tokenizer files are copied into the export")
  flags.DEFINE_string("from_hf", "", "HF directory to import")
  flags.DEFINE_string("to_checkpoint", "", "output orbax workdir")
  flags.DEFINE_bool("overwrite", False, "replace a non-empty --to_hf directory")
  flags.DEFINE_bool("allow_missing_tokenizer", False, "export without tokenizer files when none is found")


if __name__ == "__main__":
  cli.run(main, define_flags)
