"""Tokenizer loading, special ids and the Qwen chat template, encoded side by side.

Special ids are never hard-coded (docs/method.md#special-ids-from-the-tokenizer-files); `load_tokenizer(dir)` finds
them as:

* PAD: ``tokenizer_config.json`` ``pad_token`` -> else ``config.json`` ``pad_token_id`` (top level or
  ``text_config``) -> else the token ``<|endoftext|>`` -> else a ValueError naming the files.
* EOS: ``tokenizer_config.json`` ``eos_token`` -> else ``config.json`` ``eos_token_id`` (first if a list)
  -> else ``<|im_end|>``.
* ``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``: looked up by their text in the vocabulary.
* The thinking prefix is ``encode("<think>\\n")``; its length (2 for Qwen3.5) is what think-prefix masking masks.

Chat template. When the directory carries its own Jinja template (``chat_template.jinja``, else
``tokenizer_config.json`` ``chat_template``), it is rendered with jinja2 exactly as transformers'
``apply_chat_template`` renders it (same environment, ``add_generation_prompt``, ``enable_thinking``), so SFT
data, generation prompts and OPD prompts are what the checkpoint was built with (`ChatTemplate`). Without
one, the built-in Qwen3.5 template below is used, encoded as two id sequences so the prompt/response
boundary is exact:

    prompt   = [<|im_start|>system\\n{sys}<|im_end|>\\n]  <|im_start|>user\\n{content}<|im_end|>\\n
               <|im_start|>assistant\\n
    response = <think>\\n {body} <|im_end|>\\n

The SFT convention follows the reference: ``<think>\\n`` opens the assistant content (response side) and is
left unsupervised by think-prefix masking of ``len(think_prefix_ids)`` tokens. The generation prompt used at
inference and for OPD rollouts is ``prompt + <think>\\n`` (`generation_prompt_ids`), so after masking an SFT
example's unsupervised prefix is token-for-token the inference prompt, and the parity PAD lands where
serving puts it. A response that already starts with ``<think>\\n`` is not given a second one. The three parts
of a response are encoded separately and concatenated, so the think prefix is the same ids on both sides
whatever the body starts with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

THINK_PREFIX = "<think>\n"
NO_THINK_SUFFIX = "<think>\n\n</think>\n\n"  # the generation prompt's end with thinking switched off


class ChatTemplate:
  """A checkpoint's Jinja chat template, rendered the way transformers' `apply_chat_template` renders it
  (a sandboxed environment with trim_blocks / lstrip_blocks, loop controls, `tojson`, `raise_exception`,
  `strftime_now`, and the special tokens as variables)."""

  def __init__(self, source: str, where: str, special_tokens: dict | None = None):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
      import datetime

      return datetime.datetime.now().strftime(fmt)

    self.where = where
    self.special_tokens = dict(special_tokens or {})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
      self.template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"{where}: the chat template does not parse ({e})") from None

  def render(self, messages: Sequence[dict], add_generation_prompt: bool, enable_thinking: bool = True) -> str:
    import jinja2

    try:
      return self.template.render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        **self.special_tokens,
      )
    except (jinja2.exceptions.TemplateError, TypeError, AttributeError, KeyError, IndexError) as e:
      raise ValueError(f"{self.where}: the chat template failed to render ({type(e).__name__}: {e})") from None


def read_chat_template(d: str, tok_config: dict) -> ChatTemplate | None:
  """The directory's own template: chat_template.jinja, else tokenizer_config.json's `chat_template` (a string,
  or a list of {"name", "template"} of which "default" is used). None when there is none."""
  path = os.path.join(d, "chat_template.jinja")
  source, where = None, path
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      source = f.read()
  else:
    t = tok_config.get("chat_template")
    where = os.path.join(d, "tokenizer_config.json")
    if isinstance(t, list):
      t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    source = t if isinstance(t, str) and t.strip() else None
  if source is None:
    return None
  special = {k: _token_text(tok_config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
  return ChatTemplate(source, where, special)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  eos: int
  im_start: int
  im_end: int
  think_start: int
  think_end: int

  @property
  def stop_ids(self) -> tuple:
    """Ids that end generation: `<|im_end|>` and EOS, never PAD (docs/method.md#tokens-and-chat-template)."""
    return tuple(sorted({self.im_end, self.eos} - {self.pad}))


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_text(v) -> str | None:
  """tokenizer_config.json writes a token as a string or as {"content": ...} (AddedToken)."""
  if isinstance(v, dict):
    v = v.get("content")
  return v if isinstance(v, str) and v else None


def _config_id(cfg: dict, key: str) -> int | None:
  for d in (cfg, cfg.get("text_config") or {}):
    v = d.get(key)
    if isinstance(v, list):
      v = v[0] if v else None
    if isinstance(v, int):
      return v
  return None


class ChatTokenizer:
  """A `tokenizers.Tokenizer` plus special ids and the chat template. All encodings are int32 [n]."""

  def __init__(self, tokenizer: Tokenizer, special: SpecialIds, path: str = "", template: ChatTemplate | None = None):
    self.tokenizer = tokenizer
    self.special = special
    self.path = path
    self.template = template
    self.think_prefix_ids = self.encode(THINK_PREFIX)
    if len(self.think_prefix_ids) == 0 or self.think_prefix_ids[0] != special.think_start:
      raise ValueError(
        f"{path}: encode({THINK_PREFIX!r}) = {self.think_prefix_ids.tolist()} does not start "
        f"with the <think> id {special.think_start}"
      )
    self._newline_ids = self.encode("\n")

  def with_special(self, **ids) -> ChatTokenizer:
    """The same tokenizer with some special ids replaced (e.g. the model config's PAD)."""
    return ChatTokenizer(self.tokenizer, dataclasses.replace(self.special, **ids), self.path, self.template)

  # -- plain text ------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self.special.pad

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32 [n]. Special tokens written in the text map to their ids; nothing is added around it."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Ids -> text. PAD (a special token) is dropped with `skip_special_tokens`, as the serving detokenizer does."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if skip_special_tokens:  # PAD may not be marked special in every tokenizer.json
      ids = [i for i in ids if i != self.special.pad]
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  # -- chat template ---------------------------------------------------------------
  def _turn(self, role: str, content: str) -> list:
    s = self.special
    return [
      np.asarray([s.im_start], np.int32),
      self.encode(f"{role}\n{content}"),
      np.asarray([s.im_end], np.int32),
      self._newline_ids,
    ]

  def _template_prompt_text(self, messages: Sequence[dict]) -> str:
    text = self.template.render(messages, add_generation_prompt=True, enable_thinking=True)
    return text[: -len(THINK_PREFIX)] if text.endswith(THINK_PREFIX) else text

  def prompt_ids(self, messages: Sequence[dict]) -> np.ndarray:
    """Prompt side of an SFT example: every turn, then `<|im_start|>assistant\n`. int32 [n]."""
    if self.template is not None:
      return self.encode(self._template_prompt_text(messages))
    parts = []
    for m in messages:
      parts += self._turn(m["role"], m["content"])
    parts += [np.asarray([self.special.im_start], np.int32), self.encode("assistant\n")]
    return np.concatenate(parts).astype(np.int32)

  def generation_prompt_ids(self, messages: Sequence[dict], enable_thinking: bool = True) -> np.ndarray:
    """Prompt for generation / OPD rollouts, int32 [n]: with thinking, `prompt_ids(messages)` followed by
    `<think>\n`; without, followed by `<think>\n\n</think>\n\n`. With a Jinja template: its rendering with
    `add_generation_prompt=True` and `enable_thinking`."""
    if self.template is not None:
      return self.encode(self.template.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking))
    tail = self.think_prefix_ids if enable_thinking else self.encode(NO_THINK_SUFFIX)
    return np.concatenate([self.prompt_ids(messages), tail]).astype(np.int32)

  def _split_response(self, text: str) -> np.ndarray:
    """`<think>\n` (if the text starts with it) and the rest, encoded separately (see the module docstring)."""
    if text.startswith(THINK_PREFIX):
      return np.concatenate([self.think_prefix_ids, self.encode(text[len(THINK_PREFIX) :])]).astype(np.int32)
    return self.encode(text)

  def response_ids(self, response: str, add_end: bool = True) -> np.ndarray:
    """Assistant side of an SFT example (built-in template): `<think>\n` + body (+ `<|im_end|>\n`). int32 [n].

    A body that already starts with `<think>\n` keeps a single prefix.
    """
    body = response[len(THINK_PREFIX) :] if response.startswith(THINK_PREFIX) else response
    parts = [self.think_prefix_ids, self.encode(body)]
    if add_end:
      parts += [np.asarray([self.special.im_end], np.int32), self._newline_ids]
    return np.concatenate(parts).astype(np.int32)

  def encode_chat(self, messages: Sequence[dict], response: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_ids int32 [P], response_ids int32 [R]) of one SFT example."""
    if self.template is None:
      return self.prompt_ids(messages), self.response_ids(response)
    prompt = self._template_prompt_text(messages)
    full = self.template.render(
      list(messages) + [{"role": "assistant", "content": response}], add_generation_prompt=False
    )
    if not full.startswith(prompt):
      raise ValueError(
        f"{self.template.where}: the chat template renders the prompt differently inside the "
        f"conversation, so the prompt/response boundary is undefined"
      )
    return self.encode(prompt), self._split_response(full[len(prompt) :])


def find_special_ids(tokenizer: Tokenizer, tok_config: dict, model_config: dict, where: str = "") -> SpecialIds:
  """Special ids from the tokenizer and its config files; see the module docstring for the search order."""

  def by_text(text: str, required: bool = True) -> int | None:
    i = tokenizer.token_to_id(text)
    if i is None and required:
      raise ValueError(f"{where}: the tokenizer has no token {text!r}, which the Qwen chat template needs")
    return i

  pad = None
  pad_text = _token_text(tok_config.get("pad_token"))
  if pad_text is not None:
    pad = by_text(pad_text, required=False)
  if pad is None:
    pad = _config_id(model_config, "pad_token_id")
  if pad is None:
    pad = by_text("<|endoftext|>", required=False)
  if pad is None:
    raise ValueError(
      f"{where}: no PAD token: tokenizer_config.json has no usable 'pad_token', config.json no "
      "'pad_token_id', and the vocabulary has no '<|endoftext|>'. Set one of them."
    )
  eos = None
  eos_text = _token_text(tok_config.get("eos_token"))
  if eos_text is not None:
    eos = by_text(eos_text, required=False)
  if eos is None:
    eos = _config_id(model_config, "eos_token_id")
  if eos is None:
    eos = by_text("<|im_end|>")
  return SpecialIds(
    pad=int(pad),
    eos=int(eos),
    im_start=by_text("<|im_start|>"),
    im_end=by_text("<|im_end|>"),
    think_start=by_text("<think>"),
    think_end=by_text("</think>"),
  )


def load_tokenizer(path: str) -> ChatTokenizer:
  """Load `tokenizer.json` (+ tokenizer_config.json, config.json) from a model directory (or the file itself)."""
  tok_file = path if path.endswith(".json") and os.path.isfile(path) else os.path.join(path, "tokenizer.json")
  d = os.path.dirname(tok_file)
  if not os.path.exists(tok_file):
    raise FileNotFoundError(
      f"{tok_file} not found: data.tokenizer_path (or the model directory) must hold a Hugging Face tokenizer.json"
    )
  try:
    tok = Tokenizer.from_file(tok_file)
  except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
    raise ValueError(f"{tok_file}: not a Hugging Face tokenizer.json ({e})") from None
  tok_config = _read_json(os.path.join(d, "tokenizer_config.json"))
  special = find_special_ids(tok, tok_config, _read_json(os.path.join(d, "config.json")), where=d)
  return ChatTokenizer(tok, special, path=d, template=read_chat_template(d, tok_config))


def record_token_ids(record, tok: ChatTokenizer | None) -> tuple[np.ndarray, np.ndarray]:
  """(prompt_ids, response_ids) int32 of a `schemas.Record`.

  SFT records: `encode_chat` (the response starts with `<think>\\n`). Prompt-only records: the generation
  prompt (ending in `<think>\\n`) and an empty response. Pre-tokenised records: their ids, unchanged.
  """
  if record.is_tokenized:
    return np.asarray(record.prompt_ids, np.int32), np.asarray(record.response_ids, np.int32)
  if tok is None:
    raise ValueError("a text record needs a tokenizer: set data.tokenizer_path (or give a model directory)")
  if record.response is None:
    return tok.generation_prompt_ids(record.messages), np.zeros(0, np.int32)
  return tok.encode_chat(record.messages, record.response)
