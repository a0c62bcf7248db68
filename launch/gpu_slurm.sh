#!/usr/bin/env bash
# Submit a multi-node GPU training job to SLURM (writes an sbatch script, then runs sbatch on it).
#
# Usage: launch/gpu_slurm.sh --nodes=N --gpus-per-node=G --flagfile=F [--partition=P] [--account=A]
#                            [--time=HH:MM:SS] [--job-name=J] [--per-node] [--port=PORT] [--setup=CMD]
#                            [--log-dir=DIR] [--signal-lead=SECONDS] [--dry-run] [--config.x=...] [-- ARGS...]
#
#   --nodes          number of nodes                                           (required)
#   --gpus-per-node  GPUs per node                                             (required)
#   --flagfile       trainer flagfile, path as seen from the nodes (shared FS) (required)
#   --partition, --account, --time (default 24:00:00), --job-name (default pipo)   usual sbatch fields
#   --per-node       one process per node driving all its GPUs (default: one process per GPU)
#   --port           coordinator port (default 20000 + SLURM_JOB_ID % 20000, so concurrent jobs differ)
#   --setup          shell command run before srun, whose environment every task inherits,
#                    e.g. "source .venv/bin/activate"
#   --log-dir        where the sbatch script and the job log go (default REPO/runs/slurm, git-ignored)
#   --signal-lead    seconds before the time limit at which SLURM sends SIGTERM to every task (#SBATCH
#                    --signal=TERM@SECONDS, default 120; 0 = none): the trainer then saves its step and exits 0,
#                    so a resubmitted job resumes there. A save holds trainable params + optimizer state only
#                    (checkpoint.save_frozen=auto with init_from), seconds even for 9B.
#   --dry-run        print the sbatch script and the sbatch command instead of submitting
#   --config.x=...   and everything after "--" are passed through to pipo_jax.train
#
# The repository must be on a file system shared by all nodes; the job runs from its root, so a relative
# --config.workdir (the recipes' runs/...) lands on that shared file system too; the trainer checks at start
# that every process sees it. The trainer module
# is ${PIPO_LAUNCH_MODULE:-pipo_jax.train}, read when the job runs (tests substitute a stub).
#
# Env contract (read by pipo_jax/distributed.py: initialize_distributed()), set for every process by srun:
#   JAX_COORDINATOR_ADDRESS=<first node of the job>:PORT
#   JAX_NUM_PROCESSES=$SLURM_NTASKS          (nodes x G per GPU, or nodes with --per-node)
#   JAX_PROCESS_ID=$SLURM_PROCID
# These are what jax.distributed would auto-detect from SLURM too; they are explicit so that the trainer's
# contract is the same on every platform. Local devices:
#   * per GPU (default): jax.distributed sees SLURM_LOCALID and binds process i of a node to its GPU i
#     (local_device_ids=[SLURM_LOCALID]); every task must see all of the node's GPUs (no --gpus-per-task binding).
#   * --per-node: SLURM_LOCALID is removed from the trainer's environment, because jax.distributed would otherwise
#     restrict the single process to GPU 0; the process then drives every visible GPU of its node.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

shquote() {  # one word for a POSIX shell, readably: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

nodes="" gpus="" flagfile="" partition="" account="" time_limit="24:00:00" job_name="pipo"
per_node=0 port="" setup="" log_dir="" dry_run=0 signal_lead=120
extra=()
while [[ $# -gt 0 ]]; do
  arg="$1"
  if [[ "$arg" == --*=* ]]; then key="${arg%%=*}"; val="${arg#*=}"; inline=1; else key="$arg"; val=""; inline=0; fi
  case "$key" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --per-node) per_node=1 ;;
    --nodes|--gpus-per-node|--flagfile|--partition|--account|--time|--job-name|--port|--setup|--log-dir|--signal-lead)
      if [[ $inline == 0 ]]; then
        if [[ $# -lt 2 ]]; then echo "error: $key needs a value" >&2; exit 2; fi
        val="$2"; shift
      fi
      case "$key" in
        --nodes) nodes="$val" ;;
        --gpus-per-node) gpus="$val" ;;
        --flagfile) flagfile="$val" ;;
        --partition) partition="$val" ;;
        --account) account="$val" ;;
        --time) time_limit="$val" ;;
        --job-name) job_name="$val" ;;
        --port) port="$val" ;;
        --setup) setup="$val" ;;
        --log-dir) log_dir="$val" ;;
        --signal-lead) signal_lead="$val" ;;
      esac ;;
    --config.*) extra+=("$arg") ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "error: unknown argument '$arg' (trainer flags go after --); see --help" >&2; exit 2 ;;
  esac
  shift
done

missing=()
[[ -n "$nodes" ]] || missing+=(--nodes)
[[ -n "$gpus" ]] || missing+=(--gpus-per-node)
[[ -n "$flagfile" ]] || missing+=(--flagfile)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: missing required argument(s): ${missing[*]}; see --help" >&2
  exit 2
fi
for pair in "--nodes:$nodes" "--gpus-per-node:$gpus" ${port:+"--port:$port"}; do
  if ! [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: ${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2
    exit 2
  fi
done
if ! [[ "$signal_lead" =~ ^[0-9]+$ ]]; then
  echo "error: --signal-lead must be a number of seconds (0 = none), got '$signal_lead'" >&2
  exit 2
fi
if [[ ! -f "$flagfile" ]]; then
  echo "error: flagfile '$flagfile' does not exist" >&2
  exit 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
# Absolute paths: the job runs from the repo root, sbatch resolves --output from the submission directory.
flagfile="$(cd "$(dirname "$flagfile")" && pwd)/$(basename "$flagfile")"
log_dir="${log_dir:-$repo/runs/slurm}"
[[ "$log_dir" == /* ]] || log_dir="$PWD/$log_dir"
tasks_per_node=$([[ $per_node == 1 ]] && echo 1 || echo "$gpus")
train='python3 -m "${PIPO_LAUNCH_MODULE:-pipo_jax.train}"'" --flagfile=$(shquote "$flagfile")"
for a in "${extra[@]+"${extra[@]}"}"; do train+=" $(shquote "$a")"; done
per_task='export JAX_PROCESS_ID="$SLURM_PROCID"'
[[ $per_node == 1 ]] && per_task+='; unset SLURM_LOCALID'
per_task+="; exec $train"

signal_line=""
# Not "B:TERM": the signal must reach the srun tasks (the trainers), not only the batch shell.
[[ $signal_lead != 0 ]] && signal_line="#SBATCH --signal=TERM@$signal_lead"$'\n'

script="#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --output=$log_dir/%x-%j.out
${signal_line}${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}set -euo pipefail
cd $(shquote "$repo")
${setup:+$setup
}head_node=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1)\"
export JAX_COORDINATOR_ADDRESS=\"\$head_node:${port:-\$((20000 + SLURM_JOB_ID % 20000))}\"
export JAX_NUM_PROCESSES=\"\$SLURM_NTASKS\"
# --kill-on-bad-exit: one failed process ends the step instead of leaving its peers blocked in a collective.
srun --kill-on-bad-exit=1 --label bash -c $(shquote "$per_task")
"

script_path="$log_dir/$job_name.sbatch"
if [[ $dry_run == 1 ]]; then
  echo "# $script_path"
  printf '%s' "$script"
  echo "# submit:"
  echo "sbatch $(shquote "$script_path")"
  exit 0
fi
mkdir -p "$log_dir"
printf '%s' "$script" > "$script_path"
echo "+ sbatch $script_path" >&2
sbatch "$script_path"
