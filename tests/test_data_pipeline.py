"""Tokenizer, schemas, synthetic task, TFDS ArrayRecord builder and grain pipelines."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

from pipo_jax.config import DataConfig
from pipo_jax.data import pairs, synthetic
from pipo_jax.data.pipeline import PromptPipeline, TrainPipeline
from pipo_jax.data.schemas import MalformedRecordError, read_jsonl
from pipo_jax.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synthetic"))
  paths = synthetic.write_dataset(d, n_train=40, n_test=10, n_opd=9, seed=3)
  return paths


@pytest.fixture(scope="module")
def tok(data):
  return load_tokenizer(data["tokenizer"])


def _cfg(data, **kw):
  base = dict(
    train_path=data["train"], tokenizer_path=data["tokenizer"], max_length=192, batch_size=4, seed=7, max_pad_ratio=0.5
  )
  base.update(kw)
  return DataConfig(**base)


def _take(pipe, n):
  return [next(pipe) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# -- tokenizer -----------------------------------------------------------------------------------------


def test_special_ids_and_round_trip(tok):
  s = tok.special
  assert (s.pad, s.eos, s.im_start, s.im_end, s.think_start, s.think_end) == (1, 3, 2, 3, 4, 5)
  assert tok.vocab_size == 102 < 128
  assert s.stop_ids == (3,)
  np.testing.assert_array_equal(tok.think_prefix_ids, [4, 6])
  text = "<think>\n3+4=7\n7*5=35\n35-6=29\n</think>\nThe answer is \\boxed{29}."
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(np.r_[tok.encode("ab"), [s.pad], tok.encode("c")]) == "abc"  # PAD vanishes from text


def test_chat_template_ids_by_hand(tok):
  # Character ids: specials 0..5, "\n" = 6, printable c -> ord(c) - 25 ("u" = 92, "1" = 24, "+" = 18, "A" = 40).
  msgs = [{"role": "user", "content": "1+2"}]
  user = [92, 90, 76, 89, 6, 24, 18, 25]  # "user\n1+2"
  assistant = [72, 90, 90, 80, 90, 91, 72, 85, 91, 6]  # "assistant\n"
  want_prompt = [2] + user + [3, 6] + [2] + assistant
  np.testing.assert_array_equal(tok.prompt_ids(msgs), want_prompt)
  np.testing.assert_array_equal(tok.generation_prompt_ids(msgs), want_prompt + [4, 6])
  want_response = [4, 6, 26, 5, 6, 40, 3, 6]  # <think> \n 3 </think> \n A <|im_end|> \n
  for response in ("<think>\n3</think>\nA", "3</think>\nA"):  # an existing prefix is not doubled
    p, r = tok.encode_chat(msgs, response)
    np.testing.assert_array_equal(p, want_prompt)
    np.testing.assert_array_equal(r, want_response)
  sys_msgs = [{"role": "system", "content": "s"}] + msgs
  system = [90, 96, 90, 91, 76, 84, 6, 90]  # "system\ns"
  np.testing.assert_array_equal(tok.prompt_ids(sys_msgs), [2] + system + [3, 6] + want_prompt)


def test_special_id_fallbacks(data, tmp_path):
  d = tmp_path / "tok"
  shutil.copytree(data["tokenizer"], d)
  with open(d / "tokenizer_config.json", "w") as f:
    json.dump({}, f)
  t = load_tokenizer(str(d))
  assert t.special.pad == 1 and t.special.eos == 3  # <|endoftext|> by name; EOS falls back to <|im_end|>
  with open(d / "config.json", "w") as f:
    json.dump({"text_config": {"pad_token_id": 7, "eos_token_id": [2, 3]}}, f)
  t = load_tokenizer(str(d))
  assert t.special.pad == 7 and t.special.eos == 2
  with open(d / "tokenizer_config.json", "w") as f:
    json.dump({"pad_token": {"content": "<|im_end|>"}}, f)
  assert load_tokenizer(str(d)).special.pad == 3


# -- schemas -------------------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(data, tmp_path):
  lines = open(data["train"]).read().splitlines()[:4]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(
    "\n".join([lines[0], lines[1], "{not json", lines[2], "", '{"messages": [{"role": "user"}]}', lines[3]]) + "\n"
  )
  with pytest.raises(MalformedRecordError, match=re.escape(f"{bad}:3:")):
    read_jsonl(str(bad))
  recs, n_bad = read_jsonl(str(bad), skip_malformed=True)
  assert n_bad == 2 and len(recs) == 4  # line 5 is blank: ignored, not malformed
  bad2 = tmp_path / "bad2.jsonl"
  bad2.write_text("\n".join(lines[:3] + ["", "", '{"messages": [{"role": "user"}]}']) + "\n")
  with pytest.raises(MalformedRecordError, match=re.escape(f"{bad2}:6: messages[0]")):
    read_jsonl(str(bad2))
  cfg = _cfg(data, train_path=str(bad), skip_malformed=True)
  pipe = TrainPipeline(cfg, process_index=0, process_count=1)
  assert len(pipe.source) == 4 and pipe.stats.as_dict()["malformed"] == 2


def test_schemas(tmp_path):
  f = tmp_path / "mixed.jsonl"
  rows = [
    {"prompt": "a", "response": "b"},
    {"prompt": "q"},
    {"question": "1+1", "answer": "2", "type": "math"},
    {"tokens": [5, 6, 7], "prompt_length": 1},
    {"prompt_ids": [1], "response_ids": [2, 3]},
    {"messages": [{"role": "user", "content": "x"}], "source": "s", "source_index": 4, "pass_rate": 0.5},
  ]
  f.write_text("".join(json.dumps(r) + "\n" for r in rows))
  recs, n_bad = read_jsonl(str(f))
  assert n_bad == 0
  assert recs[0].messages == [{"role": "user", "content": "a"}] and recs[0].response == "b"
  assert recs[1].response is None and recs[2].meta == {"answer": "2", "type": "math"}
  np.testing.assert_array_equal(recs[3].prompt_ids, [5])
  np.testing.assert_array_equal(recs[3].response_ids, [6, 7])
  assert recs[5].meta == {"source": "s", "source_index": 4, "pass_rate": 0.5} and not recs[5].has_response
  with pytest.raises(MalformedRecordError, match=":2: .*no response"):
    read_jsonl(str(f), require_response=True)


def test_missing_pad_is_a_clear_error(tmp_path):
  from tokenizers import Tokenizer, models  # a vocabulary with the chat tokens but no PAD candidate

  vocab = {t: i for i, t in enumerate(["<|im_start|>", "<|im_end|>", "<think>", "</think>", "\n", "a"])}
  Tokenizer(models.WordLevel(vocab=vocab, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no PAD token"):
    load_tokenizer(str(tmp_path))


# -- synthetic task ------------------------------------------------------------------------------------


def test_synthetic_task(data):
  rng = np.random.default_rng(0)
  hard = synthetic.Difficulty(min_ops=4, max_ops=4, min_operand=2, max_operand=20)
  for _ in range(50):
    p = synthetic.make_problem(rng, hard)
    expr = p.question[len("Compute ") : -1]
    assert eval(expr) == p.answer  # the question's parentheses give the left-to-right fold
    steps = p.response.split("\n")[1:-2]
    assert len(steps) == 4 and p.response.startswith("<think>\n")
    previous_rhs = expr[1:-1]  # without the outer parentheses
    for s in steps:  # every worked line is a true equation that starts where the previous one ended
      lhs, rhs = s.split("=")
      assert lhs == previous_rhs and eval(lhs) == eval(rhs) >= 0
      assert rhs.count("+") + rhs.count("-") + rhs.count("*") == lhs.count("+") + lhs.count("-") + lhs.count("*") - 1
      previous_rhs = rhs
    assert int(previous_rhs) == p.answer
    assert p.response.endswith(f"</think>\nThe answer is \\boxed{{{p.answer}}}.")
  splits = synthetic.make_splits(30, 10, seed=1, n_opd=5)
  qs = {k: {p.question for p in v} for k, v in splits.items()}
  assert [len(qs[k]) for k in ("train", "test", "opd")] == [30, 10, 5]
  assert not (qs["train"] & qs["test"]) and not (qs["train"] & qs["opd"]) and not (qs["test"] & qs["opd"])
  assert synthetic.make_splits(30, 10, seed=1, n_opd=5) == splits
  bench = [json.loads(l) for l in open(data["test"])]
  assert set(bench[0]) == {"question", "answer", "type"} and bench[0]["type"] == "math"


# -- training pipeline ---------------------------------------------------------------------------------


def test_pipeline_deterministic_and_well_formed(data, tok):
  cfg = _cfg(data)
  a = _take(TrainPipeline(cfg, process_index=0, process_count=1), 4)
  b = _take(TrainPipeline(cfg, process_index=0, process_count=1), 4)
  _assert_same(a, b)
  c = _take(TrainPipeline(dataclasses.replace(cfg, seed=8), process_index=0, process_count=1), 4)
  assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
  pad = tok.pad_id
  n_split_pads = 0
  for batch in a:
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 192)
    assert batch["input_ids"].dtype == batch["labels"].dtype == np.int32
    for ids, lab in zip(batch["input_ids"], batch["labels"]):
      n = int(np.flatnonzero(lab != pairs.IGNORE)[-1]) + 1  # past the last supervised token: padding
      assert not np.any(ids[:n][0::2] == pad) and np.all(lab[ids == pad] == pairs.IGNORE)
      # Unsupervised prefix = generation prompt (ends in <think>\n), plus a parity PAD if it is odd.
      first = int(np.flatnonzero(lab != pairs.IGNORE)[0])
      gen_prompt = ids[:first][ids[:first] != pad]
      np.testing.assert_array_equal(gen_prompt[-2:], tok.think_prefix_ids)
      assert first % 2 == 0
      n_split_pads += int(np.sum(ids[first:n] == pad))
  assert n_split_pads > 0  # max_pad_ratio 0.5 splits pairs
  none = next(TrainPipeline(dataclasses.replace(cfg, max_pad_ratio=0.0), process_index=0, process_count=1))
  for ids, lab in zip(none["input_ids"], none["labels"]):
    first, last = np.flatnonzero(lab != pairs.IGNORE)[[0, -1]]
    assert not np.any(ids[first : last + 1] == pad)  # ratio 0: no PAD inside the response


def test_difficulty_weighted_gate_pads_land_before_the_difficult_token(data, tok, tmp_path):
  """With all of a record's draft difficulty on one response token and mix 1, every PAD the gate walk inserts
  rejects exactly that token: the PAD is followed by it. Without annotations the pipeline names the tool."""
  from pipo_jax.config import Config
  from pipo_jax.data.tokenizer import record_token_ids

  records, _ = read_jsonl(data["train"], require_response=True)
  path, hard = tmp_path / "annotated.jsonl", {}  # supervised response -> index of its difficult token in it
  with open(data["train"]) as src, open(path, "w") as out:
    for line, rec in zip(src, records):
      _, r = record_token_ids(rec, tok)
      k = 5 + (len(hard) % 7)  # a response token past the `<think>\n` opener (2 tokens, unsupervised)
      hard[tuple(r[2:].tolist())] = k - 2
      obj = json.loads(line)
      obj["draft_difficulty"] = [1.0 if j == k else 0.0 for j in range(len(r))]
      out.write(json.dumps(obj) + "\n")
  cfg = _cfg(data, train_path=str(path), pad_insertion="gate", pad_difficulty_mix=1.0, max_pad_ratio=1.0, num_epochs=1)
  n_pads = 0
  for batch in _take(TrainPipeline(cfg, process_index=0, process_count=1), 10):
    for ids, lab in zip(batch["input_ids"], batch["labels"]):
      first, last = np.flatnonzero(lab != pairs.IGNORE)[[0, -1]]
      text = ids[first : last + 1]
      k = hard[tuple(text[text != tok.pad_id].tolist())]
      for t in np.flatnonzero(text[:-1] == tok.pad_id):
        n_pads += 1
        assert np.sum(text[: t + 1] != tok.pad_id) == k  # the token after the PAD is the difficult one
  assert n_pads > 5  # chance 0.5 per record (MAX_WEIGHTED_CHANCE) at a ratio ~ U(0, 1)
  with pytest.raises(ValueError, match="python -m pipo_jax.draft_difficulty"):
    next(TrainPipeline(dataclasses.replace(cfg, train_path=data["train"]), process_index=0, process_count=1))
  for kw, msg in [({"pad_difficulty_mix": 1.5}, "must be in"), ({"pad_insertion": "split"}, "places 'gate' PADs")]:
    bad = Config(workdir="w", data=dataclasses.replace(cfg, **kw))
    with pytest.raises(ValueError, match=msg):
      bad.validate(num_devices=1, process_count=1)


def test_process_shards_partition_the_global_batch(data):
  cfg = _cfg(data, num_epochs=3)
  whole = _take(TrainPipeline(cfg, process_index=0, process_count=1), 12)  # crosses epoch boundaries
  p0 = _take(TrainPipeline(cfg, process_index=0, process_count=2), 12)
  p1 = _take(TrainPipeline(cfg, process_index=1, process_count=2), 12)
  for g, a, b in zip(whole, p0, p1):
    assert a["input_ids"].shape == (2, 192)
    for k in g:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])


def test_split_pattern_is_redrawn_each_epoch(data, tok):
  # Global batch = the whole (40-example) set: batch e is epoch e, reshuffled, with fresh PAD splits.
  cfg = _cfg(data, batch_size=40, max_pad_ratio=1.0, num_epochs=2)
  e0, e1 = _take(TrainPipeline(cfg, process_index=0, process_count=1), 2)

  def by_text(batch):
    return {tuple(ids[ids != tok.pad_id]): tuple(ids) for ids in batch["input_ids"]}

  a, b = by_text(e0), by_text(e1)
  assert a.keys() == b.keys()  # the same 40 examples in each epoch
  assert [tuple(x) for x in e0["input_ids"]] != [tuple(x) for x in e1["input_ids"]]  # new order
  assert sum(a[k] != b[k] for k in a) > 20  # new PAD positions for most examples


def test_iterator_state_round_trip(data):
  cfg = _cfg(data)
  pipe = TrainPipeline(cfg, process_index=1, process_count=2)
  _take(pipe, 3)
  state = json.loads(json.dumps(pipe.get_state()))  # what grain's orbax handler writes
  after = _take(pipe, 15)  # past the end of the first epoch (40 examples / global batch 4)
  fresh = TrainPipeline(cfg, process_index=1, process_count=2)
  fresh.set_state(state)
  _assert_same(_take(fresh, 15), after)


def test_counters_truncation_and_drop(data):
  cfg = _cfg(data, max_length=56, max_pad_ratio=0.0)
  pipe = TrainPipeline(cfg, process_index=0, process_count=1, num_threads=1, prefetch=1)
  batch = next(pipe)
  stats = pipe.stats.as_dict()
  assert stats["truncated"] > 0 and stats["dropped"] == 0 and batch["input_ids"].shape == (4, 56)
  pipe = TrainPipeline(
    dataclasses.replace(cfg, overlong="drop", max_length=72),
    process_index=0,
    process_count=1,
    num_threads=1,
    prefetch=1,
  )
  next(pipe)
  assert pipe.stats.as_dict()["dropped"] > 0


def test_ar_mode_and_eval_fill(data, tok):
  cfg = _cfg(data, eval_path=data["test_sft"], batch_size=4)
  batches = list(TrainPipeline(cfg, mode="ar", evaluation=True, process_index=0, process_count=1))
  assert len(batches) == 3  # 10 examples -> 3 batches, the last with 2 empty rows
  last = batches[-1]
  assert np.all(last["labels"][2:] == pairs.IGNORE) and np.all(last["input_ids"][2:] == tok.pad_id)
  recs, _ = read_jsonl(data["test_sft"])
  p, r = tok.encode_chat(recs[0].messages, recs[0].response)
  row = np.r_[p, r]
  np.testing.assert_array_equal(batches[0]["input_ids"][0, : len(row)], row)  # eval keeps file order, no PADs
  np.testing.assert_array_equal(batches[0]["labels"][0, : len(row)], np.r_[np.full(len(p) + 2, pairs.IGNORE), r[2:]])


# -- TFDS ArrayRecord ----------------------------------------------------------------------------------


def test_array_record_round_trip(data, tok, tmp_path):
  from pipo_jax.data.tfds_builder import ArrayRecordPairs, build_array_record

  out = build_array_record(str(tmp_path / "ar"), {"train": data["train"], "opd": data["opd"]}, data["tokenizer"])
  assert out["num_examples"] == {"train": 40, "opd": 9}
  src = ArrayRecordPairs(str(tmp_path / "ar"), "train")
  recs, _ = read_jsonl(data["train"])
  want = {
    tuple(np.r_[tok.encode_chat(r.messages, r.response)[0], -1, tok.encode_chat(r.messages, r.response)[1]])
    for r in recs
  }
  got = {tuple(np.r_[src[i].prompt_ids, -1, src[i].response_ids]) for i in range(len(src))}
  assert got == want
  # The same examples reach the same rows through either source (eval: no splitting; order differs).
  cfg = _cfg(data, eval_path=data["train"], max_pad_ratio=0.0)
  rows = lambda pipe: sorted(tuple(x) for b in pipe for x in b["input_ids"].tolist())
  jsonl_rows = rows(TrainPipeline(cfg, evaluation=True, process_index=0, process_count=1))
  ar_rows = rows(TrainPipeline(cfg, path=str(tmp_path / "ar"), evaluation=True, process_index=0, process_count=1))
  assert jsonl_rows == ar_rows
  opd = PromptPipeline(
    str(tmp_path / "ar"),
    tok,
    batch_size=3,
    prompt_length=48,
    split="opd",
    evaluation=True,
    process_index=0,
    process_count=1,
  )
  assert sorted(r.meta["source_index"] for r in opd.records) == list(range(9))


# -- prompt pipeline -----------------------------------------------------------------------------------


def test_prompt_pipeline(data, tok, tmp_path):
  pp = PromptPipeline(
    data["opd"], tok, batch_size=4, prompt_length=48, evaluation=True, process_index=0, process_count=1
  )
  batches = list(pp)
  assert len(batches) == 3 and batches[-1]["index"].tolist() == [8, -1, -1, -1]
  recs, _ = read_jsonl(data["opd"])
  for b in batches:
    assert b["prompt_ids"].shape == (4, 48) and b["prompt_ids"].dtype == np.int32
    for ids, valid, n, i in zip(b["prompt_ids"], b["prompt_valid"], b["prompt_length"], b["index"]):
      assert valid.sum() == n and n % 2 == 0 and not valid[: 48 - n].any()
      if i < 0:
        continue
      want = tok.generation_prompt_ids(recs[i].messages)
      if len(want) % 2:
        want = np.r_[want, tok.pad_id]  # parity PAD
      np.testing.assert_array_equal(ids[48 - n :], want)
      assert pp.records[i].meta["answer"] == recs[i].meta["answer"]
  # Sharding and pass-rate filtering.
  rows = [dict(json.loads(l), pass_rate=k / 8) for k, l in enumerate(open(data["opd"]))]
  f = tmp_path / "rl.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in rows))
  kw = dict(batch_size=4, prompt_length=48, seed=1, min_pass_rate=0.5)
  whole = PromptPipeline(str(f), tok, process_index=0, process_count=1, **kw)
  assert whole.stats.as_dict()["filtered"] == 4 and len(whole.records) == 5
  g = [next(whole) for _ in range(3)]
  s0 = PromptPipeline(str(f), tok, process_index=0, process_count=2, **kw)
  s1 = PromptPipeline(str(f), tok, process_index=1, process_count=2, **kw)
  for gb in g:
    a, b = next(s0), next(s1)
    np.testing.assert_array_equal(np.r_[a["index"], b["index"]], gb["index"])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data):
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  cfg = _cfg(data)
  want = _take(TrainPipeline(cfg, process_index=0, process_count=1), 5)
  pipe = TrainPipeline(dataclasses.replace(cfg, worker_count=1), process_index=0, process_count=1)
  got = _take(pipe, 2)
  state = pipe.get_state()
  got += _take(pipe, 3)
  _assert_same(got, want)
  again = TrainPipeline(dataclasses.replace(cfg, worker_count=1), process_index=0, process_count=1)
  again.set_state(state)
  _assert_same(_take(again, 3), want[2:])
