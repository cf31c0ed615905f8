#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice. Every worker runs the same command; jax.distributed finds the
# pod's coordinator by itself and each host reads only its own shard of the data.
#
#   launch/tpu_pod.sh my-v5e-16 us-west4-a minvis:backbone=r50,pod=v5e-16 gs://bucket/run1 \
#       --set data.manual_dir=gs://bucket/ytvis_2019
#
# A config's pod=NAME applies that slice's plan from configs/common.py (POD_PLANS: mesh size,
# accumulation, rematerialisation, FSDP; the recipe's global batch kept); the slice is checked to
# be that pod before anything is copied.
#
# The workers share no disk: WORKDIR and the dataset live in Cloud Storage (gs://, the gcs extra
# installed below), so checkpoints survive preemption and rerunning the command resumes.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [extra train flags]" >&2
  exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_DIR='~/minvis-jax'

# 0. A pod plan is for one slice shape: refuse another (v5e slices are named v5litepod-N).
if [[ "$CONFIG" =~ pod=([^,]+) ]]; then
  POD=${BASH_REMATCH[1]}
  case "$POD" in
    v5e-*) WANT="v5litepod-${POD#v5e-}" ;;
    *) WANT="$POD" ;;
  esac
  HAVE=$(gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" --format='value(acceleratorType)')
  if [ "$HAVE" != "$WANT" ]; then
    echo "$0: config $CONFIG plans for a $POD ($WANT) but $TPU is a ${HAVE:-slice of unknown type}" >&2
    exit 2
  fi
fi

# 1. Copy this checkout to every worker and install it (jax with TPU support).
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  "$(git rev-parse --show-toplevel)" "$TPU":"$REPO_DIR"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && pip install -q -r requirements.txt -e '.[gcs]' 'jax[tpu]==0.10.2'"

# 2. Same command on every worker.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && minvis-jax train --config '$CONFIG' --workdir '$WORKDIR' --distributed $*"
