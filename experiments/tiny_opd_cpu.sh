#!/usr/bin/env bash
# Tiny on-policy distillation, end to end on CPU (a few minutes on a laptop; longer on a loaded box):
#   1. teacher: the tiny preset trained in mode `ar` on the generated arithmetic task (with the native-MTP
#      auxiliary loss, so a student started from it has a working MTP head)   -> runs/tiny_teacher_cpu
#   2. student: PIPO SFT from the teacher with experiments/tiny_sft_cpu.flags   -> runs/tiny_sft_cpu
#   3. OPD prompts: unseen synthetic questions in the reference RL schema        -> runs/tiny_opd_cpu_data
#   4. OPD (experiments/tiny_opd_cpu.flags)                                     -> runs/tiny_opd_cpu/metrics.jsonl
#      (per step: rollout / teacher / train seconds, rollout tokens/s, mean rollout length, PAD ratio)
# Steps whose output exists are skipped (delete the run directory to redo one). Extra arguments go to step 4.
# Usage (from the repository root): bash experiments/tiny_opd_cpu.sh [--config.train.num_steps=N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

if [ ! -d runs/tiny_teacher_cpu/checkpoints ]; then
  $PY -m pipo_jax.train --config.mode=ar --config.workdir=runs/tiny_teacher_cpu --config.model.preset=tiny \
    --config.mesh.data=-1 --config.data.max_length=128 --config.data.batch_size=8 \
    --config.train.num_steps=300 --config.train.log_every=50 --config.train.full_finetune=True \
    --config.train.train_embeddings=True --config.loss.native_mtp_weight=1.0 --config.loss.logits_chunk=256 \
    --config.optim.learning_rate=3e-3 --config.optim.warmup_ratio=0.05 --config.optim.weight_decay=0.0 \
    --config.checkpoint.every_steps=300 --config.checkpoint.keep=1
fi
if [ ! -d runs/tiny_sft_cpu/checkpoints ]; then
  $PY -m pipo_jax.train --flagfile=experiments/tiny_sft_cpu.flags --config.checkpoint.init_from=runs/tiny_teacher_cpu
fi
if [ ! -f runs/tiny_opd_cpu_data/opd.jsonl ]; then
  # seed 1: questions drawn apart from the SFT data (seed 0); the tokenizer is the same character tokenizer.
  $PY -c "from pipo_jax.data import synthetic; synthetic.write_dataset('runs/tiny_opd_cpu_data', n_train=0, n_test=100, n_opd=400, seed=1)"
fi
$PY -m pipo_jax.train --flagfile=experiments/tiny_opd_cpu.flags "$@"
