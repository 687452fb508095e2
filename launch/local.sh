#!/usr/bin/env bash
# Several cgc_jax processes on ONE machine, each with its own CPU devices, joined by a localhost
# coordinator: the multi-host code path (per-process data, barriers, orbax saves from every process)
# without a cluster.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS MAIN_ARGS...
#   launch/local.sh 2 2 --config=configs/demo.py --workdir=runs/demo_2x2
#
# Output lines are prefixed with the process id. If any process fails, the others are stopped and
# the script exits with the first failure's code.
set -euo pipefail

usage() { echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config=... --workdir=... [MAIN_ARGS...]" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
NUM_PROCESSES=$1; DEVICES_PER_PROCESS=$2; shift 2
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || { echo "$0: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2; usage; }
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || { echo "$0: DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES_PER_PROCESS'" >&2; usage; }
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || { echo "$0: $PYTHON not found (set PYTHON=...)" >&2; exit 2; }
cd "$(dirname "$0")/.."

PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
echo "local.sh: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator 127.0.0.1:$PORT" >&2

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'cleanup; exit 143' TERM INT

for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NUM_PROCESSES" JAX_PROCESS_ID="$i" \
    "$PYTHON" -u -m cgc_jax.main "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=("$!")
done

status=0
for ((n = 0; n < NUM_PROCESSES; n++)); do
  set +e; wait -n "${pids[@]}"; rc=$?; set -e
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local.sh: a process exited with code $rc; stopping the others" >&2
    cleanup
  fi
done
exit "$status"
