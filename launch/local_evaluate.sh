#!/usr/bin/env bash
# Evaluate a checkpoint with N processes on this machine, each with D CPU devices, joined by
# jax.distributed (gloo): the pod code path of `minvis-jax evaluate --distributed` without a cluster.
# Videos are divided among the processes; process 0 writes OUT/results.json (and metrics.json).
#
#   launch/local_evaluate.sh 2 4 /tmp/eval --checkpoint /tmp/run --manual_dir /tmp/syn
#
# Logs go to OUT/logs/process_<i>.log; the script fails if any process fails. On a TPU pod or under
# SLURM, run `minvis-jax evaluate --distributed ...` on every host instead (like launch/tpu_pod.sh
# and launch/slurm.sbatch do for `train`).
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS OUT [evaluate flags]" >&2
  exit 2
fi
N=$1; DEVICES=$2; OUT=$3; shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$OUT/logs"
pids=()
for ((i = 0; i < N; i++)); do
  # XLA_FLAGS from the caller would override the device count: drop it.
  env -u XLA_FLAGS JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$DEVICES" \
    python -m minvis_jax.cli evaluate --out "$OUT" --distributed \
      --coordinator "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" "$@" \
      > "$OUT/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $OUT/logs/process_$i.log" >&2
    status=1
  fi
done
exit $status
