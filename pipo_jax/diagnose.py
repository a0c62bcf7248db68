"""Where does a PIPO student lose to its teacher? Teacher-forced per-token accuracy and NLL by token class.

    python -m pipo_jax.diagnose --teacher=runs/demo/teacher --student=runs/demo/sft,runs/demo/opd \\
        --data=runs/demo/data/test_sft.jsonl --tokenizer=runs/demo/data/tokenizer --output=diagnosis.json

On held-out correct answers (SFT JSONL: `messages` with the assistant turn), for every supervised response token:
  * teacher      : the AR backbone's next-token prediction (x_t from x_<t);
  * teacher_mtp  : the teacher's native MTP head (x_t from h_{t-2} and e(x_{t-1}): the unverified-MTP baseline);
  * student_bb   : the PIPO backbone stream (x_{2j+2} from pairs 0..j), on the tokens at even student positions;
  * student_mtp  : the PIPO MTP stream (x_{2j+3} from h_j and e(x_{2j+2})), on the odd ones.
Each is split by token class (`token_classes`): `copy` (expression characters copied from the line before or
the question), `result` (the digits a worked line computes), `answer` (the digits in \\boxed{}), `structure`
(`=`, line ends, think tags, the answer sentence, end of turn); text outside the synthetic task's format is
`other`. The teacher columns are also reported on each student stream's token subset (`teacher_on_bb` /
`teacher_on_mtp`), so a gap is read against the same tokens.

Rejection probe (what the paper's mechanism needs): at MTP slots the confidence gate rejects (sigmoid(conf) < tau)
and, as a control, at random supervised MTP slots, the draft token b is replaced by a PAD and the text re-paired
after it (exactly what decoding does after a rejection); the student backbone then predicts b itself one step
later. Reported per group: how often the MTP draft was right, how often the backbone is right after the PAD, and
the accuracy of all later tokens with and without the rejection (the cost of carrying on after a shift).
One PAD per probe sequence; up to `--probes_per_example` slots of each group per example.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pipo_jax import cli
from pipo_jax.config import ModelConfig
from pipo_jax.data import schemas
from pipo_jax.data import tokenizer as tok_lib
from pipo_jax.data.pairs import IGNORE, insert_parity_pads, pad_right, sft_sequence
from pipo_jax.evaluation.batch_sampling import bucket_length
from pipo_jax.io import loading
from pipo_jax.models.pipo import MTPHead, PipoModel
from pipo_jax.models.qwen3_5 import Qwen35

CLASSES = ("copy", "result", "answer", "structure", "other")
PREDICTORS = ("teacher", "teacher_mtp", "student_bb", "student_mtp")


# -- token classes --------------------------------------------------------------------------------------------
def char_classes(response: str) -> list[str]:
  """One class per character of an assistant response in the synthetic task's format (`data/synthetic.py`):
  `<think>\\n` + lines `LHS=RHS\\n` + `</think>\\n` + `The answer is \\boxed{N}.`. In a worked line the first run
  of digits right of `=` is the computed `result`; everything else of the expression is `copy`. Characters of
  any other text are `other`."""
  out = ["other"] * len(response)
  think_open, think_close = response.find("<think>"), response.find("</think>")
  if think_open < 0 or think_close < 0:
    return out
  for i in range(think_open, think_open + len("<think>")):
    out[i] = "structure"
  for i in range(think_close, think_close + len("</think>")):
    out[i] = "structure"
  pos = think_open + len("<think>")
  for line in response[pos:think_close].split("\n"):
    if "=" in line:
      eq = line.index("=")
      for i in range(len(line)):
        out[pos + i] = "copy"
      out[pos + eq] = "structure"
      rhs = line[eq + 1 :]
      start = next((i for i, c in enumerate(rhs) if c.isdigit()), None)
      if start is not None:
        i = start
        while i < len(rhs) and rhs[i].isdigit():
          out[pos + eq + 1 + i] = "result"
          i += 1
    pos += len(line)
    if pos < think_close:
      out[pos] = "structure"  # the line's "\n"
      pos += 1
  for i in range(think_close + len("</think>"), len(response)):
    out[i] = "structure"
  box = response.find("\\boxed{", think_close)
  if box >= 0:
    i = box + len("\\boxed{")
    while i < len(response) and response[i] != "}":
      out[i] = "answer"
      i += 1
  return out


def token_classes(tok: tok_lib.ChatTokenizer, response_ids: np.ndarray, response: str) -> list[str]:
  """The class of every response token: the class of its first character when the tokens decode back to the
  response text in order, `structure` for special tokens (`<|im_end|>`), else `other`."""
  classes, cursor, chars = [], 0, char_classes(response)
  for i in np.asarray(response_ids).tolist():
    piece = tok.decode([i], skip_special_tokens=False)
    if piece and response.startswith(piece, cursor):
      classes.append(chars[cursor])
      cursor += len(piece)
    elif i in (tok.special.im_end, tok.special.eos):
      classes.append("structure")
    elif piece == "\n" and cursor >= len(response):  # the newline after <|im_end|>
      classes.append("structure")
    else:
      classes.append("other")
  return classes


# -- examples -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Example:
  ids: np.ndarray  # int32 [T] prompt + response (the teacher's sequence)
  labels: np.ndarray  # int32 [T], -100 off the supervised response
  classes: list  # class of every token (None off the response)
  student_ids: np.ndarray  # int32 [T'] with the parity PADs (even)
  student_labels: np.ndarray
  student_src: np.ndarray  # int [T']: index into `ids` of each student token (-1 for a PAD)


def read_examples(
  path: str, tok: tok_lib.ChatTokenizer, think_mask_tokens: int = 2, max_examples: int = 0
) -> list[Example]:
  """SFT records -> Examples (no random PADs: only the parity / trailing PAD the student always sees)."""
  out = []
  records, _ = schemas.read_jsonl(path, require_response=True)
  for record in records:
    if record.response is None:
      raise ValueError(f"{path}: diagnosis needs answers (SFT records with an assistant turn)")
    p, r = tok_lib.record_token_ids(record, tok)
    ids, labels = sft_sequence(p, r, think_mask_tokens)
    response_classes = token_classes(
      tok,
      r,
      record.response if record.response.startswith(tok_lib.THINK_PREFIX) else tok_lib.THINK_PREFIX + record.response,
    )
    classes = [None] * len(p) + response_classes
    # Track source indices through the parity PADs by padding an index channel the same way.
    src = np.arange(len(ids), dtype=np.int32)
    s_ids, s_labels = insert_parity_pads(ids, labels, tok.pad_id)
    s_src, _ = insert_parity_pads(src, labels, -1)
    out.append(Example(ids, labels, classes, s_ids, s_labels, s_src))
    if max_examples and len(out) >= max_examples:
      break
  if not out:
    raise ValueError(f"{path}: no examples")
  return out


# -- model calls ----------------------------------------------------------------------------------------------
def _gold_and_argmax(h_BND, W_DV, y_BN):
  logits = jnp.einsum("bnd,dv->bnv", h_BND.astype(jnp.float32), W_DV.astype(jnp.float32))
  logp = jax.nn.log_softmax(logits, axis=-1)
  gold = jnp.take_along_axis(logp, jnp.maximum(y_BN, 0)[..., None], axis=-1)[..., 0]
  return gold, jnp.argmax(logits, axis=-1) == y_BN


def make_teacher_fn(config: ModelConfig):
  """(params, ids_BT) -> (gold logprob, correct) [B, T] for the backbone (index t predicts x_t; t = 0 empty)
  and for the native MTP head (index t predicts x_t from h_{t-2}, e(x_{t-1}); t < 2 empty)."""
  backbone, mtp = Qwen35(config), MTPHead(config)

  @jax.jit
  def fn(params, ids_BT):
    B, T = ids_BT.shape
    pb = {"params": params["backbone"]}
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD = backbone.apply(pb, ids_BT, method=Qwen35.embed)
    h_BTD, _ = backbone.apply(pb, x_BTD, pos_BT)
    W_DV = backbone.apply(pb, method=Qwen35.head_kernel)
    gb, cb = _gold_and_argmax(h_BTD[:, :-1], W_DV, ids_BT[:, 1:])
    m_BSD, _ = mtp.apply({"params": params["mtp"]}, x_BTD[:, 1 : T - 1], h_BTD[:, : T - 2], pos_BT[:, : T - 2])
    gm, cm = _gold_and_argmax(m_BSD, W_DV, ids_BT[:, 2:])
    z1 = jnp.zeros((B, 1)), jnp.zeros((B, 2))
    return (
      jnp.concatenate([z1[0], gb], 1),
      jnp.concatenate([z1[0] > 0, cb], 1),
      jnp.concatenate([z1[1], gm], 1),
      jnp.concatenate([z1[1] > 0, cm], 1),
    )

  return fn


_STUDENT_FNS: dict = {}  # one compilation for every student of the same architecture


def student_fn(config: ModelConfig):
  key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
  if key not in _STUDENT_FNS:
    _STUDENT_FNS[key] = make_student_fn(config)
  return _STUDENT_FNS[key]


def make_student_fn(config: ModelConfig):
  """(params, ids_BT) -> per token index t of the student sequence: gold logprob and correct of the stream that
  predicts it (backbone for even t >= 2, MTP for odd t >= 3), and sigmoid(conf) of the MTP slot of odd t."""
  model = PipoModel(config)

  @jax.jit
  def fn(params, ids_BT):
    B, T = ids_BT.shape
    out = model.apply({"params": params}, ids_BT)
    W_DV = model.apply({"params": params}, method=PipoModel.head_kernel)
    gb, cb = _gold_and_argmax(out["h_BJD"], W_DV, ids_BT[:, 2::2])
    gm, cm = _gold_and_argmax(out["m_BJD"], W_DV, ids_BT[:, 3::2])
    conf = jax.nn.sigmoid(out["conf_logit_BJ"])
    gold = jnp.zeros((B, T)).at[:, 2::2].set(gb).at[:, 3::2].set(gm)
    correct = jnp.zeros((B, T), bool).at[:, 2::2].set(cb).at[:, 3::2].set(cm)
    conf_T = jnp.ones((B, T)).at[:, 3::2].set(conf)
    return gold, correct, conf_T

  return fn


def run_batched(fn, params, seqs: Sequence[np.ndarray], pad_id: int, batch_size: int, label: str = ""):
  """fn over right-padded batches of one fixed shape; returns per-sequence lists of numpy outputs [len(seq)].
  With a label, progress is logged (cli.Progress)."""
  T = bucket_length(max(len(s) for s in seqs))
  results = []
  progress = cli.Progress(len(seqs), label, "sequences") if label else None
  for start in range(0, len(seqs), batch_size):
    chunk = list(seqs[start : start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)  # fixed batch shape: one compilation
    ids = np.stack([pad_right(s, s, T, pad_id)[0] for s in chunk])
    outs = [np.asarray(o) for o in fn(params, jnp.asarray(ids))]
    for i in range(n):
      results.append([o[i, : len(seqs[start + i])] for o in outs])
    if progress:
      progress.update(n)
  return results


# -- tables ---------------------------------------------------------------------------------------------------
class Tally:
  """Accumulates (correct, nll) per (predictor, class)."""

  def __init__(self):
    self.sums: dict = {}

  def add(self, predictor: str, cls: str, correct: bool, logprob: float) -> None:
    for c in (cls, "all"):
      s = self.sums.setdefault((predictor, c), [0, 0.0, 0.0])
      s[0] += 1
      s[1] += float(correct)
      s[2] -= float(logprob)

  def table(self) -> dict:
    return {f"{p}/{c}": {"n": s[0], "acc": s[1] / s[0], "nll": s[2] / s[0]} for (p, c), s in self.sums.items()}


def per_token_table(
  examples: Sequence[Example], teacher: tuple | None, student: tuple, pad_id: int, batch_size: int
) -> tuple[dict, list]:
  """Per-class accuracy / NLL of every predictor; also returns the student's per-example outputs."""
  tally = Tally()
  if teacher is not None:
    t_out = run_batched(teacher[0], teacher[1], [e.ids for e in examples], pad_id, batch_size)
  s_out = run_batched(student[0], student[1], [e.student_ids for e in examples], pad_id, batch_size)
  for k, e in enumerate(examples):
    s_gold, s_corr, _ = s_out[k]
    stream_of = {}  # teacher index -> student stream
    for t in range(2, len(e.student_ids)):
      src = int(e.student_src[t])
      if e.student_labels[t] == IGNORE or src < 0:
        continue
      stream = "student_bb" if t % 2 == 0 else "student_mtp"
      stream_of[src] = stream
      tally.add(stream, e.classes[src], bool(s_corr[t]), float(s_gold[t]))
    if teacher is None:
      continue
    tb_gold, tb_corr, tm_gold, tm_corr = t_out[k]
    for t in range(2, len(e.ids)):
      if e.labels[t] == IGNORE:
        continue
      cls = e.classes[t]
      tally.add("teacher", cls, bool(tb_corr[t]), float(tb_gold[t]))
      tally.add("teacher_mtp", cls, bool(tm_corr[t]), float(tm_gold[t]))
      if t in stream_of:
        tally.add("teacher_on_" + stream_of[t][len("student_") :], cls, bool(tb_corr[t]), float(tb_gold[t]))
  return tally.table(), s_out


def reject_at(e: Example, t: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Student sequence with the draft at odd index t replaced by a rejection: PAD at t, the token moved to t + 1
  (it opens the next pair) and everything after re-paired; (ids, src) with an even length."""
  ids = np.concatenate([e.student_ids[:t], [pad_id], e.student_ids[t:]]).astype(np.int32)
  src = np.concatenate([e.student_src[:t], [-1], e.student_src[t:]]).astype(np.int32)
  # Parity / trailing PADs after t shift with the text; drop a trailing PAD that became unpaired, or add one.
  if len(ids) % 2:
    if ids[-1] == pad_id and src[-1] < 0:
      ids, src = ids[:-1], src[:-1]
    else:
      ids, src = np.append(ids, np.int32(pad_id)), np.append(src, np.int32(-1))
  return ids, src


def rejection_probe(
  examples: Sequence[Example],
  s_out: list,
  student: tuple,
  pad_id: int,
  tau: float,
  per_example: int,
  batch_size: int,
  seed: int = 0,
) -> dict:
  """Gate-picked vs random rejections (module docstring). Returns per group: n, conf mean, MTP draft accuracy,
  backbone accuracy on the same token after the PAD, later-token accuracy with / without the rejection."""
  rng = np.random.default_rng(seed)
  probes = []  # (group, example index, odd index t)
  for k, e in enumerate(examples):
    conf = s_out[k][2]
    slots = [t for t in range(3, len(e.student_ids), 2) if e.student_labels[t] != IGNORE]
    gate = [t for t in slots if conf[t] < tau]
    gate = sorted(gate, key=lambda t: conf[t])[:per_example]
    rand = list(rng.choice(slots, size=min(per_example, len(slots)), replace=False)) if slots else []
    probes += [("gate", k, t) for t in gate] + [("random", k, int(t)) for t in rand]
  if not probes:
    return {g: {"n": 0} for g in ("gate", "random")}
  seqs = [reject_at(examples[k], t, pad_id) for _, k, t in probes]
  outs = run_batched(student[0], student[1], [s for s, _ in seqs], pad_id, batch_size)
  acc: dict = {}
  for (group, k, t), (ids, src), out in zip(probes, seqs, outs):
    e, base = examples[k], s_out[k]
    g = acc.setdefault(
      group,
      {
        "n": 0,
        "conf": 0.0,
        "draft": 0.0,
        "after_pad": 0.0,
        "draft_nll": 0.0,
        "after_pad_nll": 0.0,
        "later_base": [0, 0.0],
        "later_rejected": [0, 0.0],
      },
    )
    g["n"] += 1
    g["conf"] += float(base[2][t])
    g["draft"] += float(base[1][t])
    g["draft_nll"] -= float(base[0][t])
    g["after_pad"] += float(out[1][t + 1])  # the moved token, now predicted by the backbone
    g["after_pad_nll"] -= float(out[0][t + 1])
    # Later tokens: every supervised token after the moved one, matched by source index.
    base_by_src = {
      int(e.student_src[u]): u
      for u in range(t + 1, len(e.student_ids))
      if e.student_labels[u] != IGNORE and e.student_src[u] >= 0
    }
    for u in range(t + 2, len(ids)):
      s = int(src[u])
      if s in base_by_src:
        g["later_base"][0] += 1
        g["later_base"][1] += float(base[1][base_by_src[s]])
        g["later_rejected"][0] += 1
        g["later_rejected"][1] += float(out[1][u])
  result = {}
  for group, g in acc.items():
    n = g["n"]
    result[group] = {
      "n": n,
      "conf_mean": g["conf"] / n,
      "mtp_draft_acc": g["draft"] / n,
      "backbone_after_pad_acc": g["after_pad"] / n,
      "mtp_draft_nll": g["draft_nll"] / n,
      "backbone_after_pad_nll": g["after_pad_nll"] / n,
      "later_acc_without_rejection": g["later_base"][1] / max(1, g["later_base"][0]),
      "later_acc_with_rejection": g["later_rejected"][1] / max(1, g["later_rejected"][0]),
    }
  return result


# -- report ---------------------------------------------------------------------------------------------------
def class_table_md(table: dict, label: str) -> str:
  """Markdown: rows = token classes, columns = predictors (acc % / NLL)."""
  cols = [
    c
    for c in ("teacher", "teacher_mtp", "student_bb", "teacher_on_bb", "student_mtp", "teacher_on_mtp")
    if f"{c}/all" in table
  ]
  head = "| class | " + " | ".join(f"{c} acc / NLL (n)" for c in cols) + " |"
  lines = [f"**{label}**", "", head, "|---" * (len(cols) + 1) + "|"]
  for cls in CLASSES + ("all",):
    cells = []
    for c in cols:
      v = table.get(f"{c}/{cls}")
      cells.append("—" if v is None else f"{100 * v['acc']:.1f} / {v['nll']:.3f} ({v['n']})")
    if any(cell != "—" for cell in cells):
      lines.append(f"| {cls} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def probe_table_md(probe: dict, tau: float) -> str:
  lines = [
    f"Rejection probe (gate: sigmoid(conf) < {tau}; random: uniform supervised MTP slots)",
    "",
    "| rejected at | n | conf | MTP draft acc | backbone acc after PAD | later acc w/o → with rejection |",
    "|---|---|---|---|---|---|",
  ]
  for group in ("gate", "random"):
    p = probe.get(group, {"n": 0})
    if not p["n"]:
      lines.append(f"| {group} | 0 | — | — | — | — |")
      continue
    lines.append(
      f"| {group} | {p['n']} | {p['conf_mean']:.3f} | {100 * p['mtp_draft_acc']:.1f} | "
      f"{100 * p['backbone_after_pad_acc']:.1f} | {100 * p['later_acc_without_rejection']:.1f} → "
      f"{100 * p['later_acc_with_rejection']:.1f} |"
    )
  return "\n".join(lines)


def curve_md(result: dict) -> str:
  """One line per student (e.g. SFT checkpoints in step order, then OPD): the headline numbers."""
  lines = [
    "| student | backbone acc / NLL | MTP acc / NLL | result digits bb / MTP acc | gate: MTP draft → "
    "backbone after PAD | random: MTP draft → backbone after PAD |",
    "|---|---|---|---|---|---|",
  ]
  for path, s in result["students"].items():
    t, p = s["table"], s["probe"]
    lines.append(
      f"| {path} | {_cell(t, 'student_bb/all')} / {_cell(t, 'student_bb/all', 'nll')} | "
      f"{_cell(t, 'student_mtp/all')} / {_cell(t, 'student_mtp/all', 'nll')} | "
      f"{_cell(t, 'student_bb/result')} / {_cell(t, 'student_mtp/result')} | {_probe(p, 'gate')} | "
      f"{_probe(p, 'random')} |"
    )
  return "\n".join(lines)


def _cell(table: dict, key: str, field: str = "acc") -> str:
  if key not in table:
    return "—"
  return f"{100 * table[key]['acc']:.1f}" if field == "acc" else f"{table[key]['nll']:.3f}"


def _probe(probe: dict, group: str) -> str:
  g = probe.get(group, {})
  if not g.get("n"):
    return "—"
  return f"{100 * g['mtp_draft_acc']:.1f} → {100 * g['backbone_after_pad_acc']:.1f} (n {g['n']})"


def diagnose(
  teacher_path: str,
  student_paths: Sequence[str],
  data_path: str,
  tokenizer_path: str,
  tau: float = 0.95,
  max_examples: int = 0,
  probes_per_example: int = 2,
  batch_size: int = 32,
  think_mask_tokens: int = 2,
) -> dict:
  """The whole diagnosis as a JSON-able dict: {"students": {path: {"table", "probe"}}, "markdown": str}."""
  tok = tok_lib.load_tokenizer(tokenizer_path)
  examples = read_examples(data_path, tok, think_mask_tokens, max_examples)
  teacher = None
  if teacher_path:
    t_cfg, t_params = loading.load_model(teacher_path)
    teacher = (make_teacher_fn(t_cfg), t_params)
  result, md = {"students": {}}, []
  for i, path in enumerate(student_paths):
    s_cfg, s_params = loading.load_model(path)
    student = (student_fn(s_cfg), s_params)
    table, s_out = per_token_table(examples, teacher if i == 0 else None, student, tok.pad_id, batch_size)
    if i == 0 and teacher is not None:
      result["teacher"] = {k: v for k, v in table.items() if k.startswith("teacher")}
    else:
      table.update(result.get("teacher", {}))
    probe = rejection_probe(examples, s_out, student, tok.pad_id, tau, probes_per_example, batch_size)
    result["students"][path] = {"table": table, "probe": probe}
    if i >= len(student_paths) - 2:  # full tables for the last two (final SFT, OPD); all of them in the JSON
      md += [class_table_md(table, path), "", probe_table_md(probe, tau), ""]
  result["markdown"] = "\n".join(md)
  if len(student_paths) > 1:
    result["markdown"] = "Students in order:\n\n" + curve_md(result) + "\n\n" + result["markdown"]
  result["n_examples"] = len(examples)
  return result


def define_flags() -> None:
  """Defined only when run as a program, so the module can be imported next to other CLIs."""
  from absl import flags

  global _TEACHER, _STUDENT, _DATA, _TOK, _OUT, _TAU, _MAX, _PROBES, _BATCH
  _TEACHER = flags.DEFINE_string("teacher", "", "teacher checkpoint (mode ar, with native MTP); empty: none")
  _STUDENT = flags.DEFINE_list("student", None, "PIPO student checkpoint(s)", required=True)
  _DATA = flags.DEFINE_string("data", None, "held-out SFT JSONL (correct answers)", required=True)
  _TOK = flags.DEFINE_string("tokenizer", None, "tokenizer directory", required=True)
  _OUT = flags.DEFINE_string("output", "", "JSON file to write (the markdown is printed)")
  _TAU = flags.DEFINE_float("tau", 0.95, "confidence threshold of the rejection probe")
  _MAX = flags.DEFINE_integer("max_examples", 0, "first N examples (0 = all)")
  _PROBES = flags.DEFINE_integer("probes_per_example", 2, "rejection probes per example and group")
  _BATCH = flags.DEFINE_integer("batch_size", 32, "sequences per forward")


def main(argv) -> None:
  del argv
  result = diagnose(
    _TEACHER.value, _STUDENT.value, _DATA.value, _TOK.value, _TAU.value, _MAX.value, _PROBES.value, _BATCH.value
  )
  print(result["markdown"], flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  cli.run(main, define_flags)
