"""Launchers: help, argument checks, the exact gcloud / sbatch commands, and real local multi-process runs.

Nothing here reaches a cloud: tpu_pod.sh and gpu_slurm.sh are checked through --dry-run, and the commands they
print are then executed locally against stub `srun` / `scontrol` / `sbatch` and a stub trainer module.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
JAX_VERSION = re.search(r"^jax==(\S+)", open(os.path.join(REPO, "requirements.txt")).read(), re.M).group(1)

# A stand-in for pipo_jax.train: prints its environment contract and argv as one JSON line.
STUB = textwrap.dedent("""
    import json, os, sys, time
    keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS", "XLA_FLAGS",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION", "SLURM_LOCALID"]
    print("STUB " + json.dumps({"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:]}), flush=True)
    if "--fail-rank1" in sys.argv:
      if os.environ["JAX_PROCESS_ID"] == "1":
        sys.exit(3)
      time.sleep(60)  # rank 0 would block forever in a collective; the launcher must stop it
    if "--jax" in sys.argv:
      import jax, jax.numpy as jnp
      from jax.experimental import multihost_utils
      jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                 int(os.environ["JAX_PROCESS_ID"]))
      total = multihost_utils.process_allgather(jnp.array([jax.process_index() + 1.0])).sum()
      print("JAX " + json.dumps([jax.process_count(), jax.device_count(), jax.local_device_count(), float(total)]),
            flush=True)
""")


def _run(args, env=None, timeout=60, cwd=REPO):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture
def stub_dir(tmp_path):
  (tmp_path / "stub_train.py").write_text(STUB)
  (tmp_path / "run.flags").write_text("--config.train.steps=1\n")
  return tmp_path


def _stub_records(stdout, tag="STUB"):
  """The JSON value after each `TAG ` line start. Only the leading value is decoded: the launcher merges the
  processes' stdout and stderr, and native libraries (gloo) can write their own text onto the same line."""
  out = []
  for line in stdout.splitlines():
    m = re.match(rf"^(\[proc (\d+)\] |\d+: )?{tag} (.*)$", line)
    if m:
      out.append(json.JSONDecoder().raw_decode(m.group(3))[0])
  return out


@pytest.mark.parametrize(
  "script,words",
  [
    (
      "local_multiprocess.sh",
      [
        "NUM_PROCESSES",
        "FLAGFILE",
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "gloo",
        "PIPO_LAUNCH_MODULE",
      ],
    ),
    (
      "tpu_pod.sh",
      [
        "--project",
        "--zone",
        "--accelerator-type",
        "--name",
        "--flagfile",
        "--runtime-version",
        "--dry-run",
        "jax.distributed.initialize()",
        "--workdir",
        "gs://",
        "PREEMPTED",
        "SIGTERM",
      ],
    ),
    (
      "gpu_slurm.sh",
      [
        "--nodes",
        "--gpus-per-node",
        "--flagfile",
        "--per-node",
        "--dry-run",
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_PROCID",
        "--signal-lead",
        "--signal=TERM@",
      ],
    ),
  ],
)
def test_help(script, words):
  r = _run([os.path.join(LAUNCH, script), "--help"])
  assert r.returncode == 0, r.stderr
  for w in words:
    assert w in r.stdout, (script, w)
  assert "set -euo" not in r.stdout  # only the header comment is printed


@pytest.mark.parametrize(
  "script,args,message",
  [
    ("local_multiprocess.sh", [], "need NUM_PROCESSES and FLAGFILE"),
    ("local_multiprocess.sh", ["3", "x.flags"], "must divide"),
    ("local_multiprocess.sh", ["2", "no/such.flags"], "does not exist"),
    ("tpu_pod.sh", ["--zone=z"], "missing required argument(s): --project --accelerator-type --name --flagfile"),
    ("tpu_pod.sh", ["--project=p", "--bogus"], "unknown argument '--bogus'"),
    ("gpu_slurm.sh", ["--nodes=2"], "missing required argument(s): --gpus-per-node --flagfile"),
    ("gpu_slurm.sh", ["--nodes=two", "--gpus-per-node=8", "--flagfile=requirements.txt"], "positive integer"),
    (
      "gpu_slurm.sh",
      ["--nodes=1", "--gpus-per-node=8", "--flagfile=requirements.txt", "--signal-lead=soon"],
      "--signal-lead must be a number of seconds",
    ),
  ],
)
def test_bad_arguments_refused(script, args, message):
  r = _run([os.path.join(LAUNCH, script)] + args)
  assert r.returncode != 0
  assert message in r.stderr


def _dry_run_commands(stdout):
  return [shlex.split(l) for l in stdout.splitlines() if l.strip() and not l.startswith("#")]


def test_tpu_pod_dry_run_commands(stub_dir):
  flags = str(stub_dir / "run.flags")
  r = _run(
    [
      os.path.join(LAUNCH, "tpu_pod.sh"),
      "--project=my-proj",
      "--zone",
      "us-central2-b",
      "--accelerator-type=v4-32",
      "--name=pipo-a",
      f"--flagfile={flags}",
      "--dry-run",
      "--workdir=gs://bucket/run",
      "--config.train.lr=3e-4",
      "--",
      "--extra",
      "two words",
    ]
  )
  assert r.returncode == 0, r.stderr
  cmds = _dry_run_commands(r.stdout)
  loc = ["--project=my-proj", "--zone=us-central2-b"]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert cmds[0] == tpu + ["describe", "pipo-a"] + loc + ["--format=value(state)"]
  assert cmds[1] == tpu + ["create", "pipo-a"] + loc + ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  assert cmds[2][:2] == ["bash", "-c"] and "ls-files" in cmds[2][2]
  tarball = shlex.split(cmds[2][2].split("|")[1])[2]
  # The packing pipeline ships tracked files (and non-ignored new ones), never git-ignored ones like runs/.
  pack = cmds[2][2].replace(tarball, str(stub_dir / "code.tgz"))
  assert _run(["bash", "-c", pack]).returncode == 0
  listed = subprocess.run(["tar", "-tzf", str(stub_dir / "code.tgz")], capture_output=True, text=True).stdout.split()
  assert "launch/tpu_pod.sh" in listed and "pipo_jax/evaluation/grading.py" in listed
  assert not any(p.startswith(("runs/", ".git/")) or "__pycache__" in p for p in listed)
  assert cmds[3] == tpu + ["scp", tarball, "pipo-a:pipo_jax.tgz", "--worker=all"] + loc
  assert cmds[4] == tpu + ["scp", flags, "pipo-a:pipo_run.flags", "--worker=all"] + loc  # flagfile outside repo
  assert cmds[5][:9] == tpu + ["ssh", "pipo-a", "--worker=all"] + loc
  assert f"'jax[tpu]=={JAX_VERSION}'" in cmds[5][9] and "-r requirements.txt" in cmds[5][9]
  assert cmds[6][:9] == tpu + ["ssh", "pipo-a", "--worker=all"] + loc
  assert cmds[7][:9] == tpu + ["ssh", "pipo-a", "--worker=0"] + loc
  assert len(cmds) == 8

  # Run the two remote commands (start on a worker, follow worker 0) here, with HOME as the worker's home and a
  # stub pipo_jax.train in ~/pipo_jax: the trainer must get exactly our argv, and its exit code must come back.
  home = stub_dir / "home"
  pkg = home / "pipo_jax" / "pipo_jax"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "train.py").write_text("import sys, json; print('ARGV ' + json.dumps(sys.argv[1:])); sys.exit(7)\n")
  start = cmds[6][9].removeprefix("--command=")
  follow = cmds[7][9].removeprefix("--command=")
  env = {"HOME": str(home), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  assert _run(["bash", "-c", start], env=env).returncode == 0
  r = _run(["bash", "-c", follow], env=env)
  assert r.returncode == 7
  argv = json.loads(r.stdout.split("ARGV ", 1)[1].splitlines()[0])
  assert argv == [
    f"--flagfile={home}/pipo_run.flags",
    "--config.train.lr=3e-4",
    "--extra",
    "two words",
    "--config.workdir=gs://bucket/run",
  ]


@pytest.mark.parametrize(
  "args,flagfile_text,message",
  [
    ([], "--config.workdir=runs/x\n", "workdir 'runs/x' is relative"),
    ([], "--config.mode=sft\n", "workdir 'runs/default' is relative"),  # the Config default
    (["--config.workdir=rel/dir"], "--config.workdir=gs://b/r\n", "workdir 'rel/dir' is relative"),
    ([], "--config.workdir=gs://YOUR_BUCKET/pipo_runs/x\n", "the recipe's placeholder"),
  ],
)
def test_tpu_pod_refuses_workdir_no_worker_shares(tmp_path, args, flagfile_text, message):
  flags = tmp_path / "run.flags"
  flags.write_text(flagfile_text)
  r = _run(
    [
      os.path.join(LAUNCH, "tpu_pod.sh"),
      "--project=p",
      "--zone=z",
      "--accelerator-type=v4-32",
      "--name=n",
      f"--flagfile={flags}",
      "--dry-run",
    ]
    + args
  )
  assert r.returncode == 2 and message in r.stderr and r.stdout == ""
  ok = _run(
    [
      os.path.join(LAUNCH, "tpu_pod.sh"),
      "--project=p",
      "--zone=z",
      "--accelerator-type=v4-32",
      "--name=n",
      f"--flagfile={flags}",
      "--dry-run",
      "--workdir=/mnt/shared/run",
    ]
  )
  assert ok.returncode == 0, ok.stderr


def test_tpu_pod_flagfile_in_repo_and_options():
  r = _run(
    [
      os.path.join(LAUNCH, "tpu_pod.sh"),
      "--project=p",
      "--zone=z",
      "--accelerator-type=v5litepod-16",
      "--name=n",
      "--flagfile=requirements.txt",
      "--runtime-version=v2-alpha-tpuv5-lite",
      "--spot",
      "--skip-install",
      "--dry-run",
      "--config.workdir=gs://b/run",
    ]
  )
  assert r.returncode == 0, r.stderr
  cmds = _dry_run_commands(r.stdout)
  assert cmds[1][-3:] == ["--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert not any(
    c[4] == "scp" and "pipo_run.flags" in c[6] for c in cmds if c[0] == "gcloud" and len(c) > 6
  )  # travels in the tarball
  setup = next(c[-1] for c in cmds if c[0] == "gcloud" and c[4] == "ssh" and "tar -xzf" in c[-1])
  assert "pip install" not in setup
  start = next(c[-1] for c in cmds if c[0] == "gcloud" and c[4] == "ssh" and "nohup" in c[-1])
  assert "python3 -m pipo_jax.train --flagfile=requirements.txt" in start


def _fake_slurm_bin(tmp_path, tasks, tasks_per_node):
  """Stub scontrol / srun / sbatch: srun runs its command once per task with SLURM_PROCID / SLURM_LOCALID set."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node7\\ngpu-node8\\n'\n")
  (bin_dir / "srun").write_text(
    textwrap.dedent(f"""\
      #!/usr/bin/env bash
      echo "SRUN_OPTS $*" >&2
      while [[ "$1" == -* ]]; do shift; done
      for ((i = 0; i < {tasks}; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=$((i % {tasks_per_node})) "$@" || exit $?
      done
      """)
  )
  (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 42 ($1)"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  return str(bin_dir)


@pytest.mark.parametrize("per_node", [False, True])
def test_gpu_slurm_script_runs_with_stub_slurm(stub_dir, per_node):
  flags = str(stub_dir / "run.flags")
  args = (
    [
      os.path.join(LAUNCH, "gpu_slurm.sh"),
      "--nodes=2",
      "--gpus-per-node=2",
      f"--flagfile={flags}",
      "--partition=gpu",
      "--account=acc",
      "--time=01:00:00",
      "--job-name=t",
      f"--log-dir={stub_dir}/logs",
      "--dry-run",
    ]
    + (["--per-node"] if per_node else [])
    + ["--config.a=1", "--", "two words"]
  )
  r = _run(args)
  assert r.returncode == 0, r.stderr
  sbatch = [l for l in r.stdout.splitlines() if l.startswith("#SBATCH")]
  tasks_per_node = 1 if per_node else 2
  assert sbatch == [
    "#SBATCH --job-name=t",
    "#SBATCH --nodes=2",
    f"#SBATCH --ntasks-per-node={tasks_per_node}",
    "#SBATCH --gpus-per-node=2",
    "#SBATCH --time=01:00:00",
    f"#SBATCH --output={stub_dir}/logs/%x-%j.out",
    "#SBATCH --signal=TERM@120",
    "#SBATCH --partition=gpu",
    "#SBATCH --account=acc",
  ]
  assert r.stdout.splitlines()[-1] == f"sbatch {stub_dir}/logs/t.sbatch"

  # Execute the generated job script as SLURM would, with stub srun/scontrol and a stub trainer.
  script = r.stdout.split("# submit:")[0].split("\n", 1)[1]
  tasks = 2 * tasks_per_node
  env = {
    "PATH": _fake_slurm_bin(stub_dir, tasks, tasks_per_node) + os.pathsep + os.environ["PATH"],
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "gpu-node[7-8]",
    "SLURM_NTASKS": str(tasks),
    "PIPO_LAUNCH_MODULE": "stub_train",
    "PYTHONPATH": str(stub_dir),
  }
  run = _run(["bash", "-c", script], env=env)
  assert run.returncode == 0, run.stderr
  assert "--kill-on-bad-exit=1" in run.stderr
  recs = _stub_records(run.stdout)
  assert [rec["env"]["JAX_PROCESS_ID"] for rec in recs] == [str(i) for i in range(tasks)]
  for rec in recs:
    assert rec["env"]["JAX_COORDINATOR_ADDRESS"] == f"gpu-node7:{20000 + 1234 % 20000}"
    assert rec["env"]["JAX_NUM_PROCESSES"] == str(tasks)
    assert rec["argv"] == [f"--flagfile={flags}", "--config.a=1", "two words"]
  # Per node, jax.distributed must not see SLURM_LOCALID (it would pin the process to GPU 0).
  assert [rec["env"]["SLURM_LOCALID"] for rec in recs] == ([None, None] if per_node else ["0", "1", "0", "1"])


def test_gpu_slurm_submits(stub_dir):
  flags = str(stub_dir / "run.flags")
  env = {"PATH": _fake_slurm_bin(stub_dir, 1, 1) + os.pathsep + os.environ["PATH"]}
  r = _run(
    [
      os.path.join(LAUNCH, "gpu_slurm.sh"),
      "--nodes=1",
      "--gpus-per-node=8",
      f"--flagfile={flags}",
      f"--log-dir={stub_dir}/logs",
      "--port=12345",
    ],
    env=env,
  )
  assert r.returncode == 0, r.stderr
  path = stub_dir / "logs" / "pipo.sbatch"
  assert r.stdout.strip() == f"Submitted batch job 42 ({path})"
  assert 'export JAX_COORDINATOR_ADDRESS="$head_node:12345"' in path.read_text()


def test_local_multiprocess_env_contract(stub_dir):
  env = {
    "PIPO_LAUNCH_MODULE": "stub_train",
    "PYTHONPATH": str(stub_dir),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
  }
  r = _run(
    [os.path.join(LAUNCH, "local_multiprocess.sh"), "2", str(stub_dir / "run.flags"), "--config.a=1", "two words"],
    env=env,
  )
  assert r.returncode == 0, r.stderr
  recs = _stub_records(r.stdout)
  assert sorted(rec["env"]["JAX_PROCESS_ID"] for rec in recs) == ["0", "1"]
  addrs = {rec["env"]["JAX_COORDINATOR_ADDRESS"] for rec in recs}
  assert len(addrs) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", addrs.pop())
  for rec in recs:
    assert rec["env"]["JAX_NUM_PROCESSES"] == "2"
    assert rec["env"]["JAX_PLATFORMS"] == "cpu"
    assert rec["env"]["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert rec["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"  # replaces the inherited 8
    assert rec["argv"] == [f"--flagfile={stub_dir / 'run.flags'}", "--config.a=1", "two words"]
  # Every line is prefixed with its process.
  for line in r.stdout.splitlines():
    assert re.match(r"^\[proc [01]\] ", line), line


def test_local_multiprocess_failure_stops_peers(stub_dir):
  env = {"PIPO_LAUNCH_MODULE": "stub_train", "PYTHONPATH": str(stub_dir)}
  r = _run(
    [os.path.join(LAUNCH, "local_multiprocess.sh"), "2", str(stub_dir / "run.flags"), "--fail-rank1"],
    env=env,
    timeout=30,
  )
  assert r.returncode == 3  # rank 1's code, and rank 0's 60 s sleep was cut short (timeout=30 would raise)
  assert "process 1 exited with 3" in r.stderr


def test_local_multiprocess_real_jax_distributed(stub_dir):
  """Two real JAX CPU processes join through the contract and all-gather over gloo: 8 global devices."""
  env = {"PIPO_LAUNCH_MODULE": "stub_train", "PYTHONPATH": str(stub_dir)}
  r = _run(
    [os.path.join(LAUNCH, "local_multiprocess.sh"), "2", str(stub_dir / "run.flags"), "--jax"], env=env, timeout=120
  )
  assert r.returncode == 0, r.stdout + r.stderr
  # [process_count, device_count, local_device_count, sum over processes of (index + 1)]
  assert _stub_records(r.stdout, tag="JAX") == [[2, 8, 4, 3.0], [2, 8, 4, 3.0]]
