"""grain input pipelines: fixed-shape training batches (modes sft | ar) and prompt batches (OPD, generation).

Training stream (`TrainPipeline`), for a source of N examples and global batch G over `process_count` processes:

  range(N) -> shuffle(seed) -> repeat(num_epochs) -> (k, i): global position k, example i
           -> this process's rows: global batch s holds positions [s*G, (s+1)*G); process p takes rows
              [p*b, (p+1)*b) of it, b = G / process_count
           -> example: tokenise, PIPO pairs (`pairs.build_sft_example`) with
              rng = np.random.default_rng([seed, epoch = k // N, i]) -> pad_right to max_length
           -> batch(b) -> {"input_ids": int32 [b, max_length], "labels": int32 [b, max_length]}

Everything is a function of (seed, k, i), so batches are identical across runs, the processes' shares
partition each global batch, and the iterator state (a position) is all a checkpoint needs: `iterator` is a
grain `DatasetIterator` (save it with `grain.checkpoint.CheckpointSave(pipe.iterator)` in an orbax
`CheckpointManager`, or `get_state()` / `set_state()`). Dropped examples (overlong under `overlong="drop"`, or
nothing supervised) are skipped by each process independently, so a process still yields b rows per step and
no example is used by two processes; with drops the processes' rows are no longer aligned by global batch.

Counters (`stats`) are kept in this process; with `worker_count > 0` the per-example work (truncation, drops,
splits) runs in grain workers and is not counted here. Worker processes give the same batches, but their
iterator state has another format (restore with the same worker_count), and grain reads absl flags in them, so
they need parsed flags (any `absl.app` entry point; tests call `flags.FLAGS.mark_as_parsed()`).
"""

from __future__ import annotations

import os
import sys
import threading

import grain
import numpy as np
from absl import logging

from pipo_jax.config import DataConfig
from pipo_jax.data import pairs
from pipo_jax.data.schemas import JsonlSource, Record
from pipo_jax.data.tokenizer import ChatTokenizer, load_tokenizer, record_token_ids


class DataStats:
  """Thread-safe counters for logging: examples built, truncated, dropped, malformed, PAD splits."""

  _FIELDS = ("examples", "truncated", "dropped", "malformed", "pad_splits", "filtered")

  def __init__(self, malformed: int = 0):
    self._lock = threading.Lock()
    self._c = dict.fromkeys(self._FIELDS, 0)
    self._c["malformed"] = malformed
    self._ratio_sum = 0.0

  def add(self, ratio: float = 0.0, **kw) -> None:
    with self._lock:
      for k, v in kw.items():
        self._c[k] += int(v)
      self._ratio_sum += ratio

  def as_dict(self) -> dict:
    with self._lock:
      d: dict[str, float] = dict(self._c)
      d["mean_pad_ratio"] = self._ratio_sum / max(1, d["examples"])
      return d

  def __getstate__(self):  # pickled into grain workers: a fresh lock there
    return {"_c": dict(self._c), "_ratio_sum": self._ratio_sum}

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._lock = threading.Lock()


def open_source(
  path: str,
  split: str = "train",
  fmt: str = "auto",
  skip_malformed: bool = False,
  require_response: bool | None = None,
  vocab_size: int | None = None,
):
  """A JSONL file -> `JsonlSource`; a directory written by `tfds_builder` -> `ArrayRecordPairs`.
  `vocab_size`: token ids of pre-tokenised JSONL lines outside [0, vocab_size) fail at load with file:line."""
  if not path:
    raise ValueError("no data path: set data.train_path (a JSONL file or a TFDS ArrayRecord directory)")
  if os.path.isdir(path):
    from pipo_jax.data.tfds_builder import ArrayRecordPairs

    return ArrayRecordPairs(path, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path} does not exist")
  return JsonlSource(path, fmt, skip_malformed=skip_malformed, require_response=require_response, vocab_size=vocab_size)


def _process_index_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  return int(process_index), int(process_count)


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the {process_count} processes")
  return global_batch // process_count


class _ProcessRows(grain.MapDataset):
  """This process's rows of every global batch: local i -> global (i // b) * G + p * b + i % b.

  Positions >= `n_real` of a finite parent (the padding of a last partial batch, eval only) map to None
  unless `fill_last` is set, in which case they give the element `-1` (an empty row).
  """

  def __init__(
    self, parent: grain.MapDataset, global_batch: int, local_batch: int, process_index: int, fill_last: bool = False
  ):
    super().__init__(parent)
    self._g, self._b, self._p, self._fill = global_batch, local_batch, process_index, fill_last
    n = len(parent)
    n_batches = n // self._g if (not fill_last or n >= sys.maxsize) else -(-n // self._g)
    self._len = n_batches * self._b
    self._n_real = n

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.slice(i)
    j = (i // self._b) * self._g + self._p * self._b + i % self._b
    if j >= self._n_real:
      return -1
    return self._parent[j]

  def __str__(self) -> str:
    return f"_ProcessRows(G={self._g}, b={self._b}, p={self._p})"


def _with_position(k: int, i) -> tuple:
  return (k, int(i))


class _BuildExample:
  """(k, i) -> {"input_ids", "labels"} int32 [max_length], or None when the example is dropped."""

  def __init__(
    self,
    source,
    tok: ChatTokenizer | None,
    pad_id: int,
    mode: str,
    cfg: DataConfig,
    think_mask_tokens: int,
    max_pad_ratio: float,
    stats: DataStats,
  ):
    self.source, self.tok, self.pad_id, self.mode, self.stats = source, tok, pad_id, mode, stats
    self.max_length, self.overlong, self.seed = cfg.max_length, cfg.overlong, cfg.seed
    self.pad_insertion, self.difficulty_mix = cfg.pad_insertion, cfg.pad_difficulty_mix
    if mode != "ar":
      pairs.check_pad_insertion(cfg.pad_insertion)  # at construction, not in the first batch's worker
    self.think, self.ratio = think_mask_tokens, max_pad_ratio
    self.n = len(source)

  def _difficulty(self, record, i: int):
    d = record.meta.get("draft_difficulty")
    if self.difficulty_mix > 0 and d is None:
      raise ValueError(
        f"{self.source} record {i}: data.pad_difficulty_mix > 0 needs a `draft_difficulty` list per record; "
        "annotate the data with python -m pipo_jax.draft_difficulty"
      )
    return d

  def empty(self) -> dict:
    ids, lab = pairs.pad_right([], [], self.max_length, self.pad_id)
    return {"input_ids": ids, "labels": lab}

  def __call__(self, ki) -> dict | None:
    if isinstance(ki, int) and ki == -1:
      return self.empty()
    k, i = ki
    record = self.source[i]
    prompt_ids, response_ids = record_token_ids(record, self.tok)
    if self.mode == "ar":
      ex = pairs.build_ar_example(
        prompt_ids, response_ids, max_length=self.max_length, overlong=self.overlong, think_mask_tokens=self.think
      )
    else:
      # Seeded by (seed, epoch, example): reproducible and resumable, and a new split pattern every epoch.
      rng = np.random.default_rng([self.seed, k // self.n, i])
      ex = pairs.build_sft_example(
        prompt_ids,
        response_ids,
        pad_id=self.pad_id,
        rng=rng,
        max_pad_ratio=self.ratio,
        think_mask_tokens=self.think,
        max_length=self.max_length,
        overlong=self.overlong,
        pad_insertion=self.pad_insertion,
        draft_difficulty=self._difficulty(record, i),
        difficulty_mix=self.difficulty_mix,
      )
    if ex is None:
      self.stats.add(dropped=1)
      return None
    self.stats.add(ratio=ex.pad_ratio, examples=1, truncated=ex.truncated, pad_splits=ex.n_split)
    ids, lab = pairs.pad_right(ex.input_ids, ex.labels, self.max_length, self.pad_id)
    return {"input_ids": ids, "labels": lab}


def resolve_think_mask_tokens(n: int, tok: ChatTokenizer | None) -> int:
  """data.think_mask_tokens; -1 means "the length of the tokenizer's `<think>\\n`"
  (docs/method.md#special-ids-from-the-tokenizer-files)."""
  if n >= 0:
    if tok is not None and n != len(tok.think_prefix_ids):
      logging.warning(
        "data.think_mask_tokens=%d but the tokenizer's <think>\\n is %d tokens", n, len(tok.think_prefix_ids)
      )
    return n
  if tok is None:
    raise ValueError("data.think_mask_tokens=-1 (auto) needs a tokenizer")
  return len(tok.think_prefix_ids)


class TrainPipeline:
  """Fixed-shape training (or eval) batches for this process. Iterate it, or use `.iterator` directly.

  Yields {"input_ids": int32 [b, max_length], "labels": int32 [b, max_length]}, b = batch_size / process_count.
  `evaluation=True`: one pass in file order, no PAD splitting, and the last partial global batch filled with
  empty rows (all PAD, labels -100) so every batch has the fixed shape.
  """

  def __init__(
    self,
    cfg: DataConfig,
    *,
    mode: str = "sft",
    path: str | None = None,
    split: str = "train",
    tokenizer: ChatTokenizer | None = None,
    pad_id: int | None = None,
    evaluation: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 8,
    vocab_size: int | None = None,
  ):
    if mode not in ("sft", "ar"):
      raise ValueError(f"TrainPipeline mode={mode!r}: expected sft or ar (opd uses PromptPipeline)")
    if cfg.max_length % 2:
      raise ValueError(f"data.max_length={cfg.max_length} must be even (whole pairs)")
    self.cfg, self.mode = cfg, mode
    path = path if path is not None else (cfg.eval_path if evaluation else cfg.train_path)
    if tokenizer is None and cfg.tokenizer_path:
      tokenizer = load_tokenizer(cfg.tokenizer_path)
    self.tokenizer = tokenizer
    if pad_id is None:
      if tokenizer is None:
        raise ValueError("pad_id is unknown: give a tokenizer (data.tokenizer_path) or pad_id")
      pad_id = tokenizer.pad_id
    self.pad_id = int(pad_id)
    self.source = open_source(path, split, cfg.format, cfg.skip_malformed, require_response=True, vocab_size=vocab_size)
    if len(self.source) == 0:
      raise ValueError(f"{path}: no usable examples")
    self.stats = DataStats(malformed=self.source.num_malformed)
    if self.source.num_malformed:
      logging.warning("%s: skipped %d malformed lines", path, self.source.num_malformed)
    p, pc = _process_index_count(process_index, process_count)
    self.process_index, self.process_count = p, pc
    self.local_batch = local_batch_size(cfg.batch_size, pc)
    think = resolve_think_mask_tokens(cfg.think_mask_tokens, tokenizer)
    build = _BuildExample(
      self.source, tokenizer, self.pad_id, mode, cfg, think, 0.0 if evaluation else cfg.max_pad_ratio, self.stats
    )
    n = len(self.source)
    ds = grain.MapDataset.range(n)
    if not evaluation:
      ds = ds.shuffle(seed=cfg.seed % 2**32).repeat(cfg.num_epochs if cfg.num_epochs > 0 else None)
    ds = ds.map_with_index(_with_position)
    ds = _ProcessRows(ds, cfg.batch_size, self.local_batch, p, fill_last=evaluation)
    ds = ds.map(build)  # None (dropped) elements are skipped when iterating
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    it_ds = it_ds.batch(self.local_batch, drop_remainder=True)
    if cfg.worker_count > 0:
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    self.dataset = it_ds
    self.iterator = iter(it_ds)
    # Data end, known at start: None when the stream repeats forever.
    self.num_batches = None if (not evaluation and cfg.num_epochs <= 0) else len(ds) // self.local_batch

  def steps_available(self, grad_accum_steps: int = 1) -> int | None:
    """Optimizer steps the data can feed (None: repeats forever). An upper bound when examples are dropped
    (overlong="drop", nothing supervised): the loop then stops at the last full step when a process runs dry."""
    return None if self.num_batches is None else self.num_batches // max(1, grad_accum_steps)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)


def check_data_end(steps_available: int | None, num_steps: int, what: str) -> None:
  """Refuse at start a run that asks for more optimizer steps than its data holds (one line, with the fix)."""
  if steps_available is not None and steps_available < num_steps:
    raise ValueError(
      f"{what} feeds only {steps_available} optimizer steps but train.num_steps={num_steps}: set "
      f"--config.train.num_steps={steps_available} or raise data.num_epochs (0 = repeat forever)"
    )


class _PromptRow:
  """Prompt index (or -1 for an empty filler row) -> left-padded prompt arrays of length P."""

  def __init__(self, prompts: list, length: int, pad_id: int):
    self.prompts, self.length, self.pad_id = prompts, length, pad_id

  def __call__(self, i) -> dict:
    i = int(i)
    ids = np.full(self.length, self.pad_id, np.int32)
    valid = np.zeros(self.length, bool)
    n = 0
    if i >= 0:
      p = self.prompts[i]
      n = len(p)
      ids[self.length - n :] = p
      valid[self.length - n :] = True
    return {"prompt_ids": ids, "prompt_valid": valid, "prompt_length": np.int32(n), "index": np.int32(i)}


class PromptPipeline:
  """Batches of left-padded prompts for OPD rollouts and generation / evaluation.

  Yields {"prompt_ids": int32 [b, P] (PAD on the left), "prompt_valid": bool [b, P], "prompt_length": int32 [b],
  "index": int32 [b] (into `records`, -1 for filler rows)}, b = global batch / process_count, P = prompt_length.
  Prompts are the generation prompt (ending in `<think>\\n`); with `parity_pad` (PIPO) an odd prompt gets its
  parity PAD appended (docs/method.md#pad-rules), so with an even P the left padding is whole pairs. Prompts longer than
  P are dropped and counted (truncating a question would change it); with `min_pass_rate` > 0 prompts whose
  `pass_rate` is lower, or missing, are filtered out and counted. `records[index]` gives the Record (its `meta`
  holds e.g. `answer`, `source`, `pass_rate`). Training: shuffled and repeated; evaluation: one pass in order
  with the last batch filled by empty rows.
  """

  def __init__(
    self,
    path: str,
    tokenizer: ChatTokenizer | None,
    *,
    batch_size: int,
    prompt_length: int,
    seed: int = 0,
    evaluation: bool = False,
    num_epochs: int = 0,
    parity_pad: bool = True,
    min_pass_rate: float = 0.0,
    pad_id: int | None = None,
    split: str = "train",
    fmt: str = "auto",
    skip_malformed: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    vocab_size: int | None = None,
  ):
    if parity_pad and prompt_length % 2:
      raise ValueError(f"prompt_length={prompt_length} must be even for PIPO prompts (whole pairs)")
    self.tokenizer = tokenizer
    self.pad_id = int(tokenizer.pad_id if pad_id is None else pad_id)
    source = open_source(path, split, fmt, skip_malformed, vocab_size=vocab_size)
    self.stats = DataStats(malformed=source.num_malformed)
    self.records: list[Record] = []
    prompts = []
    for i in range(len(source)):
      rec = source[i]
      if min_pass_rate > 0 and not (rec.meta.get("pass_rate") is not None and rec.meta["pass_rate"] >= min_pass_rate):
        self.stats.add(filtered=1)
        continue
      if rec.is_tokenized:
        ids = np.asarray(rec.prompt_ids, np.int32)
        think = tokenizer.think_prefix_ids if tokenizer is not None else np.zeros(0, np.int32)
        r = np.asarray(rec.response_ids, np.int32)
        if len(r) and len(think) and np.array_equal(r[: len(think)], think):  # an SFT record: add `<think>\n`
          ids = np.concatenate([ids, think])
      else:
        ids = record_token_ids(Record(messages=rec.messages), tokenizer)[0]  # the generation prompt
      if parity_pad and len(ids) % 2:
        ids = np.append(ids, np.int32(self.pad_id))
      if len(ids) > prompt_length:
        self.stats.add(dropped=1)
        continue
      self.records.append(rec)
      prompts.append(ids)
    if not prompts:
      raise ValueError(f"{path}: no prompt fits prompt_length={prompt_length} (stats {self.stats.as_dict()})")
    self.stats.add(examples=len(prompts))
    p, pc = _process_index_count(process_index, process_count)
    self.local_batch = local_batch_size(batch_size, pc)
    ds = grain.MapDataset.range(len(prompts))
    if not evaluation:
      ds = ds.shuffle(seed=seed % 2**32).repeat(num_epochs if num_epochs > 0 else None)
    ds = _ProcessRows(ds, batch_size, self.local_batch, p, fill_last=evaluation)
    ds = ds.map(_PromptRow(prompts, prompt_length, self.pad_id))
    self.dataset = ds.to_iter_dataset().batch(self.local_batch, drop_remainder=True)
    self.iterator = iter(self.dataset)
    self.num_batches = None if (not evaluation and num_epochs <= 0) else len(ds) // self.local_batch

  def steps_available(self, grad_accum_steps: int = 1) -> int | None:
    """Optimizer steps the prompts can feed (None: repeats forever)."""
    return None if self.num_batches is None else self.num_batches // max(1, grad_accum_steps)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)
