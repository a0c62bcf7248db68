"""The diagnosis tool: token classes (hand-worked), rejection re-pairing (hand-worked) and stream alignment of the
per-token tables against a brute-force per-position forward of the same models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax import diagnose
from pipo_jax.config import ModelConfig, resolve_model_config
from pipo_jax.data import synthetic
from pipo_jax.data import tokenizer as tok_lib
from pipo_jax.models.pipo import PipoModel, init_pipo_params
from pipo_jax.models.qwen3_5 import Qwen35


def test_char_classes_hand_worked():
  r = "<think>\n(3+4)*5-6=7*5-6\n7*5-6=35-6\n</think>\nThe answer is \\boxed{29}."
  c = diagnose.char_classes(r)
  by = lambda cls: "".join(ch for ch, k in zip(r, c) if k == cls)
  assert by("result") == "735"  # 7 of the first line, 35 of the second
  assert by("answer") == "29"
  assert by("copy") == "(3+4)*5-6" + "*5-6" + "7*5-6" + "-6"
  assert by("other") == ""
  assert by("structure") == "<think>\n" + "=\n" + "=\n" + "</think>\nThe answer is \\boxed{}."
  assert set(diagnose.char_classes("plain text without tags")) == {"other"}


def _example(ids, labels, src):
  return diagnose.Example(
    np.asarray(ids),
    np.asarray(labels),
    [],
    np.asarray(ids, np.int32),
    np.asarray(labels, np.int32),
    np.asarray(src, np.int32),
  )


def test_reject_at_repairs_like_decoding():
  P = 0  # pad id
  # pairs (10,11) (12,13) (14,15): rejecting the draft at index 3 (13) gives (10,11) (12,P) (13,14) (15,P).
  e = _example([10, 11, 12, 13, 14, 15], [-100, -100, 12, 13, 14, 15], [0, 1, 2, 3, 4, 5])
  ids, src = diagnose.reject_at(e, 3, P)
  assert ids.tolist() == [10, 11, 12, P, 13, 14, 15, P]
  assert src.tolist() == [0, 1, 2, -1, 3, 4, 5, -1]
  # A trailing PAD that the shift leaves unpaired is dropped: (10,11) (12,13) (14,P) -> (10,11) (12,P) (13,14).
  e = _example([10, 11, 12, 13, 14, P], [-100, -100, 12, 13, 14, -100], [0, 1, 2, 3, 4, -1])
  ids, src = diagnose.reject_at(e, 3, P)
  assert ids.tolist() == [10, 11, 12, P, 13, 14]
  assert src.tolist() == [0, 1, 2, -1, 3, 4]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("diag"))
  synthetic.write_dataset(out, n_train=8, n_test=6, seed=0)
  return out


def test_tables_align_streams_with_brute_force(task):
  """Every per-class accuracy of teacher, teacher MTP and both student streams equals a brute-force count from
  full per-position logits, and the student streams partition the supervised response tokens."""
  tok = tok_lib.load_tokenizer(f"{task}/tokenizer")
  examples = diagnose.read_examples(f"{task}/test_sft.jsonl", tok)
  cfg = resolve_model_config(
    ModelConfig(preset="tiny", vocab_size=tok.vocab_size, compressor_type="mlp_residual", compressor_random_init=True)
  )
  params = init_pipo_params(cfg, jax.random.PRNGKey(3))
  # Sharpen the random model so that argmax accuracy is not identically 0.
  params["backbone"]["embed_tokens"]["embedding"] = params["backbone"]["embed_tokens"]["embedding"] * 40.0
  teacher = (diagnose.make_teacher_fn(cfg), params)
  student = (diagnose.make_student_fn(cfg), params)
  table, _ = diagnose.per_token_table(examples, teacher, student, tok.pad_id, batch_size=4)

  backbone, pipo = Qwen35(cfg), PipoModel(cfg)
  T = 128  # one padded length for every example: two compilations in all

  @jax.jit
  def teacher_argmax(ids):
    pb = {"params": params["backbone"]}
    h, _ = backbone.apply(pb, backbone.apply(pb, ids, method=Qwen35.embed), jnp.arange(T)[None])
    return jnp.argmax(backbone.apply(pb, h, method=Qwen35.logits), -1)[0]

  @jax.jit
  def student_argmax(ids):
    out = pipo.apply({"params": params}, ids)
    head = lambda h: jnp.argmax(pipo.apply({"params": params}, h, method=PipoModel.logits), -1)[0]
    return head(out["h_BJD"]), head(out["m_BJD"])

  pad = lambda x: jnp.asarray(np.pad(x, (0, T - len(x)), constant_values=tok.pad_id))[None]
  counts: dict = {}

  def add(key, cls, ok):
    for c in (cls, "all"):
      n, k = counts.get((key, c), (0, 0))
      counts[(key, c)] = (n + 1, k + int(ok))

  for e in examples:
    pred = np.asarray(teacher_argmax(pad(e.ids)))
    for t in range(2, len(e.ids)):
      if e.labels[t] != -100:
        add("teacher", e.classes[t], pred[t - 1] == e.ids[t])
    pb_, pm_ = (np.asarray(x) for x in student_argmax(pad(e.student_ids)))
    seen = []
    for t in range(2, len(e.student_ids)):
      if e.student_labels[t] == -100 or e.student_src[t] < 0:
        continue
      cls = e.classes[e.student_src[t]]
      seen.append(int(e.student_src[t]))
      if t % 2 == 0:
        add("student_bb", cls, pb_[t // 2 - 1] == e.student_ids[t])
      else:
        add("student_mtp", cls, pm_[(t - 3) // 2] == e.student_ids[t])
    supervised = [t for t in range(len(e.ids)) if e.labels[t] != -100 and t >= 2]
    assert sorted(seen) == supervised  # the two streams partition the supervised tokens
  for (key, cls), (n, k) in counts.items():
    got = table[f"{key}/{cls}"]
    assert got["n"] == n, (key, cls)
    assert got["acc"] == pytest.approx(k / n, abs=1e-9), (key, cls)
  assert 0 < table["teacher/all"]["acc"] < 1  # the sharpened random model gets some right, some wrong
