"""Fault injection: what a multi-day job meets (preemption, kill -9 mid-save, a corrupt newest step, NaN batches,
bad data, a changed config, a bad export) and what the code must then guarantee.

References: an uninterrupted run of the same tiny config (bit-for-bit equality of params and losses), the
checkpoint before a skipped step (equality), hand-written files (file:line), and the states on disk.
Real processes where the fault is process-level (SIGTERM, kill -9); the rest in process.
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fault_child import tiny_config

from pipo_jax import convert, guards
from pipo_jax.config import CheckpointConfig, Config, MeshConfig, OptimConfig
from pipo_jax.data import synthetic
from pipo_jax.data.schemas import MalformedRecordError
from pipo_jax.io import checkpoint as ck
from pipo_jax.io import hf_pipo, loading
from pipo_jax.trainer import Trainer

# Compile-heavy: run by name, `pytest -m slow tests/test_faults.py`.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for this module's in-process runs and its child processes: the same tiny
  step is compiled once instead of once per run (the executables, hence the numbers, are the same)."""
  d = str(tmp_path_factory.mktemp("jax_cache"))
  old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = d
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  yield d
  for k, v in old.items():
    jax.config.update(k, v)
  os.environ.pop("JAX_COMPILATION_CACHE_DIR")
  os.environ.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fault_data"))
  synthetic.write_dataset(out, n_train=64, n_test=8, seed=0)
  return out


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  Trainer(tiny_config(data_dir, workdir, steps=STEPS)).train()
  return workdir


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def assert_same_params(a_dir, b_dir):
  a = jax.tree_util.tree_leaves_with_path(ck.restore_params(a_dir))
  b = dict(jax.tree_util.tree_leaves_with_path(ck.restore_params(b_dir)))
  assert len(a) == len(b)
  for path, x in a:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(b[path]), err_msg=jax.tree_util.keystr(path))


def assert_resumed_equals_reference(workdir, reference):
  assert_same_params(reference, workdir)
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == list(range(1, STEPS + 1)), steps  # no step logged twice after the resume
  ref = {r["step"]: r["loss"] for r in read_metrics(reference)}
  assert {r["step"]: r["loss"] for r in read_metrics(workdir)} == ref


def child(data_dir, workdir, **opts):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen(
    [sys.executable, os.path.join(ROOT, "tests", "fault_child.py"), data_dir, workdir, json.dumps(opts)],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def wait_for(proc, line, timeout=600):
  """Read the child's output until `line` appears; returns everything read."""
  seen, t0 = [], time.time()
  for out in proc.stdout:
    seen.append(out)
    if out.strip() == line:
      return "".join(seen)
    assert time.time() - t0 < timeout, f"no {line!r} after {timeout}s:\n" + "".join(seen[-30:])
  raise AssertionError(f"child ended (rc {proc.wait()}) before {line!r}:\n" + "".join(seen[-40:]))


# -- preemption ------------------------------------------------------------------------------------


def test_sigterm_then_resume_equals_uninterrupted_bit_for_bit(data_dir, reference, tmp_path):
  """A real process gets SIGTERM after step 2 (of 6, saves every 2): it saves the step it is at and exits 0;
  the resumed run (frozen base rebuilt, not read: save_frozen=never) ends bitwise equal to the reference."""
  workdir = str(tmp_path / "run")
  proc = child(data_dir, workdir, steps=STEPS, save_frozen="never")
  wait_for(proc, "STEP 2")
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "DONE" in out
  stopped = ck.latest_step(workdir)
  assert 2 <= stopped < STEPS
  assert ck.read_metadata(workdir)["frozen_saved"] is False
  saved = (
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    .metadata(os.path.join(workdir, "checkpoints", str(stopped), "state"))
    .item_metadata.tree
  )
  assert sorted(saved) == ["opt_state", "rng", "step", "trainable"]  # the frozen base is not written
  Trainer(tiny_config(data_dir, workdir, steps=STEPS, save_frozen="never")).train()
  assert_resumed_equals_reference(workdir, reference)


def test_kill9_during_async_save_resumes_from_previous_step(data_dir, reference, tmp_path):
  """kill -9 while the step-4 save is being written (held before orbax commits it): step 4 is not a
  checkpoint, the resumed run starts from step 2 and ends bitwise equal to the reference."""
  workdir = str(tmp_path / "run")
  proc = child(data_dir, workdir, steps=STEPS, hold_finalize_at=4)
  wait_for(proc, "FINALIZING 4")
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert ck.committed_steps(ck.checkpoint_dir(workdir)) == [2]
  assert ck.latest_step(workdir) == 2
  Trainer(tiny_config(data_dir, workdir, steps=STEPS)).train()
  assert_resumed_equals_reference(workdir, reference)


# -- corrupt newest step ----------------------------------------------------------------------------


def test_truncated_newest_step_falls_back_with_message(tmp_path, caplog):
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  from test_checkpoint import FakeIterator, _abstract, _assert_trees_equal, _trained_state

  s1, s2 = _trained_state(1), _trained_state(2)
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, keep=5, async_save=False))
  c.save(1, s1, FakeIterator(1))
  c.save(2, s2, FakeIterator(2))
  c.close()
  files = [
    f
    for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "state" / "**"), recursive=True)
    if os.path.isfile(f) and "/d/" in f
  ]
  assert files
  for f in files:  # truncate every array data file of the newest step
    with open(f, "r+b") as fh:
      fh.truncate(max(0, os.path.getsize(f) // 2))
  rep = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), P())
  c2 = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, keep=5))
  it = FakeIterator(0)
  with caplog.at_level(logging.WARNING):
    state, _, meta = c2.restore_latest(_abstract(s2, rep), it)
  c2.close()
  assert meta["step"] == 1 and it.pos == 1
  _assert_trees_equal(ck._state_tree(state), ck._state_tree(s1))
  assert any("checkpoint step 2 is unreadable" in r.getMessage() for r in caplog.records)
  names = os.listdir(tmp_path / "checkpoints")
  assert "2" not in names and any(n.startswith("2.unreadable-") for n in names)  # set aside, not deleted
  assert ck.latest_step(str(tmp_path)) == 1


# -- non-finite steps -------------------------------------------------------------------------------


class _PoisonTrainer(Trainer):
  """Batches of the listed steps (1-based) get one token id = vocab_size: the embedding lookup returns NaN
  (jnp.take fills out-of-range rows), as a bad pre-tokenised id did before ids were checked at load."""

  poison = ()

  def data_pipeline(self):
    pipe = super().data_pipeline()
    poison, vocab = set(self.poison), self.model_cfg.vocab_size
    nxt = type(pipe).__next__
    count = [0]

    class Poisoned(type(pipe)):
      def __next__(self):
        b = nxt(self)
        count[0] += 1
        if count[0] in poison:
          b = dict(b, input_ids=b["input_ids"].copy())
          b["input_ids"][0, 4] = vocab
        return b

    pipe.__class__ = Poisoned
    return pipe


def test_nan_steps_skipped_counted_then_clean_stop(data_dir, tmp_path):
  """NaN at step 2 -> skipped (params and optimizer state of step 2 == step 1), counted; NaN at 4 and 5 with
  max_nonfinite_steps=2 -> the run stops at step 5 naming it, without saving step 5; all saved steps finite."""
  workdir = str(tmp_path / "run")
  cfg = tiny_config(data_dir, workdir, steps=STEPS, every_steps=1, async_save=True, max_nonfinite_steps=2)
  t = _PoisonTrainer(cfg)
  t.poison = (2, 4, 5)
  with pytest.raises(guards.NonFiniteError, match=r"step 5: 2 consecutive .*newest checkpoint is step 4"):
    t.train()
  assert ck.committed_steps(ck.checkpoint_dir(workdir)) == [1, 2, 3, 4]
  m = {r["step"]: r for r in read_metrics(workdir)}
  assert [m[s]["nonfinite"] for s in (1, 2, 3, 4)] == [0, 1, 0, 1]
  assert [m[s]["skipped_nonfinite"] for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
  assert 5 not in m
  c = ck.Checkpointer(workdir, cfg.checkpoint)
  trees = {}
  for s in (1, 2, 3, 4):
    out = c.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    trees[s] = out["state"]
    assert not guards.nonfinite_leaves({"t": trees[s]["trainable"], "o": trees[s]["opt_state"]})
  c.close()
  same = lambda a, b: all(
    np.array_equal(x, y)
    for x, y in zip(
      jax.tree_util.tree_leaves(a),
      jax.tree_util.tree_leaves(b),
    )
  )
  for k in ("trainable", "opt_state"):
    assert same(trees[2][k], trees[1][k]) and same(trees[4][k], trees[3][k])  # the skipped steps changed nothing
    assert not same(trees[3][k], trees[2][k])  # a good step does
  assert int(trees[2]["step"]) == 2  # the step counter moves on with the data


def test_save_and_export_refuse_nonfinite_params(tmp_path):
  from test_checkpoint import _trained_state

  s = _trained_state(1)
  bad = s.replace(trainable=jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), s.trainable))
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, keep=5, async_save=True))
  with pytest.raises(guards.NonFiniteError, match="step 1: refusing to save"):
    c.save(1, bad)
  c.close()
  assert ck.latest_step(str(tmp_path)) is None
  # export
  from pipo_jax.config import ModelConfig, resolve_model_config

  cfg = resolve_model_config(ModelConfig(preset="tiny"))
  params = loading.abstract_pipo_params(cfg)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  params["mtp"]["fc"]["kernel"] = params["mtp"]["fc"]["kernel"].at[0, 0].set(jnp.inf)
  out = tmp_path / "hf"
  with pytest.raises(guards.NonFiniteError, match="mtp/fc/kernel"):
    hf_pipo.export_hf(params, cfg, str(out), require_tokenizer=False)
  assert not out.exists() and not glob.glob(str(tmp_path / "hf.tmp-*"))


# -- bad input --------------------------------------------------------------------------------------


def test_out_of_vocab_id_refused_at_load_with_file_line(data_dir, tmp_path):
  path = tmp_path / "tok.jsonl"
  path.write_text(
    json.dumps({"tokens": [5, 6, 7, 8], "prompt_length": 2})
    + "\n\n"
    + json.dumps({"tokens": [5, 6, 256, 8], "prompt_length": 2})
    + "\n"
  )
  cfg = tiny_config(data_dir, str(tmp_path / "run"))
  cfg.data.train_path = str(path)
  with pytest.raises(
    MalformedRecordError,
    match=rf"^{path}:3: response ids hold 256 \(position 0\), outside the "
    r"model's vocabulary \[0, 256\)",
  ):
    Trainer(cfg).train()
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before any state was built or saved


def test_data_end_refused_at_start(data_dir, tmp_path):
  cfg = tiny_config(data_dir, str(tmp_path / "run"), steps=20)
  cfg.data.num_epochs = 2  # 64 examples x 2 / 8 per step = 16 steps
  with pytest.raises(
    ValueError,
    match=r"feeds only 16 optimizer steps but train.num_steps=20: set "
    r"--config.train.num_steps=16",
  ):
    Trainer(cfg).train()
  cfg.optim = OptimConfig(grad_accum_steps=3)  # 16 micro-batches -> 5 whole steps
  with pytest.raises(ValueError, match=r"feeds only 5 optimizer steps"):
    Trainer(cfg).train()


def test_config_change_on_resume_refused_naming_fields(data_dir, reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  cfg = tiny_config(data_dir, workdir, steps=STEPS + 2)
  cfg.data.seed = 7
  with pytest.raises(ck.ResumeRefused, match=r"data.seed: 0 -> 7; train.num_steps: 6 -> 8"):
    Trainer(cfg).train()
  assert ck.latest_step(workdir) == STEPS  # nothing lost, nothing written
  # an allowed change goes through the check (and extends the run)
  saved = ck.read_config(workdir)
  cfg2 = tiny_config(data_dir, workdir, steps=STEPS + 2)
  cfg2.checkpoint.allow_changes = ("train.num_steps",)
  assert ck.check_resume_config(saved, Trainer(cfg2).saved_config(), cfg2.checkpoint.allow_changes) == [
    "train.num_steps"
  ]


def test_other_frozen_base_refused(tmp_path):
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  from test_checkpoint import _abstract, _trained_state

  s = _trained_state(1)
  fp = ck.frozen_fingerprint(s.frozen, "/models/base")
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1), save_frozen=False, fingerprint=fp)
  c.save(1, s, blocking=True)
  c.close()
  rep = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), P())
  ok = ck.Checkpointer(str(tmp_path), CheckpointConfig(), save_frozen=False, fingerprint=fp)
  state, _, _ = ok.restore_latest(_abstract(s, rep), frozen=s.frozen)
  ok.close()
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(state.frozen)[0], jax.tree_util.tree_leaves(s.frozen)[0])
  other = jax.tree_util.tree_map(lambda x: x * 1.01, s.frozen)
  c3 = ck.Checkpointer(
    str(tmp_path), CheckpointConfig(), save_frozen=False, fingerprint=ck.frozen_fingerprint(other, "/models/base")
  )
  with pytest.raises(ck.ResumeRefused, match="trained on another frozen base: the frozen weights changed"):
    c3.restore_latest(_abstract(s, rep), frozen=other)
  c3.close()


# -- export -----------------------------------------------------------------------------------------


def test_export_guarded_and_atomic(reference, tmp_path):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # a stale file of an older export
  with pytest.raises(FileExistsError, match="is not empty: pass --overwrite"):
    convert.export_checkpoint(reference, str(out))
  assert os.listdir(out) == ["model.safetensors.index.json"]  # untouched
  files = convert.export_checkpoint(reference, str(out), overwrite=True)
  names = set(os.listdir(out))
  assert "model.safetensors.index.json" not in names and names == set(files) | {"config.json"}
  assert not glob.glob(str(tmp_path / "hf.*"))  # no temporary sibling left
  _, a = loading.load_model(reference, init_heads=False)
  _, b = loading.load_model(str(out), init_heads=False)
  b = dict(jax.tree_util.tree_leaves_with_path(b))
  for p, x in jax.tree_util.tree_leaves_with_path(a):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(b[p]), err_msg=jax.tree_util.keystr(p))
  # --from_hf into a workdir that already holds checkpoints
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.import_hf(str(out), reference)


def test_export_without_tokenizer_needs_the_flag(reference, tmp_path):
  work = str(tmp_path / "run")
  shutil.copytree(reference, work)
  cfg_file = glob.glob(os.path.join(work, "checkpoints", "*", "config", "metadata"))
  for f in cfg_file:  # the run's tokenizer location is gone
    c = json.load(open(f))
    c["data"]["tokenizer_path"] = str(tmp_path / "gone")
    json.dump(c, open(f, "w"))
  with pytest.raises(FileNotFoundError, match="--allow_missing_tokenizer"):
    convert.export_checkpoint(work, str(tmp_path / "hf"))
  files = convert.export_checkpoint(work, str(tmp_path / "hf"), allow_missing_tokenizer=True)
  assert "tokenizer.json" not in files and "model.safetensors" in files


# -- config checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "batch,accum,mesh,procs,msg",
  [
    (8, 1, MeshConfig(data=-1), 1, None),
    (6, 1, MeshConfig(data=-1), 1, r"data.batch_size=6 is not divisible by mesh data x fsdp = 8 x 1 = 8"),
    (4, 32, MeshConfig(data=1, fsdp=-1, tensor=2), 1, None),
    (
      6,
      2,
      MeshConfig(data=1, fsdp=-1, tensor=2),
      1,
      r"= 4: the batch axis .* data.batch_size x "
      r"optim.grad_accum_steps = 12",
    ),
    (
      6,
      1,
      MeshConfig(data=2, fsdp=1, tensor=1),
      4,
      r"data.batch_size=6 \(per micro-step\) is not divisible by "
      r"the 4 processes",
    ),
    (8, 1, MeshConfig(data=-1, fsdp=-1), 1, r"at most one axis may be -1"),
    (9, 1, MeshConfig(data=3, fsdp=1, tensor=1), 1, None),  # a 3-device subset of 8
    (8, 1, MeshConfig(data=16, fsdp=1, tensor=1), 1, r"does not fit 8 devices"),
  ],
)
def test_validate_batch_against_processes_and_mesh(batch, accum, mesh, procs, msg):
  cfg = Config(mesh=mesh)
  cfg.data.batch_size, cfg.optim.grad_accum_steps = batch, accum
  if msg is None:
    cfg.validate(num_devices=8, process_count=procs)
    return
  with pytest.raises(ValueError, match=msg):
    cfg.validate(num_devices=8, process_count=procs)


def test_validate_names_the_field():
  for mutate, msg in [
    (lambda c: setattr(c.train, "max_nonfinite_steps", 0), r"train.max_nonfinite_steps=0"),
    (lambda c: setattr(c.checkpoint, "save_frozen", "sometimes"), r"checkpoint.save_frozen='sometimes'"),
    (lambda c: setattr(c.data, "max_length", 63), r"data.max_length=63"),
    (
      lambda c: (
        setattr(c, "mode", "opd"),
        setattr(c.opd, "teacher_checkpoint", "t"),
        setattr(c.data, "train_path", "p"),
        setattr(c.opd, "temperature", 0.0),
      ),
      r"opd.temperature=0.0",
    ),
    (lambda c: setattr(c.optim, "grad_accum_steps", 0), r"optim.grad_accum_steps=0"),
    (lambda c: (setattr(c, "mode", "opd"), setattr(c.data, "train_path", "p")), r"opd.teacher_checkpoint"),
  ]:
    cfg = Config()
    mutate(cfg)
    with pytest.raises(ValueError, match=msg):
      cfg.validate(num_devices=8, process_count=1)


# -- shared workdir (two real processes) ------------------------------------------------------------

_PROVE = """
import os, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from pipo_jax.io import workdir

try:
  workdir.prove_shared(sys.argv[3])
  print("SHARED", flush=True)
except ValueError as e:
  print("REFUSED " + str(e), flush=True)
"""


@pytest.mark.slow
def test_workdir_not_shared_refused_by_every_process(tmp_path):
  """Two jax processes: the same directory passes; each its own directory (as each host's local disk) makes
  both processes stop with the one-line message."""
  import socket

  script = tmp_path / "prove.py"
  script.write_text(_PROVE)
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")

  def run(dirs):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      addr = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [
      subprocess.Popen(
        [sys.executable, str(script), addr, str(i), d],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i, d in enumerate(dirs)
    ]
    return [p.communicate(timeout=300)[0] for p in procs]

  shared = str(tmp_path / "shared")
  os.makedirs(shared)
  outs = run([shared, shared])
  assert all("SHARED" in o for o in outs), outs
  local = [str(tmp_path / f"host{i}") for i in range(2)]
  for d in local:
    os.makedirs(d)
  outs = run(local)
  for o in outs:
    assert f"REFUSED workdir {local[0]}" in o or f"REFUSED workdir {local[1]}" in o, o
    assert "is not shared: process(es) [1] cannot read the marker process 0 wrote there" in o, o
