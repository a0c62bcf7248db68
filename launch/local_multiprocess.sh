#!/usr/bin/env bash
# Run N cooperating JAX CPU processes on this machine, as if they were the hosts of a pod.
#
# Usage: launch/local_multiprocess.sh NUM_PROCESSES FLAGFILE [--config.x=... ...]
#
# Env contract (read by pipo_jax/distributed.py: initialize_distributed()), set per process:
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  a free loopback port picked here; process 0 hosts the coordinator
#   JAX_NUM_PROCESSES=N
#   JAX_PROCESS_ID=0..N-1
#   JAX_PLATFORMS=cpu
#   XLA_FLAGS=--xla_force_host_platform_device_count=8/N  (8 devices in total, like the test suite)
#   JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo                (cross-process collectives on CPU)
# Every process runs `python -m ${PIPO_LAUNCH_MODULE:-pipo_jax.train} --flagfile=FLAGFILE [extra args]`
# from the repository root, with $PYTHON (default python3); PIPO_LAUNCH_MODULE exists so tests can launch a stub
# instead of the trainer. Relative paths in extra args are read from the repository root.
# Output lines are prefixed with "[proc I] ". The script waits for all processes; if one fails, the others are
# stopped (a peer blocked in a collective would otherwise wait forever) and the first failing exit code is returned.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
  usage
  exit 0
fi
if [[ $# -lt 2 ]]; then
  echo "error: need NUM_PROCESSES and FLAGFILE (got $# argument(s)); see --help" >&2
  exit 2
fi
num="$1"; flagfile="$2"; shift 2
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]] || (( 8 % num != 0 )); then
  echo "error: NUM_PROCESSES must divide the 8 fake CPU devices (1, 2, 4 or 8), got '$num'" >&2
  exit 2
fi
if [[ ! -f "$flagfile" ]]; then
  echo "error: FLAGFILE '$flagfile' does not exist" >&2
  exit 2
fi
flagfile="$(cd "$(dirname "$flagfile")" && pwd)/$(basename "$flagfile")"
module="${PIPO_LAUNCH_MODULE:-pipo_jax.train}"
python="${PYTHON:-python3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
# Our device count replaces any inherited one (e.g. the test suite's 8), keeping the caller's other XLA flags.
xla_flags="$(sed 's/--xla_force_host_platform_device_count=[0-9]*//g; s/  */ /g; s/^ //; s/ $//' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$((8 / num))"

# Ask the kernel for a free loopback port (bind to port 0). A tiny race with other programs remains; the
# coordinator then fails to bind and the run fails loudly rather than silently joining someone else's job.
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

tmp="$(mktemp -d)"
pids=()
stop_running() {  # only our own processes that have not finished yet
  local j
  for ((j = 0; j < ${#pids[@]}; j++)); do
    [[ -s "$tmp/rc.$j" ]] || kill -TERM "${pids[$j]}" 2>/dev/null || true
  done
}
cleanup() {
  stop_running
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$repo"
for ((i = 0; i < num; i++)); do
  # The braces run in a subshell feeding sed; python's pid goes to a file so that we can stop exactly that
  # process on failure, and its exit code to another so that the pipeline's sed does not mask it.
  {
    env JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num" JAX_PROCESS_ID="$i" \
        JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
        XLA_FLAGS="$xla_flags" \
        PYTHONUNBUFFERED=1 \
        "$python" -m "$module" --flagfile="$flagfile" "$@" 2>&1 &
    echo $! > "$tmp/pid.$i"
    rc=0; wait $! || rc=$?
    echo "$rc" > "$tmp/rc.$i"
  } | sed -u "s/^/[proc $i] /" &
done
for ((i = 0; i < num; i++)); do
  while [[ ! -s "$tmp/pid.$i" ]]; do sleep 0.05; done
  pids+=("$(cat "$tmp/pid.$i")")
done

status=0
while :; do
  done_count=0
  for ((i = 0; i < num; i++)); do
    [[ -s "$tmp/rc.$i" ]] || continue
    done_count=$((done_count + 1))
    rc="$(cat "$tmp/rc.$i")"
    if [[ "$rc" != 0 && "$status" == 0 ]]; then
      status="$rc"
      echo "[launcher] process $i exited with $rc; stopping the others" >&2
      stop_running
    fi
  done
  (( done_count == num )) && break
  sleep 0.1
done
wait  # the sed pipelines, so that every prefixed line is flushed before we return
exit "$status"
