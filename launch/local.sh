#!/usr/bin/env bash
# Train with N processes on this machine, each with D CPU devices, joined by jax.distributed (gloo):
# the multi-host code path (per-process data shards, cross-process collectives, one checkpoint)
# without a cluster.
#
#   launch/local.sh 2 4 configs/tiny.py /tmp/run --set data.manual_dir=/tmp/syn
#
# Logs go to WORKDIR/logs/process_<i>.log; the script fails if any process fails.
set -uo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [extra train flags]" >&2
  exit 2
fi
N=$1; DEVICES=$2; CONFIG=$3; WORKDIR=$4; shift 4
PORT=${PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$WORKDIR/logs"
pids=()
for ((i = 0; i < N; i++)); do
  # XLA_FLAGS from the caller would override the device count: drop it.
  env -u XLA_FLAGS JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$DEVICES" \
    python -m minvis_jax.cli train --config "$CONFIG" --workdir "$WORKDIR" --distributed \
      --coordinator "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" "$@" \
      > "$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $WORKDIR/logs/process_$i.log" >&2
    status=1
  fi
done
exit $status
