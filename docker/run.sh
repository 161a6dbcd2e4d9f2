#!/usr/bin/env bash
# Run a command in the megatron_minitron image on this machine's GPUs, with the repository's
# runs/ and the user's cache (demo corpus, tokenizers) mounted so results outlive the container.
#
#   docker/run.sh [COMMAND ...]      default: an interactive shell
#   docker/run.sh launch/torchrun.sh --nproc 8 train run.dir=/workspace/runs/tiny
#
#   IMAGE=megatron_minitron:<tag>    the image (default megatron_minitron:latest)
#   DATA_DIR=/path                   also mounted, at the same path, for datasets and checkpoints
#   WANDB_API_KEY / WANDB_MODE       passed through when set (runs log offline otherwise)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
image="${IMAGE:-megatron_minitron:latest}"

mkdir -p "$repo/runs" "${HOME}/.cache/megatron_minitron"
mounts=(-v "$repo/runs:/workspace/runs"
        -v "${HOME}/.cache/megatron_minitron:/root/.cache/megatron_minitron")
if [[ -n "${DATA_DIR:-}" ]]; then
    mounts+=(-v "$DATA_DIR:$DATA_DIR")
fi
envs=()
for var in WANDB_API_KEY WANDB_MODE WANDB_ENTITY HF_TOKEN; do
    if [[ -n "${!var:-}" ]]; then
        envs+=(-e "$var")
    fi
done
tty=()
if [[ -t 0 ]]; then
    tty=(-it)
fi

# --ipc=host and the ulimits: NCCL and DataLoader workers use shared memory and pinned pages
# beyond Docker's small defaults (NVIDIA's recommended flags for the NGC images).
exec docker run --rm "${tty[@]}" --gpus all --ipc=host --ulimit memlock=-1 \
    --ulimit stack=67108864 "${mounts[@]}" "${envs[@]}" -w /opt/megatron_minitron \
    "$image" "${@:-bash}"
