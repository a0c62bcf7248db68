"""Multi-host correctness of the trainer, with real processes over loopback (gloo collectives on CPU).

Three runs of the same tiny PIPO SFT job (LoRA r8 + the fully trained heads, 4 steps of 2 accumulated
micro-batches of 8 sequences (global),
checkpoints every 2 steps) on generated data:

  A  1 process  x 8 devices, mesh data=8                         (the reference)
  B  2 processes x 4 devices, mesh data=8                         via launch/local_multiprocess.sh
  C  2 processes x 4 devices, mesh data=2,fsdp=2,tensor=2, resumed from B's step-2 checkpoint

Checked: B's per-step losses equal A's (1e-6 relative: a few fp32 ulps, since the LM-head loss chunks hold a slice of
every row and their partial sums cross processes) and so do its final params (up to fp32 reduction order); only
process 0 writes metrics (one metrics.jsonl line per step, one TensorBoard file, no progress lines from process 1)
while every process writes its own data-iterator state; C restores B's checkpoint collectively onto another mesh
(params resharded, the data iterator where it stopped) and its steps 3-4 and final params match the uninterrupted A
within fp tolerance (tensor parallelism reorders reductions).

Slow: five jax processes each compile the step (3-19 min wall on a 2-core machine, depending on what else runs;
2 December: step-4 losses 2e-6 apart A-B (11.247358 vs 11.247360), max |param diff| 1.7e-7 A-B and A-C), so it is
excluded from the default run: `pytest -m slow tests/test_multihost.py -s` prints the wall times.

`test_opd_two_processes_match_one_and_resume_on_another_mesh` does the same for the tiny OPD recipe (each process
rolls out its own prompt rows; 2 accumulated rollout batches per step). It compiles generation, teacher scoring and
the step in five processes: give it `-o timeout=0` on a small machine (pytest-timeout's 20 min is too short).
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4

FLAGS = f"""\
--config.mode=sft
--config.model.preset=tiny
--config.mesh.data=-1
--config.data.max_length=64
--config.data.batch_size=8
--config.data.max_pad_ratio=0.25
--config.train.num_steps={STEPS}
--config.train.log_every=1
--config.lora.rank=8
--config.lora.alpha=16
--config.optim.grad_accum_steps=2
--config.optim.learning_rate=3e-3
--config.optim.warmup_ratio=0.25
--config.loss.logits_chunk=64
--config.checkpoint.every_steps=2
--config.checkpoint.keep=5
"""

_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), PYTHON=sys.executable)
  env.update(extra)
  return env


def _start_single(flagfile, workdir, args):
  """One process, 8 simulated devices."""
  cmd = [sys.executable, "-m", "pipo_jax.train", f"--flagfile={flagfile}", f"--config.workdir={workdir}", *args]
  return subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _start_two(flagfile, workdir, args):
  """Two processes x 4 devices through the real launcher (loopback coordinator, gloo)."""
  cmd = [
    "bash",
    os.path.join(ROOT, "launch", "local_multiprocess.sh"),
    "2",
    str(flagfile),
    f"--config.workdir={workdir}",
    *args,
  ]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(name, proc, t0, timeout=1500):
  out, _ = proc.communicate(timeout=timeout)
  wall = time.time() - t0
  print(f"[test_multihost] run {name}: {wall:.1f}s wall, rc={proc.returncode}", flush=True)
  assert proc.returncode == 0, f"run {name} failed:\n{out[-6000:]}"
  return out, wall


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  steps = [r["step"] for r in recs]
  assert len(steps) == len(set(steps)), f"duplicate metric records (a second writer?): {steps}"
  return {r["step"]: r["loss"] for r in recs}


def _params(workdir, step):
  import jax

  from pipo_jax.io import checkpoint as ckpt_lib

  tree = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints", str(step)))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _max_param_diff(a, b) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def _assert_params_close(a, b, atol):
  """Equal up to fp32 reduction order: gradients are all-reduced across processes / devices in another order
  (observed max |diff| ~1e-6 on params of magnitude ~0.1-1 after 4 AdamW steps)."""
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=atol, err_msg=k)


def _run_a_and_b(label, flagfile, wa, wb, common):
  """A (1 process x 8 devices) and B (2 processes x 4 devices), independent, side by side. Both log every step
  once; returns their losses, B's output and the wall times."""
  t0 = time.time()
  pa = _start_single(flagfile, wa, common)
  pb = _start_two(flagfile, wb, common)
  _, wall_a = _finish(f"{label}A (1 process x 8 devices)", pa, t0)
  out_b, wall_b = _finish(f"{label}B (2 processes x 4 devices)", pb, t0)
  la, lb = _losses(wa), _losses(wb)
  assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
  return la, lb, out_b, wall_a, wall_b


def _assert_one_writer(wb, out_b):
  """Only process 0 writes the TensorBoard file and the progress lines."""
  assert len([f for f in os.listdir(wb) if f.startswith("events.out.tfevents")]) == 1
  assert not [l for l in out_b.splitlines() if l.startswith("[proc 1]") and "| loss" in l]


def _compare_params(ref, workdir, atol) -> float:
  """The final params in `workdir` against `ref` (A's): close within atol; returns the max |diff|."""
  got = _params(workdir, STEPS)
  diff = _max_param_diff(ref, got)
  _assert_params_close(ref, got, atol=atol)
  return diff


def _resume_c(label, flagfile, wb, wc, common, la, pa4, tol):
  """C: B's step-2 checkpoint (saved by 2 processes on data=8) restored by 2 processes onto
  data=2,fsdp=2,tensor=2; it runs steps 3-4 only, and their losses (relative to max(1, |loss|)) and the final
  params match A's (`la`, `pa4`) within `tol`. Returns C's losses, the max |param diff| and the wall time."""
  os.makedirs(os.path.join(wc, "checkpoints"))
  shutil.copytree(os.path.join(wb, "checkpoints", "2"), os.path.join(wc, "checkpoints", "2"))
  t0 = time.time()
  pc = _start_two(flagfile, wc, common + ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"])
  out_c, wall_c = _finish(f"{label}C (2 processes, resumed on data=2,fsdp=2,tensor=2)", pc, t0)
  assert "resumed at step 2" in out_c
  lc = _losses(wc)
  assert sorted(lc) == [3, 4], lc
  for s in (3, 4):
    assert abs(lc[s] - la[s]) <= tol * max(1.0, abs(la[s])), (s, la[s], lc[s])
  diff_ac = _compare_params(pa4, wc, atol=tol)
  return lc, diff_ac, wall_c


def _report(label, losses, diff_ab, diff_ac, walls, t_all):
  la, lb, lc = losses
  wall_a, wall_b, wall_c = walls
  print(
    f"[test_multihost] {label}losses A={la} B={lb} C={lc}; max |param| diff A-B {diff_ab:.2e}, A-C {diff_ac:.2e}; "
    f"wall A {wall_a:.0f}s, A||B {wall_b:.0f}s, C {wall_c:.0f}s, total {time.time() - t_all:.0f}s",
    flush=True,
  )


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_another_mesh(tmp_path):
  from pipo_jax.data import synthetic

  data = synthetic.write_dataset(str(tmp_path / "data"), n_train=256, n_test=8, seed=0)
  flagfile = tmp_path / "run.flags"
  flagfile.write_text(FLAGS)
  common = [f"--config.data.train_path={data['train']}", f"--config.data.tokenizer_path={data['tokenizer']}"]
  wa, wb, wc = (str(tmp_path / n) for n in ("a", "b", "c"))

  t_all = time.time()
  la, lb, out_b, wall_a, wall_b = _run_a_and_b("", flagfile, wa, wb, common)
  for s in la:  # fp32 rounding: gloo adds the shards' loss partials in another order than one process does
    assert abs(la[s] - lb[s]) <= 1e-6 * max(1.0, abs(la[s])), (s, la[s], lb[s])
  assert la[STEPS] < la[1]  # it trains

  # Only process 0 writes logs and metrics; each process saves its own data-iterator state.
  _assert_one_writer(wb, out_b)
  assert [l for l in out_b.splitlines() if l.startswith("[proc 0]") and "| loss" in l]
  assert sorted(os.listdir(os.path.join(wb, "checkpoints", str(STEPS), "data"))) == [
    "commit_success.txt",
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]

  pa4 = _params(wa, STEPS)
  diff_ab = _compare_params(pa4, wb, atol=1e-6)

  lc, diff_ac, wall_c = _resume_c("", flagfile, wb, wc, common, la, pa4, tol=1e-5)
  _report("", (la, lb, lc), diff_ab, diff_ac, (wall_a, wall_b, wall_c), t_all)


OPD_FLAGS = f"""\
--config.mode=opd
--config.mesh.data=-1
--config.data.batch_size=8
--config.opd.divergence=topk
--config.opd.topk=16
--config.opd.prompt_length=64
--config.opd.max_new_tokens=16
--config.opd.conf_threshold=0.5
--config.opd.sampling.temperature=1.0
--config.opd.sampling.top_k=0
--config.opd.sampling.top_p=1.0
--config.opd.sampling.presence_penalty=0.0
--config.lora.rank=8
--config.lora.alpha=16
--config.lora.dropout=0.0
--config.train.trainable=compressor,confidence_head,mtp/fc,mtp/pre_fc_norm_embedding,mtp/pre_fc_norm_hidden,mtp/norm
--config.train.num_steps={STEPS}
--config.train.log_every=1
--config.optim.grad_accum_steps=2
--config.optim.learning_rate=3e-3
--config.optim.warmup_ratio=0.25
--config.optim.weight_decay=0.0
--config.loss.logits_chunk=64
--config.checkpoint.every_steps=2
--config.checkpoint.keep=5
"""


@pytest.mark.slow
def test_opd_two_processes_match_one_and_resume_on_another_mesh(tmp_path):
  """The tiny OPD recipe (LoRA student, topk divergence, 2 accumulated rollout micro-batches of 8 prompts per
  step) run as A 1 process x 8 devices, B 2 processes x 4 devices (each process rolls out its own 4 rows of
  every prompt batch), C 2 processes resumed from B's step 2 on data=2,fsdp=2,tensor=2. Same prompts, same
  seeds: B's losses equal A's within 1e-5 and its params are close; C continues where B stopped."""
  from pipo_jax.data import synthetic

  data = synthetic.write_dataset(str(tmp_path / "data"), n_train=64, n_test=8, n_opd=64, seed=0)
  # Teacher (and the student's starting point): a random tiny Qwen3.5 with its MTP head, written as an HF
  # directory (the student's PIPO heads are initialised from it as in training).
  import jax

  from pipo_jax.config import ModelConfig, resolve_model_config
  from pipo_jax.io import hf_pipo
  from pipo_jax.models.pipo import init_pipo_params

  mc = resolve_model_config(ModelConfig(preset="tiny"))
  params = init_pipo_params(mc, jax.random.PRNGKey(0))
  teacher = str(tmp_path / "teacher")
  hf_pipo.export_hf({k: params[k] for k in ("backbone", "mtp")}, mc, teacher, tokenizer_dir=data["tokenizer"])

  flagfile = tmp_path / "opd.flags"
  flagfile.write_text(OPD_FLAGS)
  common = [
    f"--config.data.train_path={data['opd']}",
    f"--config.data.tokenizer_path={data['tokenizer']}",
    f"--config.checkpoint.init_from={teacher}",
    f"--config.opd.teacher_checkpoint={teacher}",
  ]
  wa, wb, wc = (str(tmp_path / n) for n in ("a", "b", "c"))
  t_all = time.time()
  la, lb, out_b, wall_a, wall_b = _run_a_and_b("OPD ", flagfile, wa, wb, common)
  for s in la:
    assert abs(la[s] - lb[s]) <= 1e-5 * max(1.0, abs(la[s])), (s, la[s], lb[s])
  with open(os.path.join(wa, "metrics.jsonl")) as f:
    rec = json.loads(f.readline())
  for k in (
    "time/rollout_s",
    "time/teacher_s",
    "time/train_s",
    "rollout/tokens_per_s",
    "rollout/mean_length",
    "rollout/pad_ratio",
  ):
    assert k in rec and np.isfinite(rec[k]), (k, rec)
  assert 0 < rec["rollout/mean_length"] <= 16 and 0 <= rec["rollout/pad_ratio"] <= 1
  _assert_one_writer(wb, out_b)
  pa4 = _params(wa, STEPS)
  diff_ab = _compare_params(pa4, wb, atol=1e-5)

  lc, diff_ac, wall_c = _resume_c("OPD ", flagfile, wb, wc, common, la, pa4, tol=1e-4)
  _report("OPD ", (la, lb, lc), diff_ab, diff_ac, (wall_a, wall_b, wall_c), t_all)
