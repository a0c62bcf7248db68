"""Orbax checkpoints: async saves every N steps, keep-N, resume onto target shardings, preemption.

On disk (`<workdir>/checkpoints/<step>/`, one directory per saved step, written by orbax):

  state/       the train state as one pytree {step, trainable, frozen, opt_state, rng} (OCDBT/zarr
               arrays; every process writes its own shards, so it works multi-host unchanged)
  data/        grain iterator state, `process_<i>-of-<n>.json` per process (grain's own handler)
  config/      the run's Config as JSON (so convert/generate can rebuild the model)
  metadata/    JSON: {"step": step} plus whatever the caller passes as `metadata` (the trainers pass nothing)

Saved trees are the `TrainState` fields except the static optimizer (`tx`), so a checkpoint can be
restored without building the optimizer (`restore_params`). Frozen params are saved too: each step
directory is self-contained for export, at the cost of rewriting the frozen base weights each save.

Multi-process: every process must call `save`/`restore` with the same step (orbax synchronises
processes internally); the data item is per process. tests/test_checkpoint.py and tests/test_multihost.py (both
slow) run two processes. Format details: docs/formats.md#checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Optional

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from grain._src.python.dataset import dataset as grain_dataset

STATE_FIELDS = ("step", "trainable", "frozen", "opt_state", "rng")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _state_tree(state) -> dict:
  return {f: getattr(state, f) for f in STATE_FIELDS}


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying target shardings: what `restore_latest` restores onto.

  `tree` holds arrays or ShapeDtypeStructs (e.g. `jax.eval_shape(TrainState.create, ...)`),
  `shardings` a matching tree of `jax.sharding.Sharding` (or one sharding for every leaf).
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _IteratorSnapshot:
  """An iterator state frozen at save time, handed to grain's handler (which may run after the loop
  has moved on when saves are async). Restores record what grain hands back."""

  def __init__(self, state: Any = None, target: Any = None):
    if isinstance(state, dict):  # DatasetIterator states are dicts; grain stores them as JSON text
      state = json.dumps(state).encode()
    self._state = state
    self._target = target

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes):
    self._state = state
    if self._target is not None:
      self._target.set_state(state)

  def start_prefetch(self):
    if self._target is not None and hasattr(self._target, "start_prefetch"):
      self._target.start_prefetch()


class PreemptionGuard:
  """SIGTERM (and optionally SIGINT) sets a flag; the loop polls `should_stop(step)` and then makes
  one final blocking save. No work happens inside the signal handler itself.

  Multi-process: a signal may reach only some processes, so `should_stop` all-gathers the flag
  (one tiny collective; call it every step or every few) and also honours JAX's preemption notice
  (`multihost_utils.reached_preemption_sync_point`, TPU maintenance events) when the distributed
  runtime is up.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._flag = threading.Event()
    self._signals = tuple(signals)
    self._previous = {}

  def install(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard: not on the main thread, signal handlers not installed")
      return self
    for s in self._signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def uninstall(self):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self._flag.set()

  def trigger(self):
    self._flag.set()

  @property
  def requested(self) -> bool:
    return self._flag.is_set()

  def should_stop(self, step: int) -> bool:
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(local, np.int32))
    stop = bool(np.any(flags))
    try:
      stop = stop or multihost_utils.reached_preemption_sync_point(int(step))
    except Exception:  # no preemption service when the runtime was started without it
      pass
    return stop


class Checkpointer:
  """One run's checkpoints: `save` writes on every `ckpt_cfg.every_steps`-th step (or when forced), keeps the last
  `ckpt_cfg.keep`."""

  def __init__(self, workdir: str, ckpt_cfg, config: Optional[dict] = None):
    self.directory = checkpoint_dir(workdir)
    self.config = config
    # The interval is ours (step % every_steps), not orbax's should_save, which also saves the
    # first step it sees: a resumed run would otherwise write an off-interval checkpoint.
    self.every_steps = max(1, int(ckpt_cfg.every_steps))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep if ckpt_cfg.keep > 0 else None,
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  # -- save ---------------------------------------------------------------------------------------
  def save(self, step: int, state, data_iterator=None, metadata: Optional[dict] = None,
           force: bool = False, blocking: bool = False) -> bool:
    """Save when `step` is on the interval (or `force`). Returns whether a save started.

    The arrays are copied to host before this returns; the write proceeds in the background unless
    `blocking`. `data_iterator` needs `get_state()` (grain iterators).
    """
    step = int(step)
    if (not force and step % self.every_steps) or step in self.manager.all_steps():
      if blocking:  # e.g. a preemption right after an interval save: that one must still land
        self.manager.wait_until_finished()
      return False
    items = {"state": ocp.args.StandardSave(_host_local_to_numpy(_state_tree(state)))}
    if data_iterator is not None:
      items["data"] = grain_ckpt.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
    if self.config is not None:
      items["config"] = ocp.args.JsonSave(self.config)
    items["metadata"] = ocp.args.JsonSave(dict(metadata or {}, step=step))
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if blocking:
      self.manager.wait_until_finished()
    return saved

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  # -- restore ------------------------------------------------------------------------------------
  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list:
    return list(self.manager.all_steps())

  def restore(self, step: int, abstract_state, data_iterator=None):
    """(state, data_state bytes or None, metadata dict) for `step`.

    `abstract_state` is a TrainState (or a dict with STATE_FIELDS) of ShapeDtypeStructs whose
    `sharding` says where each restored array goes (see `abstract_with_shardings`); the result has
    the same type. If `data_iterator` is given its state is set (and grain prefetch restarted).
    """
    step_dir = os.path.join(self.directory, str(step))
    items = {"state": ocp.args.StandardRestore(_state_tree_any(abstract_state)),
             "metadata": ocp.args.JsonRestore()}
    has_data = os.path.isdir(os.path.join(step_dir, "data"))
    if has_data:
      if isinstance(data_iterator, grain_dataset.DatasetIterator):
        target = data_iterator  # grain then decodes its JSON state itself
      else:
        target = _IteratorSnapshot(target=data_iterator)
      items["data"] = grain_ckpt.CheckpointRestore(target)
    elif data_iterator is not None:
      raise ValueError(f"checkpoint {step_dir} has no data-iterator state to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    restored = out["state"]
    if isinstance(abstract_state, dict):
      state = restored
    else:
      state = abstract_state.replace(**restored)
    data_state = None
    if has_data and isinstance(target, _IteratorSnapshot):
      data_state = target.get_state()
    return state, data_state, out["metadata"]

  def restore_latest(self, abstract_state, data_iterator=None):
    """`restore(latest_step, ...)`, or None when the directory holds no checkpoint."""
    step = self.latest_step()
    if step is None:
      return None
    logging.info("restoring checkpoint step %d from %s", step, self.directory)
    return self.restore(step, abstract_state, data_iterator)


def _host_local_to_numpy(tree):
  """Multi-process: arrays living on one local device (a step counter or rng made outside a jit with
  shardings) are not global arrays, which orbax refuses; every process holds the same value, so they
  are saved as numpy (written once, by the primary process)."""
  if jax.process_count() == 1:
    return tree

  def fix(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.SingleDeviceSharding):
      return np.asarray(x)
    return x

  return jax.tree_util.tree_map(fix, tree)


def _state_tree_any(state) -> dict:
  return {f: state[f] for f in STATE_FIELDS} if isinstance(state, dict) else _state_tree(state)


def latest_step(workdir: str) -> Optional[int]:
  """Newest complete step under `<workdir>/checkpoints`, None if there is none."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return None
  steps = [int(n) for n in os.listdir(d)
           if n.isdigit() and os.path.exists(os.path.join(d, n, "commit_success.txt"))]
  if not steps:  # file systems without the marker file (e.g. GCS): trust orbax's own listing
    steps = list(ocp.utils.checkpoint_steps(d)) if hasattr(ocp.utils, "checkpoint_steps") else []
  return max(steps) if steps else None


def resolve_step_dir(path: str) -> str:
  """A step directory from a step dir, a `checkpoints` dir or a workdir (newest step)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    return path
  for d in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(d):
      steps = [int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n, "state"))]
      if steps:
        return os.path.join(d, str(max(steps)))
  raise FileNotFoundError(f"{path}: no orbax checkpoint (expected <step>/state/ or checkpoints/<step>/state/)")


def read_config(path: str) -> Optional[dict]:
  """The config JSON saved with a checkpoint (None if it was saved without one)."""
  f = os.path.join(resolve_step_dir(path), "config", "metadata")
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    return json.load(fh)


def restore_params(path: str, shardings=None) -> dict:
  """Only the params (trainable and frozen merged; adapters stay under 'lora') from a checkpoint.

  `path`: step dir, checkpoints dir or workdir. `shardings`: None (every array on the first local
  device), one Sharding for all, or a callable `(path_tuple, shape) -> Sharding`. The optimizer state
  is not read.
  """
  step_dir = resolve_step_dir(path)
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  tree = ckptr.metadata(os.path.join(step_dir, "state")).item_metadata.tree
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def target(p, m):
    if shardings is None:
      s = default
    elif isinstance(shardings, jax.sharding.Sharding):
      s = shardings
    else:
      s = shardings(tuple(k.key for k in p), m.shape)
    return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s)

  item = {k: jax.tree_util.tree_map_with_path(target, tree[k]) for k in ("trainable", "frozen")}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  out = ckptr.restore(os.path.join(step_dir, "state"),
                      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  from pipo_jax.optim import combine  # local: optim imports models, keep this module light
  return combine(out["trainable"], out["frozen"])
