"""TFDS builder: JSONL -> tokenised ArrayRecord shards; and the matching random-access reader.

tensorflow-datasets 4.9.10 runs this `GeneratorBasedBuilder` without TensorFlow installed: features are
serialised by tfds' own numpy path and written as ArrayRecord (`file_format="array_record"`), and
`tfds.builder_from_directory(...).as_data_source(split)` reads them back with no TensorFlow either (checked
in tests/test_data_pipeline.py), so no ArrayRecord files are written by hand.

Layout: ``{out_dir}/pipo_pairs/1.0.0/`` holding ``dataset_info.json``, ``features.json`` and
``pipo_pairs-{split}.array_record-0000N-of-0000M``. Each example is
``{"prompt_ids": int32 [P], "response_ids": int32 [R], "line": int64 (1-based JSONL line), "meta": JSON text}``
with the ids produced by `tokenizer.record_token_ids` (SFT: chat prompt / `<think>\\n`+response+`<|im_end|>\\n`;
prompt-only records: the generation prompt and an empty response). tfds stores the examples in a hashed
order; the training pipeline shuffles anyway.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from pipo_jax.data.schemas import JsonlSource, Record
from pipo_jax.data.tokenizer import ChatTokenizer, load_tokenizer, record_token_ids


class PipoPairs(tfds.core.GeneratorBasedBuilder):
  """Tokenised prompt/response pairs from JSONL files (one file per split)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "prompt_ids, response_ids, line, meta."}

  # tfds' default `code_path` probes `importlib_resources` (not installed, not needed) for classes defined in
  # a package; answering with this file directly avoids that optional dependency.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(
    self,
    *,
    split_paths: dict | None = None,
    tokenizer: ChatTokenizer | None = None,
    fmt: str = "auto",
    skip_malformed: bool = False,
    **kwargs,
  ):
    self._split_paths = dict(split_paths or {})
    self._tok = tokenizer
    self._fmt = fmt
    self._skip_malformed = skip_malformed
    self.num_malformed: dict = {}
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="PIPO prompt/response token ids (see pipo_jax/data/tfds_builder.py).",
      features=tfds.features.FeaturesDict(
        {
          "prompt_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "response_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "line": tfds.features.Scalar(dtype=np.int64),
          "meta": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    if not self._split_paths:
      raise ValueError("PipoPairs needs split_paths={'train': 'file.jsonl', ...}")
    return {name: self._generate_examples(name, path) for name, path in self._split_paths.items()}

  def _generate_examples(self, split: str, path: str):
    src = JsonlSource(path, self._fmt, skip_malformed=self._skip_malformed)
    self.num_malformed[split] = src.num_malformed
    if src.num_malformed:
      logging.warning("%s: skipped %d malformed lines", path, src.num_malformed)
    for i in range(len(src)):
      rec = src[i]
      prompt_ids, response_ids = record_token_ids(rec, self._tok)
      line = int(src._linenos[i])
      yield (
        line,
        {
          "prompt_ids": prompt_ids,
          "response_ids": response_ids,
          "line": line,
          "meta": json.dumps(rec.meta, ensure_ascii=False),
        },
      )


def build_array_record(
  out_dir: str, split_paths: dict, tokenizer_path: str = "", fmt: str = "auto", skip_malformed: bool = False
) -> dict:
  """Tokenise JSONL splits into ArrayRecord under out_dir. Returns {"path", "num_examples", "num_malformed"}.

  tokenizer_path may be empty only for pre-tokenised (`tokens`) files.
  """
  tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
  builder = PipoPairs(split_paths=split_paths, tokenizer=tok, fmt=fmt, skip_malformed=skip_malformed, data_dir=out_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=out_dir))
  return {
    "path": builder.data_dir,
    "num_examples": {k: v.num_examples for k, v in builder.info.splits.items()},
    "num_malformed": dict(builder.num_malformed),
  }


def find_dataset_dir(path: str) -> str:
  """The directory holding dataset_info.json: `path` itself or the single one below it."""
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(root for root, _, files in os.walk(path) if "dataset_info.json" in files)
  if len(found) != 1:
    raise FileNotFoundError(
      f"{path}: expected one TFDS dataset directory (with dataset_info.json) below it, found {len(found)}: {found[:4]}"
    )
  return found[0]


class ArrayRecordPairs:
  """Random-access reader over a built split: `source[i]` -> `schemas.Record` with token ids and meta."""

  def __init__(self, path: str, split: str = "train"):
    self.path = find_dataset_dir(path)
    builder = tfds.builder_from_directory(self.path)
    if split not in builder.info.splits:
      raise ValueError(f"{self.path}: no split {split!r}; it has {sorted(builder.info.splits)}")
    self._source = builder.as_data_source(split=split)
    self.num_malformed = 0  # counted (and logged) when the dataset was built

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Record:
    ex = self._source[i]
    meta = ex["meta"]
    meta = json.loads(meta.decode("utf-8") if isinstance(meta, bytes) else meta)
    return Record(
      prompt_ids=np.asarray(ex["prompt_ids"], np.int32),
      response_ids=np.asarray(ex["response_ids"], np.int32),
      meta=meta,
    )

  def __repr__(self) -> str:
    return f"ArrayRecordPairs({self.path!r}, n={len(self)})"
