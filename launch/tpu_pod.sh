#!/usr/bin/env bash
# cgc_jax on a Cloud TPU VM pod slice: the same command on every worker host, started from your
# workstation with gcloud. JAX finds the other hosts through the TPU metadata
# (--config.dist.auto_detect=true).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a REMOTE_DIR=~/cgc_jax \
#       launch/tpu_pod.sh --config=configs/brats.py --workdir=/mnt/shared/runs/brats \
#       --config.data.root=/mnt/data/BraTS2018
#
# Every worker needs the repository at REMOTE_DIR with its requirements installed (e.g. one
# `--command="git clone ... && pip install -r requirements.txt 'jax[tpu]'"` with --worker=all first),
# and the data and the workdir on a file system every worker mounts (e.g. Filestore or GCS FUSE).
set -euo pipefail

fail() { echo "tpu_pod.sh: $*" >&2; exit 2; }
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${REMOTE_DIR:?set REMOTE_DIR to the repository path on the workers}"
[[ " $* " == *" --config="* ]] || fail "missing --config=configs/....py"
[[ " $* " == *" --workdir="* ]] || fail "missing --workdir=... (shared by all workers)"
command -v gcloud >/dev/null || fail "gcloud not found: install the Google Cloud CLI"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3}

ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT_FLAG:-} --worker=all \
  --command="cd $REMOTE_DIR && $REMOTE_PYTHON -u -m cgc_jax.main $ARGS --config.dist.auto_detect=true"
