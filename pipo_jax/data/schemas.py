"""JSONL record schemas: parse and validate one line into a `Record`.

Accepted line schemas (`fmt="auto"` detects them by their keys):

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
  With a final assistant turn it is an SFT example (the reference `build_sft_data_on_results_jsonl.py`
  output); without one it is a prompt (the reference RL/OPD data, with optional ``source``,
  ``source_index``, ``pass_rate``).
* ``prompt_response``: ``{"prompt": str, "response": str}``; ``{"prompt": str}`` alone is a prompt.
* ``benchmark``: ``{"question": str, "answer": str, "type": str}``: a prompt whose gold answer is kept.
* ``tokens``: pre-tokenised, either ``{"tokens": [int, ...], "prompt_length": int (optional, default 0)}``
  or ``{"prompt_ids": [int, ...], "response_ids": [int, ...]}``.

Every other key of a line is kept in `Record.meta` (e.g. ``source``, ``pass_rate``, ``answer``).

A malformed line raises `MalformedRecordError` naming ``file:line``; with ``skip_malformed`` it is skipped
and counted instead, and the count is returned to the caller, who logs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

FORMATS = ("auto", "messages", "prompt_response", "benchmark", "tokens")
_ROLES = ("system", "user", "assistant")


class MalformedRecordError(ValueError):
  """A JSONL line that does not match the expected schema; the message starts with ``file:line:``."""


@dataclasses.dataclass
class Record:
  """One example, before tokenisation (text) or after it (ids).

  Text records: `messages` holds the prompt-side turns (system/user/assistant history), `response` the final
  assistant content (None for a prompt-only record). Token records: `prompt_ids` / `response_ids` int32 [n].
  """

  messages: list | None = None
  response: str | None = None
  prompt_ids: np.ndarray | None = None
  response_ids: np.ndarray | None = None
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def is_tokenized(self) -> bool:
    return self.prompt_ids is not None

  @property
  def has_response(self) -> bool:
    return self.response is not None or (self.response_ids is not None and len(self.response_ids) > 0)


def detect_format(obj: dict) -> str:
  if "messages" in obj:
    return "messages"
  if "tokens" in obj or "prompt_ids" in obj:
    return "tokens"
  if "question" in obj:
    return "benchmark"
  if "prompt" in obj:
    return "prompt_response"
  raise ValueError(
    f"cannot tell the schema from keys {sorted(obj)}: expected one of messages | prompt "
    "(+response) | question (+answer) | tokens | prompt_ids (+response_ids)"
  )


def _int_list(v: Any, name: str) -> np.ndarray:
  if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
    raise ValueError(f"{name!r} must be a list of integers")
  arr = np.asarray(v, dtype=np.int64).reshape(-1)
  if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
    raise ValueError(f"{name!r} holds ids outside [0, 2**31)")
  return arr.astype(np.int32)


def _str_field(obj: dict, key: str) -> str:
  v = obj.get(key)
  if not isinstance(v, str):
    raise ValueError(f"{key!r} must be a string, got {type(v).__name__}")
  return v


def parse_record(obj: Any, fmt: str = "auto") -> Record:
  """Validate one decoded JSON object and turn it into a `Record`. Raises ValueError on a schema error."""
  if not isinstance(obj, dict):
    raise ValueError(f"a line must be a JSON object, got {type(obj).__name__}")
  if fmt not in FORMATS:
    raise ValueError(f"data.format={fmt!r}: expected one of {FORMATS}")
  if fmt == "auto":
    fmt = detect_format(obj)
  if fmt == "messages":
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
      raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
        raise ValueError(f"messages[{i}] must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r:.120}")
    if not any(m["role"] == "user" for m in msgs):
      raise ValueError("'messages' has no user turn")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    response = None
    if msgs[-1]["role"] == "assistant":
      response = msgs.pop()["content"]
    meta = {k: v for k, v in obj.items() if k != "messages"}
    return Record(messages=msgs, response=response, meta=meta)
  if fmt == "prompt_response":
    prompt = _str_field(obj, "prompt")
    response = _str_field(obj, "response") if "response" in obj else None
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "response")}
    return Record(messages=[{"role": "user", "content": prompt}], response=response, meta=meta)
  if fmt == "benchmark":
    question = _str_field(obj, "question")
    meta = {k: v for k, v in obj.items() if k != "question"}
    return Record(messages=[{"role": "user", "content": question}], response=None, meta=meta)
  # tokens
  if "tokens" in obj:
    toks = _int_list(obj["tokens"], "tokens")
    p = obj.get("prompt_length", 0)
    if not isinstance(p, int) or not 0 <= p <= len(toks):
      raise ValueError(f"'prompt_length' must be an int in [0, {len(toks)}], got {p!r}")
    meta = {k: v for k, v in obj.items() if k not in ("tokens", "prompt_length")}
    return Record(prompt_ids=toks[:p], response_ids=toks[p:], meta=meta)
  if "prompt_ids" not in obj:
    raise ValueError("a tokens record needs 'tokens' or 'prompt_ids'")
  prompt_ids = _int_list(obj["prompt_ids"], "prompt_ids")
  response_ids = _int_list(obj.get("response_ids", []), "response_ids")
  meta = {k: v for k, v in obj.items() if k not in ("prompt_ids", "response_ids")}
  return Record(prompt_ids=prompt_ids, response_ids=response_ids, meta=meta)


def _check_requirements(rec: Record, require_response: bool | None, vocab_size: int | None = None) -> None:
  if vocab_size and rec.is_tokenized:  # an id >= vocab_size indexes past the embedding: NaN, not an error
    for name, ids in (("prompt ids", rec.prompt_ids), ("response ids", rec.response_ids)):
      if ids is not None and len(ids) and int(np.max(ids)) >= vocab_size:
        j = int(np.argmax(np.asarray(ids) >= vocab_size))
        raise ValueError(f"{name} hold {int(ids[j])} (position {j}), outside the model's vocabulary [0, {vocab_size})")
  if require_response is True and not rec.has_response:
    raise ValueError(
      "the record has no response (an assistant turn, 'response' or response tokens), but training needs one"
    )
  pr = rec.meta.get("pass_rate")
  if pr is not None and (not isinstance(pr, (int, float)) or isinstance(pr, bool)):
    raise ValueError(f"'pass_rate' must be a number, got {pr!r}")


def parse_line(
  line: str,
  path: str,
  lineno: int,
  fmt: str = "auto",
  require_response: bool | None = None,
  vocab_size: int | None = None,
) -> Record:
  """Parse one JSONL line; errors become `MalformedRecordError("path:lineno: why")`. With `vocab_size`, token
  ids outside [0, vocab_size) are errors."""
  try:
    obj = json.loads(line)
    rec = parse_record(obj, fmt)
    _check_requirements(rec, require_response, vocab_size)
  except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
    raise MalformedRecordError(f"{path}:{lineno}: {e}") from None
  return rec


def index_jsonl(
  path: str,
  fmt: str = "auto",
  skip_malformed: bool = False,
  require_response: bool | None = None,
  vocab_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
  """Validate every line of a JSONL file once and index the good ones.

  Returns (spans int64 [n, 2] = (byte offset, byte length), line_numbers int64 [n] (1-based), n_malformed).
  Blank lines are ignored (not malformed). Validating up front makes a bad file fail before training starts, while
  only byte offsets are kept in memory, so a file of long trajectories is not held as Python objects.
  """
  offsets, linenos, n_bad = [], [], 0
  with open(path, "rb") as f:
    lineno, pos = 0, 0
    for raw in f:
      lineno += 1
      start, pos = pos, pos + len(raw)
      if not raw.strip():
        continue
      try:
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise MalformedRecordError(f"{path}:{lineno}: not UTF-8 ({e})") from None
        parse_line(text, path, lineno, fmt, require_response, vocab_size)
      except MalformedRecordError:
        if not skip_malformed:
          raise
        n_bad += 1
        continue
      offsets.append((start, len(raw)))
      linenos.append(lineno)
  return np.asarray(offsets, np.int64).reshape(-1, 2), np.asarray(linenos, np.int64), n_bad


def read_jsonl(
  path: str, fmt: str = "auto", skip_malformed: bool = False, require_response: bool | None = None
) -> tuple[list[Record], int]:
  """Read a whole (small) JSONL file into Records. Returns (records, n_malformed)."""
  offsets, linenos, n_bad = index_jsonl(path, fmt, skip_malformed, require_response)
  src = JsonlSource(path, fmt, offsets, linenos)
  return [src[i] for i in range(len(src))], n_bad


class JsonlSource:
  """Random access to the validated lines of a JSONL file (a grain `RandomAccessDataSource`).

  `source[i]` re-reads line i with `os.pread` from its byte span (thread-safe: grain reads with several
  threads) and parses it. The descriptor is reopened on unpickling, so the source pickles into grain workers.
  """

  def __init__(
    self,
    path: str,
    fmt: str = "auto",
    offsets: np.ndarray | None = None,
    linenos: np.ndarray | None = None,
    skip_malformed: bool = False,
    require_response: bool | None = None,
    vocab_size: int | None = None,
  ):
    self.path, self.fmt = path, fmt
    self.num_malformed = 0
    if offsets is None:
      offsets, linenos, self.num_malformed = index_jsonl(path, fmt, skip_malformed, require_response, vocab_size)
    self._offsets, self._linenos = offsets, linenos
    self._fh = os.open(path, os.O_RDONLY)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> Record:
    start, length = self._offsets[i]
    line = os.pread(self._fh, int(length), int(start)).decode("utf-8")
    return parse_line(line, self.path, int(self._linenos[i]), self.fmt)

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_fh"] = None
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._fh = os.open(self.path, os.O_RDONLY)

  def __del__(self):
    if getattr(self, "_fh", None) is not None:
      os.close(self._fh)

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, n={len(self)}, malformed={self.num_malformed})"


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
