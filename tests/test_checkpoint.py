import json
import os
import signal

import jax
import jax.numpy as jnp
import loopback
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from toy_tree import D

from pipo_jax import optim
from pipo_jax.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from pipo_jax.io import checkpoint as ck
from pipo_jax.models import lora


class FakeIterator:
  """A grain-like iterator: get_state() -> bytes, set_state(bytes)."""

  def __init__(self, pos=0):
    self.pos = pos

  def get_state(self):
    return f'{{"pos": {self.pos}}}'.encode()

  def set_state(self, s):
    import json

    self.pos = json.loads(s)["pos"]


def _small_params():
  g = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(g.standard_normal(s), jnp.float32)
  return {
    "backbone": {
      "layers": {"layer_0": {"mlp": {"up_proj": {"kernel": f(2, D, 16)}}}},
      "embed_tokens": {"embedding": f(16, D)},
    },
    "mtp": {"fc": {"kernel": f(2 * D, D)}, "norm": {"scale": f(D)}},
    "compressor": {"mlp_0": {"kernel": f(2 * D, D), "bias": f(D)}},
  }


def _loss(params, batch, rng):
  p = lora.materialize(params, LoraConfig(rank=2, dropout=0.1), rng=rng, deterministic=False)
  w = p["mtp"]["fc"]["kernel"][:D] + p["backbone"]["layers"]["layer_0"]["mlp"]["up_proj"]["kernel"][0, :, :D]
  w = w + p["compressor"]["mlp_0"]["kernel"][:D]
  return jnp.mean((jnp.tanh(batch @ w) * p["mtp"]["norm"]["scale"]).sum(-1) ** 2), {}


def _trained_state(steps=2):
  params = _small_params()
  ad = lora.init_lora(params, LoraConfig(rank=2), jax.random.PRNGKey(1))
  params = dict(params, lora=ad)
  mask = optim.trainable_mask(params, TrainConfig(trainable=("mtp/fc", "compressor")), lora_active=True)
  tx = optim.make_optimizer(OptimConfig(learning_rate=1e-2, warmup_ratio=0.0), 10)
  state = optim.TrainState.create(params, mask, tx, jax.random.PRNGKey(3))
  step = jax.jit(optim.make_train_step(_loss))
  for i in range(steps):
    state, _ = step(state, jnp.ones((4, D)) * (i + 1))
  return state


def _assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(state, sharding):
  return ck.abstract_with_shardings(state, jax.tree_util.tree_map(lambda _: sharding, state))


def test_round_trip_exact_with_iterator_and_config(tmp_path):
  state = _trained_state()
  cfg = CheckpointConfig(every_steps=2, keep=3, async_save=True)
  c = ck.Checkpointer(str(tmp_path), cfg, config={"mode": "sft", "lr": 1e-4})
  assert not c.save(1, state, FakeIterator(11))  # off-interval
  assert c.save(2, state, FakeIterator(12), metadata={"tokens": 99})
  c.close()
  assert ck.latest_step(str(tmp_path)) == 2
  for item in ("state", "data", "config", "metadata"):
    assert os.path.isdir(tmp_path / "checkpoints" / "2" / item)

  c2 = ck.Checkpointer(str(tmp_path), cfg)
  it = FakeIterator(0)
  rep = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), P())
  restored, data_state, meta = c2.restore_latest(_abstract(state, rep), data_iterator=it)
  c2.close()
  assert it.pos == 12 and data_state is not None and meta == {"tokens": 99, "step": 2, "frozen_saved": True}
  assert isinstance(restored, optim.TrainState) and int(restored.step) == 2
  _assert_trees_equal(restored, state)  # trainable, frozen, opt_state (Adam mu/nu/count), step, rng
  assert ck.read_config(str(tmp_path)) == {"mode": "sft", "lr": 1e-4}
  # the restored state trains on exactly like the original
  step = jax.jit(optim.make_train_step(_loss))
  _assert_trees_equal(step(restored, jnp.ones((4, D)))[0].trainable, step(state, jnp.ones((4, D)))[0].trainable)
  # params only, for convert/generate: adapters stay under 'lora'
  params = ck.restore_params(str(tmp_path))
  _assert_trees_equal(params, state.params)


def test_keep_n(tmp_path):
  state = _trained_state(0)
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, keep=2, async_save=True))
  for s in range(1, 5):
    assert c.save(s, state.replace(step=jnp.int32(s)))
  c.close()
  assert c.all_steps() == [3, 4] and ck.latest_step(str(tmp_path)) == 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]


def test_sigterm_triggers_final_save(tmp_path):
  state = _trained_state(0)
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=100, keep=3, async_save=True))
  guard = ck.PreemptionGuard().install()
  try:
    last = None
    for s in range(1, 50):
      state = state.replace(step=jnp.int32(s))
      c.save(s, state)  # never on the interval in this loop
      if s == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      if guard.should_stop(s):
        c.save(s, state, force=True, blocking=True)
        last = s
        break
  finally:
    guard.uninstall()
  c.close()
  assert last == 3 and ck.latest_step(str(tmp_path)) == 3
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_restore_onto_different_sharding(tmp_path):
  g = np.random.default_rng(1)
  params = {
    "backbone": {"layers": {"mlp": {"up_proj": {"kernel": jnp.asarray(g.standard_normal((8, 4, 16)), jnp.float32)}}}},
    "mtp": {"fc": {"kernel": jnp.asarray(g.standard_normal((16, 8)), jnp.float32)}},
  }
  mask = {"backbone": {"layers": {"mlp": {"up_proj": {"kernel": False}}}}, "mtp": {"fc": {"kernel": True}}}
  state = optim.TrainState.create(params, mask, optim.make_optimizer(OptimConfig(), 10), jax.random.PRNGKey(0))
  mesh_a = Mesh(np.array(jax.devices()), ("data",))
  src = jax.tree_util.tree_map(lambda x: NamedSharding(mesh_a, P("data") if x.ndim >= 2 else P()), state)
  state = jax.device_put(state, src)
  assert state.frozen["backbone"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P("data")
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, keep=1))
  c.save(1, state, force=True)
  c.close()

  mesh_b = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
  dst = jax.tree_util.tree_map(
    lambda x: NamedSharding(
      mesh_b, P(None, "fsdp", "tensor") if x.ndim == 3 else P("tensor", "fsdp") if x.ndim == 2 else P()
    ),
    state,
  )
  abstract = ck.abstract_with_shardings(jax.eval_shape(lambda s: s, state), dst)
  c2 = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, keep=1))
  restored, data_state, _ = c2.restore_latest(abstract)
  c2.close()
  assert data_state is None
  _assert_trees_equal(restored, state)
  k = restored.frozen["backbone"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert k.sharding == dst.frozen["backbone"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert k.sharding.shard_shape(k.shape) == (8, 2, 4)
  mu = restored.opt_state[1][0].mu["mtp"]["fc"]["kernel"]
  assert mu.sharding.spec == P("tensor", "fsdp")


_MP_WORKER = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pipo_jax.io import checkpoint as ck
from pipo_jax import distributed, optim
from pipo_jax.config import CheckpointConfig, OptimConfig
assert distributed.initialize_distributed()
workdir, i = sys.argv[1], jax.process_index()
mesh = Mesh(np.array(jax.devices()), ("data",))
sh = NamedSharding(mesh, P("data"))
w = jax.make_array_from_callback((4, 8), sh, lambda idx: np.arange(32, dtype=np.float32).reshape(4, 8)[idx])
params = {"mtp": {"fc": {"kernel": w}}, "backbone": {"norm": {"scale": w}}}
mask = {"mtp": {"fc": {"kernel": True}}, "backbone": {"norm": {"scale": False}}}
state = optim.TrainState.create(params, mask, optim.make_optimizer(OptimConfig(), 10), jax.random.PRNGKey(0))

class It:
  def __init__(self, pos): self.pos = pos
  def get_state(self): return str(self.pos).encode()
  def set_state(self, s): self.pos = int(s)

c = ck.Checkpointer(workdir, CheckpointConfig(every_steps=1, keep=2))
c.save(1, state, It(100 + i), force=True, blocking=True)
c.close()
rep = NamedSharding(mesh, P())
abstract = ck.abstract_with_shardings(state, jax.tree_util.tree_map(lambda _: rep, state))
c = ck.Checkpointer(workdir, CheckpointConfig(every_steps=1, keep=2))
it = It(0)
restored, _, _ = c.restore_latest(abstract, it)
c.close()
k = restored.trainable["mtp"]["fc"]["kernel"]
ok = k.sharding.spec == P() and np.array_equal(np.asarray(k.addressable_data(0)), np.arange(32).reshape(4, 8))
# as the trainer does it: restore onto the live state's own shardings (step/rng process-local)
c = ck.Checkpointer(workdir, CheckpointConfig(every_steps=1, keep=2))
same, _, _ = c.restore_latest(ck.abstract_with_shardings(state, jax.tree_util.tree_map(lambda x: x.sharding, state)))
c.close()
for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(state)):
  pairs = zip(a.addressable_shards, b.addressable_shards)
  ok = ok and a.sharding == b.sharding and all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in pairs)
print("RESULT", i, it.pos, ok, flush=True)
"""


@pytest.mark.slow
def test_two_process_save_restore(tmp_path):
  """Two CPU processes over loopback: one sharded checkpoint, per-process iterator states."""
  outs = loopback.run_two_processes(_MP_WORKER, tmp_path, str(tmp_path / "run"), timeout=180)
  lines = loopback.result_lines(outs)
  assert lines == ["RESULT 0 100 True", "RESULT 1 101 True"], outs
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "1" / "data")) == [
    "commit_success.txt",
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]


def test_other_process_count_refused_in_one_line(tmp_path):
  state = _trained_state(1)
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, async_save=False))
  c.save(1, state, FakeIterator(5))
  c.close()
  data = tmp_path / "checkpoints" / "1" / "data"
  (f,) = [p for p in os.listdir(data) if p.startswith("process_")]
  assert f == "process_0-of-1.json"
  os.rename(data / f, data / "process_0-of-2.json")  # as if written by a 2-process run
  rep = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), P())
  c2 = ck.Checkpointer(str(tmp_path), CheckpointConfig())
  with pytest.raises(ck.ResumeRefused, match=r"was written by 2 processes and this run has 1"):
    c2.restore_latest(_abstract(state, rep), FakeIterator(0))
  c2.close()
  assert ck.latest_step(str(tmp_path)) == 1  # a refusal is not a corrupt step: nothing set aside


def test_uncommitted_step_is_invisible_everywhere(tmp_path):
  """A save cut short leaves orbax's temporary directory (committed by a final rename; on GCS by a marker):
  it is neither the latest step nor what resolve_step_dir / export / resume pick."""
  import shutil

  state = _trained_state(1)
  c = ck.Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, async_save=False))
  c.save(1, state)
  c.save(2, state.replace(step=jnp.int32(2)))
  c.close()
  d = tmp_path / "checkpoints"
  shutil.copytree(d / "2", d / "3.orbax-checkpoint-tmp-1796000000")  # what a kill mid-save leaves
  assert ck.committed_steps(ck.checkpoint_dir(str(tmp_path))) == [1, 2]
  assert ck.latest_step(str(tmp_path)) == 2
  assert ck.resolve_step_dir(str(tmp_path)) == str(d / "2")
  assert ck.resolve_step_dir(str(d)) == str(d / "2")


def test_trim_metrics_drops_steps_after_resume_and_torn_lines(tmp_path):
  from pipo_jax.io import workdir

  lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  assert workdir.trim_metrics(str(tmp_path), 2) == 3
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_config_check_names_fields_and_allows_listed():
  saved = {
    "mode": "sft",
    "data": {"batch_size": 8, "seed": 0},
    "train": {"num_steps": 10, "seed": 0},
    "model": {"hidden_size": 64, "remat": "none"},
  }
  cur = json.loads(json.dumps(saved))
  cur["data"]["batch_size"], cur["train"]["num_steps"], cur["model"]["remat"] = 16, 20, "full"
  with pytest.raises(ck.ResumeRefused, match=r"\(data.batch_size: 8 -> 16; train.num_steps: 10 -> 20\)"):
    ck.check_resume_config(saved, cur)  # remat (numerics only) is not a refusal
  assert ck.check_resume_config(saved, cur, ("data.batch_size", "train.num_steps")) == [
    "data.batch_size",
    "train.num_steps",
  ]
  cur["model"]["hidden_size"] = 128
  with pytest.raises(ck.ResumeRefused, match=r"model.hidden_size: 64 -> 128"):
    ck.check_resume_config(saved, cur, ("data.batch_size", "train.num_steps"))
