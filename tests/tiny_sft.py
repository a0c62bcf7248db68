"""The tiny SFT run of the training tests: one config builder for tests/test_sft_training.py and the fault
tests' child process (tests/fault_child.py, run as a script: it finds this module next to itself on sys.path)."""

import os

from pipo_jax.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  LossConfig,
  MeshConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)


def tiny_sft_config(
  data_dir: str,
  workdir: str,
  *,
  steps: int,
  max_length: int,
  checkpoint: CheckpointConfig,
  mesh: MeshConfig | None = None,
  **train_kw,
) -> Config:
  """The tiny preset (MLP-residual compressor) fully fine-tuned on the generated arithmetic task in `data_dir`
  (tests: `synthetic.write_dataset`): batches of 8, at most 25% PAD, lr 3e-3 without warmup or weight decay, a
  metrics line every step. 1 device unless `mesh`; `train_kw` go to TrainConfig."""
  return Config(
    mode="sft",
    workdir=workdir,
    model=ModelConfig(preset="tiny", compressor_type="mlp_residual"),
    mesh=MeshConfig(data=1, fsdp=1, tensor=1) if mesh is None else mesh,
    data=DataConfig(
      train_path=os.path.join(data_dir, "train.jsonl"),
      tokenizer_path=os.path.join(data_dir, "tokenizer"),
      max_length=max_length,
      batch_size=8,
      max_pad_ratio=0.25,
      seed=0,
    ),
    optim=OptimConfig(learning_rate=3e-3, warmup_ratio=0.0, weight_decay=0.0),
    loss=LossConfig(logits_chunk=64),
    checkpoint=checkpoint,
    train=TrainConfig(num_steps=steps, log_every=1, full_finetune=True, **train_kw),
  )
