#!/usr/bin/env bash
# Runs this repo's trainer on every host of a Cloud TPU VM pod slice.
#
#   scripts/launch_tpu_pod.sh setup TPU_NAME ZONE
#       copies this checkout to ~/nfnets-jax on every worker and installs it
#       with the TPU build of JAX (pip install -e '.[tpu]').
#   scripts/launch_tpu_pod.sh run TPU_NAME ZONE [experiments/train.py flags]
#       starts the same command on every worker (gcloud ... --worker=all), with
#       --config.distributed=True so each host calls jax.distributed.initialize()
#       (on Cloud TPU the coordinator is found automatically) and feeds its own
#       slice of every global batch. --workdir must be a path every host can
#       write, e.g. a gs:// bucket or a shared filesystem.
#
# Example:
#   scripts/launch_tpu_pod.sh run my-v4-64 us-central2-b \
#       --config=configs/nfnet.py:variant=F1 --workdir=gs://bucket/f1
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
action=$1 tpu=$2 zone=$3
shift 3
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"
}
case "$action" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball=$(mktemp --suffix=.tar.gz)
    git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$tpu":nfnets-jax.tar.gz \
      --zone="$zone" --worker=all
    ssh_all "mkdir -p ~/nfnets-jax && tar -xzf ~/nfnets-jax.tar.gz -C ~/nfnets-jax && cd ~/nfnets-jax && python3 -m pip install -q -e '.[tpu]'"
    ;;
  run)
    ssh_all "cd ~/nfnets-jax && python3 experiments/train.py --config.distributed=True $(printf '%q ' "$@")"
    ;;
  *)
    echo "error: unknown action '$action' (setup or run)" >&2
    exit 2
    ;;
esac
