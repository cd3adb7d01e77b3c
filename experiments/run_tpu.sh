#!/usr/bin/env bash
# Runs a metaflax module on every worker of a Cloud TPU VM slice (multi-host).
#
#   experiments/run_tpu.sh TPU_NAME ZONE MODULE [ARGS...]
#   experiments/run_tpu.sh my-v5e-32 us-central2-b benchmarks.scaling --meta-batches 64,256
#
# It copies this working tree to every worker, creates a virtualenv there, installs metaflax with
# JAX for TPU, and starts the module on all workers at once with METAFLAX_DISTRIBUTED=1, so
# metaflax.sharding.initialize_distributed() joins the processes (JAX finds the coordinator on
# TPU VMs by itself). Each process builds only its share of every meta-batch; process 0 writes
# the outputs. Requires the gcloud CLI, authenticated, and an existing TPU VM:
#   gcloud compute tpus tpu-vm create TPU_NAME --zone=ZONE --accelerator-type=v5litepod-32 \
#     --version=v2-alpha-tpuv5-lite
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
tar -C "$here" --exclude=.git --exclude=workdirs -czf "$archive" .
# The module and its arguments, each quoted for the remote shell (spaces, quotes, $ and ;
# arrive as the one argument they are here).
command=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm scp "$archive" "$tpu":metaflax.tar.gz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/metaflax && tar -xzf ~/metaflax.tar.gz -C ~/metaflax && cd ~/metaflax
  python3 -m venv ~/metaflax-venv && . ~/metaflax-venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  METAFLAX_DISTRIBUTED=1 python -m $command
"
