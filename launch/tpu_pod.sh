#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or multi-host pod) with gcloud.
#
# Usage: launch/tpu_pod.sh --project=P --zone=Z --accelerator-type=T --name=N --flagfile=F [--workdir=gs://B/run]
#                          [--runtime-version=V] [--spot] [--skip-install] [--dry-run] [--config.x=...] [-- ARGS...]
#
#   --project            GCP project id                                     (required)
#   --zone               TPU zone, e.g. us-central2-b                       (required)
#   --accelerator-type   slice type, e.g. v4-32, v5litepod-16, v6e-64       (required)
#   --name               TPU VM name; reused when it already exists         (required)
#   --flagfile           trainer flagfile, e.g. experiments/x.flags         (required; outside the repo it is
#                        copied to the workers as ~/pipo_run.flags)
#   --workdir            where checkpoints and metrics go: gs://BUCKET/path (or a mount every worker shares);
#                        passed as --config.workdir. Default: the flagfile's (or --config.workdir=) value, which
#                        must then be such a location: a relative path would land on each worker's own disk
#                        (~/pipo_jax/...), where no host can restore the whole checkpoint and a preempted Spot VM
#                        takes it away, so it is refused here (the trainer also proves at start that every
#                        worker sees the workdir).
#   --runtime-version    TPU VM image (default tpu-ubuntu2204-base; v5e/v6e want v2-alpha-tpuv5-lite / v2-alpha-tpuv6e)
#   --spot               create the slice as Spot capacity
#   --skip-install       do not reinstall dependencies (reused slice that already has them)
#   --dry-run            print the gcloud commands instead of running them
#   --config.x=...       and everything after "--" are passed through to pipo_jax.train
#
# Steps: describe the slice, create it if missing; tar the working tree (git-ignored files excluded) and scp it
# to every worker;
# unpack into ~/pipo_jax and pip-install requirements.txt plus jax[tpu] at the pinned jax version on every worker;
# start `python3 -m pipo_jax.train --flagfile=F ARGS` on every worker in the background (log ~/pipo_train.log);
# stream worker 0's log until its trainer exits, and exit with worker 0's exit code.
#
# Preemption (Spot reclaim, maintenance): the workers' trainers get SIGTERM (Spot: ~30 s ahead) or JAX's
# preemption notice (maintenance events, via jax.distributed's preemption sync point); either way every process
# stops after its current step, saves it (trainable params + optimizer state + data position: seconds, the
# frozen base is rebuilt from init_from on resume) and exits 0. The slice is then gone or PREEMPTED: run the
# same command again; a PREEMPTED/TERMINATED slice is deleted and recreated, and the trainer resumes from the
# workdir's newest readable checkpoint. This script does not watch for preemption itself (it follows worker 0).
#
# Env contract: none is set. On a TPU VM, pipo_jax/distributed.py's initialize_distributed() finds no
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and calls jax.distributed.initialize() without
# arguments, which reads the coordinator, process count and process id from the TPU metadata server.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# Quote one word for a POSIX shell, readably: bare when safe, else in single quotes.
shquote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

project="" zone="" accel="" name="" flagfile="" runtime="tpu-ubuntu2204-base" workdir=""
spot=0 skip_install=0 dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  arg="$1"
  if [[ "$arg" == --*=* ]]; then key="${arg%%=*}"; val="${arg#*=}"; inline=1; else key="$arg"; val=""; inline=0; fi
  case "$key" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --skip-install) skip_install=1 ;;
    --project|--zone|--accelerator-type|--name|--flagfile|--runtime-version|--workdir)
      if [[ $inline == 0 ]]; then
        if [[ $# -lt 2 ]]; then echo "error: $key needs a value" >&2; exit 2; fi
        val="$2"; shift
      fi
      case "$key" in
        --project) project="$val" ;;
        --zone) zone="$val" ;;
        --accelerator-type) accel="$val" ;;
        --name) name="$val" ;;
        --flagfile) flagfile="$val" ;;
        --runtime-version) runtime="$val" ;;
        --workdir) workdir="$val" ;;
      esac ;;
    --config.*) extra+=("$arg") ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "error: unknown argument '$arg' (trainer flags go after --); see --help" >&2; exit 2 ;;
  esac
  shift
done

missing=()
[[ -n "$project" ]] || missing+=(--project)
[[ -n "$zone" ]] || missing+=(--zone)
[[ -n "$accel" ]] || missing+=(--accelerator-type)
[[ -n "$name" ]] || missing+=(--name)
[[ -n "$flagfile" ]] || missing+=(--flagfile)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: missing required argument(s): ${missing[*]}; see --help" >&2
  exit 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ ! -f "$flagfile" ]]; then
  echo "error: flagfile '$flagfile' does not exist" >&2
  exit 2
fi
flag_abs="$(cd "$(dirname "$flagfile")" && pwd)/$(basename "$flagfile")"

# The workdir every worker writes to: --workdir, else the last --config.workdir= given, else the flagfile's.
effective="$workdir"
if [[ -z "$effective" ]]; then
  for a in "${extra[@]+"${extra[@]}"}"; do [[ "$a" == --config.workdir=* ]] && effective="${a#--config.workdir=}"; done
fi
if [[ -z "$effective" ]]; then
  effective="$(sed -n 's/^[[:space:]]*--config\.workdir=\(.*\)$/\1/p' "$flag_abs" | tail -n 1)"
fi
effective="${effective:-runs/default}"
if [[ "$effective" != *://* && "$effective" != /* ]]; then
  echo "error: workdir '$effective' is relative: on a TPU slice each worker would write it to its own disk." \
       "Give --workdir=gs://BUCKET/path (or an absolute path on a mount every worker shares)" >&2
  exit 2
fi
if [[ "$effective" == *YOUR_BUCKET* ]]; then
  echo "error: workdir '$effective' is the recipe's placeholder: give --workdir=gs://<your bucket>/path" >&2
  exit 2
fi
[[ -n "$workdir" ]] && extra+=("--config.workdir=$workdir")
# A flagfile inside the repo travels with the tarball (and may include sibling flagfiles by relative path);
# one from elsewhere is copied next to the checkout as ~/pipo_run.flags.
if [[ "$flag_abs" == "$repo"/* ]]; then
  flag_remote="$(shquote "${flag_abs#"$repo"/}")"
  copy_flagfile=0
else
  flag_remote='$HOME/pipo_run.flags'
  copy_flagfile=1
fi
jax_version="$(sed -n 's/^jax==\([^ ]*\).*/\1/p' "$repo/requirements.txt" | head -n 1)"
jax_version="${jax_version:?requirements.txt pins no jax== version}"

common=(--project="$project" --zone="$zone")
tarball="${TMPDIR:-/tmp}/pipo_jax_${name}.tgz"

run() {  # print (dry run) or execute one command
  if [[ $dry_run == 1 ]]; then
    local a out=""
    for a in "$@"; do out+="$(shquote "$a") "; done
    echo "${out% }"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

# 1. Create the slice unless it exists.
describe=(gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format=value\(state\))
create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accel" --version="$runtime")
[[ $spot == 1 ]] && create+=(--spot)
delete=(gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet)
if [[ $dry_run == 1 ]]; then
  run "${describe[@]}"
  echo "# only when describe fails (no such TPU VM):"
  run "${create[@]}"
  echo "# when describe says PREEMPTED or TERMINATED (a reclaimed Spot slice), first: $(run "${delete[@]}")"
elif state="$("${describe[@]}" 2>/dev/null)"; then
  if [[ "$state" == PREEMPTED || "$state" == TERMINATED ]]; then
    echo "TPU VM $name is $state: deleting and recreating it (the run resumes from its workdir)" >&2
    run "${delete[@]}"
    run "${create[@]}"
  else
    echo "reusing TPU VM $name (state: $state)" >&2
  fi
else
  run "${create[@]}"
fi

# 2. Sync the code: a tarball of the working tree as git sees it (tracked files plus untracked ones that are not
#    git-ignored, uncommitted edits included), so that runs/, checkpoints and caches never travel.
pack="git -C $(shquote "$repo") ls-files -z --cached --others --exclude-standard"
pack+=" | tar -czf $(shquote "$tarball") -C $(shquote "$repo") --null --ignore-failed-read -T -"
run bash -c "$pack"
run gcloud compute tpus tpu-vm scp "$tarball" "$name":pipo_jax.tgz --worker=all "${common[@]}"
if [[ $copy_flagfile == 1 ]]; then
  run gcloud compute tpus tpu-vm scp "$flag_abs" "$name":pipo_run.flags --worker=all "${common[@]}"
fi

# 3. Unpack and install on every worker. jax[tpu] is pinned to requirements.txt's jax so libtpu matches.
setup="mkdir -p ~/pipo_jax && tar -xzf ~/pipo_jax.tgz -C ~/pipo_jax"
if [[ $skip_install == 0 ]]; then
  setup+=" && cd ~/pipo_jax && python3 -m pip install -q -r requirements.txt 'jax[tpu]==$jax_version'"
  setup+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command="$setup"

# 4. Start the trainer on every worker, detached, so that an ssh drop does not kill the job.
train="python3 -m pipo_jax.train --flagfile=$flag_remote"
for a in "${extra[@]+"${extra[@]}"}"; do train+=" $(shquote "$a")"; done
inner="$train; echo \$? > ~/pipo_train.rc"
start="cd ~/pipo_jax && rm -f ~/pipo_train.rc && { nohup bash -c $(shquote "$inner") > ~/pipo_train.log 2>&1 < /dev/null & echo \$! > ~/pipo_train.pid; }"
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command="$start"

# 5. Follow worker 0 until its trainer exits; return its exit code.
follow='tail -n +1 -F --pid="$(cat ~/pipo_train.pid)" ~/pipo_train.log; exit "$(cat ~/pipo_train.rc 2>/dev/null || echo 1)"'
run gcloud compute tpus tpu-vm ssh "$name" --worker=0 "${common[@]}" --command="$follow"
