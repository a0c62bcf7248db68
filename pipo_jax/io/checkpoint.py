"""Orbax checkpoints: async saves every N steps, keep-N, resume onto target shardings, preemption.

On disk (`<workdir>/checkpoints/<step>/`, one directory per saved step, written by orbax):

  state/       the train state as one pytree {step, trainable, frozen, opt_state, rng} (OCDBT/zarr
               arrays; every process writes its own shards, so it works multi-host unchanged)
  data/        grain iterator state, `process_<i>-of-<n>.json` per process (grain's own handler)
  config/      the run's Config as JSON (so convert/generate can rebuild the model)
  metadata/    JSON: {"step": step} plus whatever the caller passes as `metadata` (the trainers pass nothing)

Saved trees are the `TrainState` fields except the static optimizer (`tx`), so a checkpoint can be
restored without building the optimizer (`restore_params`).

Frozen params (`save_frozen`): a LoRA run's frozen base is ~90 % of a save's bytes (9B recipe: 36.7 of
40.1 GB) and never changes, while a preemption leaves ~30 s. With `save_frozen=False` the state item holds
{step, trainable, opt_state, rng} and the metadata a fingerprint of the base (`frozen_fingerprint`: its
init_from, every leaf's shape and dtype, a sum and a sum of squares); resume takes the frozen part from the
freshly built state (loaded from init_from) and refuses a base whose fingerprint differs; `restore_params`
(export, generate) rebuilds it the same way. Full saves (`save_frozen=True`) stay self-contained.

Resume (`restore_latest`): steps are tried newest first; a step that fails to read (a truncated file, a
missing item) is moved aside as `<step>.unreadable-<time>` and the next one is tried, with a warning. Before
any array is read the saved config is compared with the current one (`check_resume_config`: changes that
alter data order or the LR schedule are refused unless listed in checkpoint.allow_changes) and the process
count with the one that wrote the data state; those refusals are not retried on older steps.

Saves refuse non-finite trainable params or optimizer state (`guards.NonFiniteError`): nothing bad lands
on disk and no good step is rotated out by it.

Workdirs may be URLs (gs://...): paths go through `pipo_jax.io.workdir` / etils.epath, never os.path.abspath.

Multi-process: every process must call `save`/`restore` with the same step (orbax synchronises
processes internally); the data item is per process. tests/test_checkpoint.py and tests/test_multihost.py (both
slow) run two processes. Format details: docs/formats.md#checkpoints.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from grain._src.python.dataset import dataset as grain_dataset

from pipo_jax import guards
from pipo_jax.io import workdir as wd

STATE_FIELDS = ("step", "trainable", "frozen", "opt_state", "rng")

# Config fields whose change on resume alters data order, the LR schedule or what is trained (model
# architecture fields are compared too: see `check_resume_config`).
RESUME_FIELDS = (
  "mode",
  "data.train_path",
  "data.format",
  "data.max_length",
  "data.batch_size",
  "data.seed",
  "data.num_epochs",
  "data.overlong",
  "data.max_pad_ratio",
  "data.pad_insertion",
  "data.think_mask_tokens",
  "optim.learning_rate",
  "optim.warmup_ratio",
  "optim.min_lr_ratio",
  "optim.weight_decay",
  "optim.b1",
  "optim.b2",
  "optim.eps",
  "optim.grad_clip_norm",
  "optim.grad_accum_steps",
  "train.num_steps",
  "train.seed",
  "train.trainable",
  "train.full_finetune",
  "train.train_embeddings",
  "lora.rank",
  "lora.alpha",
  "lora.dropout",
  "lora.targets",
  "checkpoint.init_from",
)
_MODEL_NUMERICS = ("preset", "dtype", "param_dtype", "scan_layers", "remat", "gdn_chunk_size", "attention_block")


class ResumeRefused(ValueError):
  """The checkpoint cannot continue this run (config, process count or frozen base changed)."""


def checkpoint_dir(workdir: str) -> str:
  return wd.join(wd.resolve(workdir), "checkpoints")


def committed_steps(directory: str) -> list:
  """Sorted steps of `directory` whose save finished (orbax's commit marker, or its finalized rename)."""
  d = epath.Path(directory)
  if not d.exists():
    return []
  steps = []
  for p in d.iterdir():
    if p.name.isdigit() and ((p / "commit_success.txt").exists() or ocp.step.is_path_finalized(p)):
      steps.append(int(p.name))
  return sorted(steps)


def _get(d: dict, dotted: str):
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return "<absent>"
    d = d[k]
  return d


def check_resume_config(saved: dict | None, current: dict | None, allowed=()) -> list:
  """Raise ResumeRefused naming every field in RESUME_FIELDS (and model architecture field) whose value
  differs between the checkpoint's config and this run's, except those in `allowed`. Returns the allowed
  fields that did change (logged by the caller)."""
  if saved is None or current is None:
    return []
  norm = lambda v: json.loads(json.dumps(v, default=str))
  fields = list(RESUME_FIELDS) + [f"model.{k}" for k in current.get("model", {}) if k not in _MODEL_NUMERICS]
  changed = [(f, _get(saved, f), _get(current, f)) for f in fields if norm(_get(saved, f)) != norm(_get(current, f))]
  allowed = set(allowed)
  refused = [c for c in changed if c[0] not in allowed]
  if refused:
    what = "; ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in refused)
    raise ResumeRefused(
      f"the run config differs from the checkpoint's in fields that change data order or the schedule ({what}). "
      f"Restore the old values, use a new workdir, or allow them with "
      f'--config.checkpoint.allow_changes="({", ".join(repr(f) for f, _, _ in refused)},)"'
    )
  return [c[0] for c in changed]


# -- frozen-base fingerprint ------------------------------------------------------------------------


@jax.jit
def _sums(leaves):
  f32 = [x.astype(jnp.float32) for x in leaves]
  return (sum((jnp.sum(x) for x in f32), jnp.float32(0)), sum((jnp.sum(x * x) for x in f32), jnp.float32(0)))


def save_bytes(state) -> dict:
  """Bytes of one save by part, from a (possibly abstract) TrainState: what `save_frozen` trades."""
  nbytes = lambda t: int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(t)))
  parts = {f: nbytes(getattr(state, f)) for f in STATE_FIELDS}
  full = sum(parts.values())
  return dict(parts, full=full, without_frozen=full - parts["frozen"])


def frozen_fingerprint(frozen, init_from: str = "", seed: int | None = None) -> dict:
  """What identifies a frozen base: its source, every leaf's shape and dtype, and two checksums (float32 sum
  and sum of squares, one device reduction). Small JSON."""
  flat, _ = jax.tree_util.tree_flatten_with_path(frozen)
  leaves = {"/".join(str(k.key) for k in p): [list(x.shape), str(x.dtype)] for p, x in flat}
  total, sq = (0.0, 0.0) if not flat else (float(v) for v in jax.device_get(_sums([x for _, x in flat])))
  return {"init_from": init_from, "seed": seed, "leaves": leaves, "sum": total, "sum_sq": sq}


def compare_fingerprints(saved: dict, current: dict, rtol: float = 1e-4) -> str | None:
  """None when the two bases match, else a one-line reason. The checksums are compared with a relative
  tolerance: their float32 reduction order depends on the sharding."""
  a, b = saved.get("leaves", {}), current.get("leaves", {})
  if set(a) != set(b):
    only = sorted(set(a) ^ set(b))[:3]
    return f"frozen leaves differ ({', '.join(only)} ...)"
  for k in sorted(a):
    if list(a[k]) != list(b[k]):
      return f"frozen leaf {k} was {a[k]}, is now {b[k]}"
  for key in ("sum", "sum_sq"):
    x, y = float(saved.get(key, 0.0)), float(current.get(key, 0.0))
    if abs(x - y) > rtol * max(abs(x), abs(y), 1.0):
      return (
        f"the frozen weights changed (checksum {key} {x:.8g} -> {y:.8g}; base was "
        f"{saved.get('init_from') or 'seed ' + str(saved.get('seed'))}, is "
        f"{current.get('init_from') or 'seed ' + str(current.get('seed'))})"
      )
  return None


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

  def install(self) -> PreemptionGuard:
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

  def __init__(
    self,
    workdir: str,
    ckpt_cfg,
    config: dict | None = None,
    save_frozen: bool = True,
    fingerprint: dict | None = None,
  ):
    """`save_frozen=False` needs `fingerprint` (`frozen_fingerprint` of the state's frozen part)."""
    self.directory = checkpoint_dir(workdir)
    self.config = config
    if not save_frozen and fingerprint is None:
      raise ValueError("Checkpointer(save_frozen=False) needs the frozen base's fingerprint")
    self.save_frozen = bool(save_frozen)
    self.fingerprint = fingerprint
    self.allow_changes = tuple(getattr(ckpt_cfg, "allow_changes", ()) or ())
    # The interval is ours (step % every_steps), not orbax's should_save, which also saves the
    # first step it sees: a resumed run would otherwise write an off-interval checkpoint.
    self.every_steps = max(1, int(ckpt_cfg.every_steps))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep if ckpt_cfg.keep > 0 else None,
      enable_async_checkpointing=bool(ckpt_cfg.async_save),
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  # -- save ---------------------------------------------------------------------------------------
  def save(
    self,
    step: int,
    state,
    data_iterator=None,
    metadata: dict | None = None,
    force: bool = False,
    blocking: bool = False,
  ) -> bool:
    """Save when `step` is on the interval (or `force`). Returns whether a save started.

    The arrays are copied to host before this returns; the write proceeds in the background unless
    `blocking`. `data_iterator` needs `get_state()` (grain iterators, or `IteratorSnapshot`). Raises
    guards.NonFiniteError, saving nothing, if the trainable params or optimizer state are not finite.
    """
    step = int(step)
    if (not force and step % self.every_steps) or step in self.manager.all_steps():
      if blocking:  # e.g. a preemption right after an interval save: that one must still land
        self.manager.wait_until_finished()
      return False
    guards.assert_finite({"trainable": state.trainable, "opt_state": state.opt_state}, f"step {step}: refusing to save")
    tree = _state_tree(state)
    meta = dict(metadata or {}, step=step, frozen_saved=self.save_frozen)
    if self.fingerprint is not None:
      meta["frozen_fingerprint"] = self.fingerprint
    if not self.save_frozen:
      del tree["frozen"]
    items = {"state": ocp.args.StandardSave(_host_local_to_numpy(tree))}
    if data_iterator is not None:
      items["data"] = grain_ckpt.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
    if self.config is not None:
      items["config"] = ocp.args.JsonSave(self.config)
    items["metadata"] = ocp.args.JsonSave(meta)
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
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list:
    return list(self.manager.all_steps())

  def _step_path(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _read_json(self, step: int, item: str) -> dict | None:
    f = self._step_path(step) / item / "metadata"
    return json.loads(f.read_text()) if f.exists() else None

  def check_compatible(self, step: int) -> dict:
    """Refusals that hold for every step (ResumeRefused): config changes, another process count, another
    frozen base. Returns the step's metadata."""
    meta = self._read_json(step, "metadata") or {}
    changed = check_resume_config(self._read_json(step, "config"), self.config, self.allow_changes)
    if changed:
      logging.warning("resume: allowed config changes since the checkpoint: %s", changed)
    data_dir = self._step_path(step) / "data"
    if data_dir.exists():
      counts = {int(m.group(1)) for m in (re.match(r"process_\d+-of-(\d+)", p.name) for p in data_dir.iterdir()) if m}
      if counts and counts != {jax.process_count()}:
        raise ResumeRefused(
          f"checkpoint {self._step_path(step)} was written by {sorted(counts)[0]} processes and this run has "
          f"{jax.process_count()}: the data-iterator state is per process. Resume with the same number of hosts "
          f"(or start a new workdir from it with --config.checkpoint.init_from)"
        )
    if not meta.get("frozen_saved", True):
      if self.fingerprint is None:
        raise ResumeRefused(
          f"checkpoint {self._step_path(step)} holds no frozen params and no fingerprint to "
          "rebuild them against was given"
        )
      why = compare_fingerprints(meta.get("frozen_fingerprint") or {}, self.fingerprint)
      if why:
        raise ResumeRefused(f"checkpoint {self._step_path(step)} was trained on another frozen base: {why}")
    return meta

  def restore(self, step: int, abstract_state, data_iterator=None, frozen=None):
    """(state, data_state bytes or None, metadata dict) for `step`.

    `abstract_state` is a TrainState (or a dict with STATE_FIELDS) of ShapeDtypeStructs whose
    `sharding` says where each restored array goes (see `abstract_with_shardings`); the result has
    the same type. If `data_iterator` is given its state is set (and grain prefetch restarted).
    `frozen`: the current frozen params, used when the checkpoint was saved without them.
    """
    step_dir = self._step_path(step)
    meta = self.check_compatible(step)
    tree = _state_tree_any(abstract_state)
    frozen_saved = meta.get("frozen_saved", True)
    if not frozen_saved:
      if frozen is None:
        raise ResumeRefused(f"checkpoint {step_dir} holds no frozen params: pass the rebuilt ones (frozen=...)")
      del tree["frozen"]
    items = {"state": ocp.args.StandardRestore(tree), "metadata": ocp.args.JsonRestore()}
    has_data = (step_dir / "data").exists()
    if has_data:
      if isinstance(data_iterator, grain_dataset.DatasetIterator):
        target = data_iterator  # grain then decodes its JSON state itself
      else:
        target = _IteratorSnapshot(target=data_iterator)
      items["data"] = grain_ckpt.CheckpointRestore(target)
    elif data_iterator is not None:
      raise ValueError(f"checkpoint {step_dir} has no data-iterator state to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    restored = dict(out["state"])
    if not frozen_saved:
      restored["frozen"] = frozen
    if isinstance(abstract_state, dict):
      state = restored
    else:
      state = abstract_state.replace(**restored)
    data_state = None
    if has_data and isinstance(target, _IteratorSnapshot):
      data_state = target.get_state()
    return state, data_state, out["metadata"]

  def _set_aside(self, step: int) -> None:
    """Rename an unreadable step out of orbax's sight (so it is neither retried nor blocks a later save of
    the same step number); process 0 renames, everyone waits."""
    if jax.process_index() == 0:
      src = self._step_path(step)
      dst = src.parent / f"{step}.unreadable-{int(time.time())}"
      src.rename(dst)
      logging.warning("moved unreadable checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"pipo_jax.io.checkpoint: step {step} set aside")
    self.manager.reload()

  def restore_latest(self, abstract_state, data_iterator=None, frozen=None):
    """`restore` of the newest readable step, or None when the directory holds no checkpoint.

    A step that fails to read is set aside with a warning and the next older one is tried (a kill during
    a save leaves no committed step at all: orbax commits by a final rename / marker). ResumeRefused is
    raised at once. Raises ValueError if no committed step is readable.
    """
    steps = committed_steps(self.directory)
    errors = []
    for step in reversed(steps):
      logging.info("restoring checkpoint step %d from %s", step, self.directory)
      try:
        out = self.restore(step, abstract_state, data_iterator, frozen=frozen)
      except ResumeRefused:
        raise
      except Exception as e:  # truncated / missing files: orbax, tensorstore and grain raise various types
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        logging.warning(
          "checkpoint step %d is unreadable (%s: %s); falling back to the previous step", step, type(e).__name__, reason
        )
        errors.append(f"step {step}: {type(e).__name__}: {reason}")
        self._set_aside(step)
        continue
      if errors:
        logging.warning("resumed from step %d after skipping unreadable step(s): %s", step, "; ".join(errors))
      return out
    if errors:
      raise ValueError(f"{self.directory}: no readable checkpoint ({'; '.join(errors)})")
    return None


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


def latest_step(workdir: str) -> int | None:
  """Newest committed step under `<workdir>/checkpoints`, None if there is none."""
  steps = committed_steps(checkpoint_dir(workdir))
  return steps[-1] if steps else None


def resolve_step_dir(path: str) -> str:
  """A step directory from a step dir, a `checkpoints` dir or a workdir (newest committed step)."""
  path = wd.resolve(path)
  if (epath.Path(path) / "state").exists():
    return path
  for d in (path, wd.join(path, "checkpoints")):
    steps = committed_steps(d)
    if steps:
      return wd.join(d, str(steps[-1]))
  raise FileNotFoundError(
    f"{path}: no committed orbax checkpoint (expected <step>/state/ or checkpoints/<step>/state/)"
  )


def read_config(path: str) -> dict | None:
  """The config JSON saved with a checkpoint (None if it was saved without one)."""
  f = epath.Path(resolve_step_dir(path)) / "config" / "metadata"
  return json.loads(f.read_text()) if f.exists() else None


def read_metadata(path: str) -> dict:
  f = epath.Path(resolve_step_dir(path)) / "metadata" / "metadata"
  return json.loads(f.read_text()) if f.exists() else {}


def rebuild_frozen(saved_config: dict, trainable: dict) -> dict:
  """The frozen part of a checkpoint saved without it: the base params rebuilt as the run built them (from
  checkpoint.init_from, else initialised from train.seed), less the leaves `trainable` holds."""
  import flax.linen as nn

  # local: loading and trainer import this module
  from pipo_jax import optim
  from pipo_jax.config import resolve_model_config
  from pipo_jax.io import loading
  from pipo_jax.trainer import AR_KEYS, boxed_params

  init_from = saved_config.get("checkpoint", {}).get("init_from", "")
  mode = saved_config.get("mode", "sft")
  model_cfg, _ = loading.config_from_saved(saved_config)
  if init_from:
    _, base = loading.load_model(init_from, init_heads=mode != "ar")
  else:
    k_params = jax.random.split(jax.random.PRNGKey(int(saved_config.get("train", {}).get("seed", 0))), 3)[0]
    # jitted, as Trainer.init_params builds it: an eager init can differ from the jitted one in the last bit
    mc = resolve_model_config(model_cfg)
    base = jax.jit(lambda k: nn.meta.unbox(boxed_params(mc, mode, k)))(k_params)
  if mode == "ar":
    base = {k: v for k, v in base.items() if k in AR_KEYS}
  mask = jax.tree_util.tree_map(lambda _: False, base)
  for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]:
    keys = [k.key for k in path]
    node = mask
    for k in keys[:-1]:
      node = node.get(k, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and keys[-1] in node:
      node[keys[-1]] = True
  _, frozen = optim.partition(base, mask)
  return frozen


def restore_params(path: str, shardings=None) -> dict:
  """Only the params (trainable and frozen merged; adapters stay under 'lora') from a checkpoint.

  `path`: step dir, checkpoints dir or workdir. `shardings`: None (every array on the first local
  device), one Sharding for all, or a callable `(path_tuple, shape) -> Sharding`. The optimizer state
  is not read. A checkpoint saved without its frozen base gets it rebuilt (`rebuild_frozen`) and checked
  against the saved fingerprint.
  """
  step_dir = resolve_step_dir(path)
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  tree = ckptr.metadata(wd.join(step_dir, "state")).item_metadata.tree
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def target(p, m):
    if shardings is None:
      s = default
    elif isinstance(shardings, jax.sharding.Sharding):
      s = shardings
    else:
      s = shardings(tuple(k.key for k in p), m.shape)
    return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s)

  keys = [k for k in ("trainable", "frozen") if k in tree]
  item = {k: jax.tree_util.tree_map_with_path(target, tree[k]) for k in keys}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  out = ckptr.restore(
    wd.join(step_dir, "state"), args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  )
  from pipo_jax.optim import combine  # local: optim imports models, keep this module light

  if "frozen" not in out:
    saved = read_config(step_dir)
    if saved is None:
      raise ValueError(f"{step_dir}: saved without frozen params and without the config to rebuild them")
    frozen = rebuild_frozen(saved, out["trainable"])
    meta = read_metadata(step_dir)
    why = compare_fingerprints(meta.get("frozen_fingerprint") or {}, frozen_fingerprint(frozen))
    if why:
      raise ValueError(f"{step_dir}: cannot rebuild its frozen base: {why}")
    out["frozen"] = jax.device_put(frozen, default if shardings is None or callable(shardings) else shardings)
  return combine(out["trainable"], out["frozen"])


IteratorSnapshot = _IteratorSnapshot  # the loop keeps one per finished step: a save never runs ahead of the model
