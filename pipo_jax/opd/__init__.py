"""On-policy distillation (mode `opd`) of a PIPO student from a frozen teacher.

Modules, in the order a step uses them:
  rollout         student rollouts in pipo mode on the training mesh, their training encoding, the teacher's
                  weights (`Rollout`, `encode_rollouts`, `rollout_length`, `load_teacher`)
  pad_compaction  the teacher's PAD-free view of a rollout and the teacher/student stream alignment
  loss            teacher scoring (`make_teacher_fn`, `teacher_head`) and the OPD loss (`make_opd_loss`)
  divergences     the per-token divergences (sampled, topk, full, jsd) and confidence targets, chunked
  trainer         `OPDTrainer`: the mode's plug-ins for the one training loop (`pipo_jax.trainer.Trainer`)
  memory          compiled per-device memory of the teacher scoring and the OPD train step (no weights)
"""
