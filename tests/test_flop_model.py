"""pipo_jax.flop_model against the compiler and against hand-worked counts.

The reference is the step the trainer jits, built as memory_plan builds it (`build_step`: the mode's loss under
`optim.make_train_step`, the TrainState's trainable / frozen partition, OPD's teacher-scoring program) on one CPU
device, compiled by XLA. Two readings of the compiled program:

  * `compiled.cost_analysis()`: XLA's own FLOP count, but it visits a while-loop body once. The loop-free cases
    below use the unrolled layer stack (`scan_layers=False`), one delta-rule chunk, one LM-head chunk and no
    accumulation, so every loop left has one iteration (XLA inlines those) except the RNG's tiny threefry loop;
    there cost_analysis counts everything, and `hlo_stats.analyze` (which reads the same HLO and multiplies loop
    bodies by their trip counts) must agree with it. The looped cases rely on hlo_stats' trip counts instead.
  * `hlo_stats.analyze(...)["dot_flops"]`: the dot instructions alone, which is what the model counts. XLA also
    counts elementwise work (the AdamW update, RMSNorms, softmax over the vocabulary, the delta rule's gates and
    masks, SiLU): 5-12 % of its total on these tiny models (measured), which the model leaves out as MFU does.
"""

import jax
import jax.numpy as jnp
import pytest

from pipo_jax import flop_model, hlo_stats, memory_plan, sharding
from pipo_jax.config import (
  FULL,
  Config,
  DataConfig,
  LoraConfig,
  LossConfig,
  MeshConfig,
  ModelConfig,
  OPDConfig,
  OptimConfig,
  TrainConfig,
)
from pipo_jax.io import loading
from pipo_jax.models import triangular


def _config(mode="sft", preset="tiny", B=2, T=64, model=None, train=None, **kw) -> Config:
  m = ModelConfig(preset=preset, **{"scan_layers": False, **(model or {})})
  extra = {}
  if mode == "opd":
    extra["opd"] = OPDConfig(
      teacher=ModelConfig(preset=preset, scan_layers=m.scan_layers), prompt_length=16, max_new_tokens=24
    )
  return Config(
    mode=mode,
    model=m,
    mesh=MeshConfig(data=1, fsdp=1, tensor=1),
    data=DataConfig(batch_size=B, max_length=T),
    loss=kw.pop("loss", LossConfig(logits_chunk=4096)),
    train=train or TrainConfig(full_finetune=True, train_embeddings=True),
    **extra,
    **kw,
  )


def _compile(cfg: Config):
  """(model Flops, [hlo_stats of each compiled program], [cost_analysis of each])."""
  mc = loading.model_config_of(cfg)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  built = memory_plan.build_step(cfg, mc, mesh)
  compiled, _, _ = memory_plan.compile_step(built, mesh)
  programs = [compiled] + ([built["scoring_compiled"]] if built["scoring"] is not None else [])
  stats = [hlo_stats.analyze(c.as_text()) for c in programs]
  cas = []
  for c in programs:
    ca = c.cost_analysis()
    cas.append(ca[0] if isinstance(ca, (list, tuple)) else ca)
  trained = flop_model.trained_modules(built["state"].trainable)
  model = flop_model.train_step(cfg, mc, trained, built["length"], built.get("teacher_cfg"))
  return model, stats, cas


# ------------------------------------------------------------------------------------------------
# By hand
# ------------------------------------------------------------------------------------------------

# One full-attention layer: D=8, H=2 query heads, G=1 kv head, K=4, F=16, V=32, untied head, no MTP.
ONE_LAYER = dict(
  vocab_size=32,
  hidden_size=8,
  intermediate_size=16,
  num_hidden_layers=1,
  layer_types=(FULL,),
  num_attention_heads=2,
  num_key_value_heads=1,
  head_dim=4,
  tie_word_embeddings=False,
  mtp_num_hidden_layers=0,
)


def _one_layer_ar(train: TrainConfig) -> Config:
  return _config("ar", B=1, T=4, model=ONE_LAYER, train=train)


def test_one_dense_layer_by_hand():
  # Per token: q_proj (with the gate) 2*8*16 = 256, k_proj 2*8*4 = 64, v_proj 64, o_proj 2*8*8 = 128, MLP
  # 3 * 2*8*16 = 768: 1280 x 4 tokens = 5120. Attention (dense, the whole 4 x 4 matrix): scores and values
  # 2 * (2 * 2 heads * 4 * 4 * 4) = 512. LM head on the 3 predicting positions: 3 * 2*8*32 = 1536.
  forward = 5120 + 512 + 1536
  assert forward == 7168
  cfg = _one_layer_ar(TrainConfig(full_finetune=True, train_embeddings=True))
  mc = loading.model_config_of(cfg)
  everything = frozenset(["backbone"])  # a prefix: every backbone parameter, embeddings and LM head included
  # Embeddings trained: every matmul gets its input gradient and its weight gradient (or both operand gradients).
  f = flop_model.train_step(cfg, mc, everything, 4)
  assert (f.forward, f.backward, f.recompute) == (7168, 2 * 7168, 0)
  # Only the final norm trained: the backward is the LM head's input gradient alone (the norm's gradient needs
  # dL/dh); nothing below the norm is trained, so the layer has no backward.
  f = flop_model.train_step(cfg, mc, frozenset(["backbone/norm"]), 4)
  assert (f.forward, f.backward) == (7168, 1536)
  # The same step's forward as a frozen model (OPD's teacher): forward only, no LM head.
  assert flop_model.teacher_scoring(mc, 1, 4).total == 5120 + 512


def test_one_dense_layer_compiled_equals_the_hand_count():
  """The hand figures above are what XLA compiles (not just what the model says)."""
  for train, hand in [
    (TrainConfig(full_finetune=True, train_embeddings=True), 3 * 7168),
    (TrainConfig(trainable=("backbone/norm",)), 7168 + 1536),
  ]:
    _, stats, _ = _compile(_one_layer_ar(train))
    assert stats[0]["dot_flops"] == hand


def test_flash_block_pairs_by_hand():
  # T = 10, blocks of 4: query blocks end at slots 3, 7, 9 and see key blocks {0}, {0, 1}, {0, 1, 2}.
  assert flop_model.flash_block_pairs(10, 4) == 1 + 2 + 3
  assert flop_model.flash_block_pairs(8, 4) == 3
  assert flop_model.flash_block_pairs(3, 4) == 1


@pytest.mark.parametrize("n", [8, 16, 48, 64])
def test_unit_lower_inverse_matches_compiler(n):
  compiled = jax.jit(triangular.unit_lower_inverse).lower(jax.ShapeDtypeStruct((3, n, n), jnp.float32)).compile()
  assert hlo_stats.analyze(compiled.as_text())["dot_flops"] == 3 * flop_model.unit_lower_inverse(n)


def test_trained_modules_from_a_train_state_tree():
  trainable = {
    "compressor": {"mlp_0": {"kernel": 0, "bias": 0}},
    "lora": {"backbone": {"layers": {"layer_3": {"mlp": {"up_proj": {"a": 0, "b": 0}}}}}},
  }
  assert flop_model.trained_modules(trainable) == {"compressor/mlp_0", "backbone/layers/layer_3/mlp/up_proj"}


# ------------------------------------------------------------------------------------------------
# Against the compiler: loop-free steps (cost_analysis counts everything once)
# ------------------------------------------------------------------------------------------------

LOOP_FREE = {
  # Everything trained (the demo's recipe): compressor, backbone, MTP, confidence head, tied-free LM head.
  "sft_full": dict(mode="sft"),
  # The default trainable set: the backbone frozen (input gradients only, down to the compressor), no LM-head dW.
  "sft_heads": dict(mode="sft", train=TrainConfig()),
  # LoRA on attention / MLP kernels (full dW through the adapters) plus the merges W + s A B.
  "sft_lora": dict(mode="sft", train=TrainConfig(), lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0)),
  # ar with the native-MTP auxiliary loss, on the full T tokens.
  "ar_native_mtp": dict(mode="ar", loss=LossConfig(logits_chunk=4096, native_mtp_weight=1.0)),
  # opd: the student step (student and teacher logits per stream) plus the teacher-scoring program.
  "opd": dict(mode="opd"),
}


@pytest.mark.parametrize("case", sorted(LOOP_FREE))
def test_model_equals_compiled_matmuls(case):
  model, stats, cas = _compile(_config(**LOOP_FREE[case]))
  for st, ca in zip(stats, cas):
    # hlo_stats reads the program as XLA counts it (exp / log / ... are XLA's transcendentals).
    assert st["flops"] == pytest.approx(ca["flops"] + ca.get("transcendentals", 0.0), rel=0.005)
  dots = sum(st["dot_flops"] for st in stats)
  total = sum(st["flops"] for st in stats)
  # The few thousand FLOPs apart are the confidence head's [D, 1] fc2, which XLA rewrites as multiply + reduce.
  assert model.executed == pytest.approx(dots, rel=5e-4), (model, dots)
  assert model.recompute == 0  # one LM-head chunk, no remat
  # What the model leaves out is elementwise work: present, and a small share even on these tiny models.
  assert 0.03 < 1 - model.executed / total < 0.15, (model.executed, total)


# ------------------------------------------------------------------------------------------------
# Against the compiler: loops (hlo_stats multiplies each loop body by its trip count)
# ------------------------------------------------------------------------------------------------

LOOPED = {
  # demo_teacher's layer group (lin, full) scanned over 2 repeats, 4 delta-rule chunks, 3 LM-head chunks (the
  # rematerialised logits), 2 accumulated micro-batches, the layer groups rematerialised whole.
  "sft_scanned": dict(
    mode="sft",
    preset="demo_teacher",
    model=dict(scan_layers=True, gdn_chunk_size=8, remat="full"),
    loss=LossConfig(logits_chunk=24),
    optim=OptimConfig(grad_accum_steps=2),
  ),
  # ar on 64 tokens with native MTP, LoRA (the scanned body computes every repeat's input gradients) and the
  # `dots` remat policy (the token mixers' products again).
  "ar_scanned_lora": dict(
    mode="ar",
    preset="demo_teacher",
    model=dict(scan_layers=True, remat="dots", gdn_chunk_size=16),
    train=TrainConfig(),
    lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0),
    loss=LossConfig(logits_chunk=50, native_mtp_weight=1.0),
  ),
}


@pytest.mark.parametrize("case", sorted(LOOPED))
def test_model_equals_compiled_matmuls_with_loops(case):
  model, stats, cas = _compile(_config(**LOOPED[case]))
  (st,), (ca,) = stats, cas
  assert st["unknown_trip_counts"] == 0 and max(l["trip_count"] for l in st["loops"]) > 1
  assert model.recompute > 0
  assert model.executed == pytest.approx(st["dot_flops"], rel=5e-4), (model, st["dot_flops"])
  # XLA's cost_analysis visits each loop body once: it misses most of the step.
  assert ca["flops"] < 0.8 * st["flops"]


def test_flash_attention_tiles_match_the_compiled_ones(monkeypatch):
  """Flash attention (T > attention_block) skips the key blocks above the diagonal under a lax.cond. XLA's
  counts (and hlo_stats') charge a conditional's branch whether it runs or not, so the compiled program is held
  to the model with every tile computed; the skipping itself is counted by hand (test_flash_block_pairs_by_hand)."""
  monkeypatch.setattr(flop_model, "flash_block_pairs", lambda T, block: (-(-T // block)) ** 2)
  model, stats, _ = _compile(_config("sft", model=dict(attention_block=8)))
  assert model.recompute > 0  # the backward's score tiles
  assert model.executed == pytest.approx(stats[0]["dot_flops"], rel=5e-4)
