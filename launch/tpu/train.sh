#!/bin/bash
# Train on a multi-host Cloud TPU VM slice: the same command on every worker; JAX finds the others
# (PLAMO_DISTRIBUTED=auto). The checkout must exist at the same path on every worker, set up with
# `make setup` and `.venv/bin/pip install -U "jax[tpu]==0.10.2"`; output_dir should be shared
# storage (e.g. a gs:// bucket mounted with gcsfuse) so every host sees the checkpoints.
#
#   launch/tpu/train.sh TPU_NAME ZONE configs/llama3_8b.py --config.mesh.fsdp=-1 --config.mesh.data=1
set -euo pipefail
TPU=${1:?usage: launch/tpu/train.sh TPU_NAME ZONE CONFIG [--config.key=value ...]}
ZONE=${2:?usage: launch/tpu/train.sh TPU_NAME ZONE CONFIG [--config.key=value ...]}
CONFIG=${3:?usage: launch/tpu/train.sh TPU_NAME ZONE CONFIG [--config.key=value ...]}
shift 3
REPO_DIR=${PLAMO_REPO_DIR:-plamo_jax}  # relative to each worker's home directory
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && PLAMO_DISTRIBUTED=auto .venv/bin/python launch/train.py --config $(printf %q "$CONFIG")$ARGS"
