#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice. Every worker runs the same command; jax.distributed finds the
# pod's coordinator by itself and each host reads only its own shard of the data.
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b minvis:backbone=swin_l gs://bucket/run1 \
#       --set data.manual_dir=gs://bucket/ytvis_2019
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

# 1. Copy this checkout to every worker and install it (jax with TPU support).
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  "$(git rev-parse --show-toplevel)" "$TPU":"$REPO_DIR"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && pip install -q -r requirements.txt -e '.[gcs]' 'jax[tpu]==0.10.2'"

# 2. Same command on every worker.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && minvis-jax train --config '$CONFIG' --workdir '$WORKDIR' --distributed $*"
