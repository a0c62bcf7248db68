"""Workdirs that survive the job: local paths or URLs (gs://, any etils.epath scheme), proven shared.

A multi-host run writes one checkpoint from every process (each its own shards) and restores it from every
process: the workdir must be a location every host sees (a bucket, NFS / Filestore, gcsfuse). A relative or
local path on a TPU pod silently lands on each worker's own disk, where no host can restore the whole
checkpoint and a preempted spot VM takes it away. `prove_shared` turns that into one clear error at start-up:
process 0 writes a marker with a fresh token, every process reads it back.

Paths: `resolve("gs://b/run")` stays a URL (`os.path.abspath` would make it `./gs:/b/run` on each worker's local
disk); a local path becomes absolute. Everything here uses `etils.epath`, which orbax uses too.
"""

from __future__ import annotations

import json
import os
import secrets

from etils import epath

MARKER_DIR = ".pipo_jax_shared"


def is_url(path: str) -> bool:
  return "://" in str(path)


def resolve(path: str) -> str:
  """A URL unchanged (trailing '/' dropped), a local path made absolute."""
  path = str(path)
  if is_url(path):
    return path.rstrip("/")
  return os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  """`os.path.join` that keeps a URL a URL."""
  return str(epath.Path(path).joinpath(*parts)) if is_url(path) else os.path.join(path, *parts)


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
  """Write via a temporary sibling and a rename (atomic on local file systems; GCS objects are anyway)."""
  p = epath.Path(path)
  tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(p)  # overwrites (rename refuses an existing target)


class _RewriteOnFlush:
  """Append-only text file on an object store (no append there): lines are kept and the object rewritten on
  each flush. For small logs such as metrics.jsonl (one line per logged step)."""

  def __init__(self, path: str):
    self.path = path
    self._text = read_text(path) if exists(path) else ""
    self._dirty = False

  def write(self, s: str) -> None:
    self._text += s
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      epath.Path(self.path).write_text(self._text)
      self._dirty = False

  def close(self) -> None:
    self.flush()


def open_append(path: str):
  """A text file opened for appending: a local file, or `_RewriteOnFlush` for a URL."""
  return _RewriteOnFlush(path) if is_url(path) else open(path, "a")


def prove_shared(workdir: str, process_index: int | None = None, process_count: int | None = None) -> None:
  """Raise ValueError (one line) unless every process sees what process 0 writes in `workdir`.

  Single process: nothing to prove. Multi-process: process 0 writes `<workdir>/.pipo_jax_shared/<token>` with a
  token broadcast to all, then every process reads it back and the verdicts are all-gathered, so every process
  raises (or none does). Needs jax.distributed to be initialised.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if n == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  token = int(multihost_utils.broadcast_one_to_all(np.int64(secrets.randbits(62) if p == 0 else 0)))
  marker = join(workdir, MARKER_DIR, str(token))
  if p == 0:
    makedirs(join(workdir, MARKER_DIR))
    write_text(marker, json.dumps({"token": token, "writer": 0}))
  multihost_utils.sync_global_devices("pipo_jax.io.workdir: marker written")
  try:
    seen = json.loads(read_text(marker)).get("token") == token
  except Exception:  # missing, unreadable: all the same verdict
    seen = False
  verdicts = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
  multihost_utils.sync_global_devices("pipo_jax.io.workdir: marker read")
  if p == 0:
    try:
      epath.Path(marker).unlink()
    except Exception:
      pass
  blind = [i for i, v in enumerate(verdicts) if not v]
  if blind:
    raise ValueError(
      f"workdir {workdir} is not shared: process(es) {blind} cannot read the marker process 0 wrote there. A "
      f"multi-host checkpoint must go where every host sees it: --config.workdir=gs://BUCKET/run or a shared "
      f"mount (NFS, Filestore, gcsfuse)"
    )


def trim_metrics(workdir: str, step: int) -> int:
  """Drop the records of steps > `step` from `<workdir>/metrics.jsonl` (a resumed run re-runs them from its
  checkpoint, so they would otherwise appear twice). Returns how many were dropped. Process 0 only."""
  path = join(workdir, "metrics.jsonl")
  if not exists(path):
    return 0
  keep, dropped = [], 0
  for line in read_text(path).splitlines():
    if not line.strip():
      continue
    try:
      s = int(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):  # a torn last line of a killed run: drop it as well
      dropped += 1
      continue
    if s > step:
      dropped += 1
    else:
      keep.append(line)
  if dropped:
    write_text(path, "".join(l + "\n" for l in keep))
  return dropped
