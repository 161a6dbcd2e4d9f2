#!/usr/bin/env bash
# Start one minitron stage under torchrun on this node.
#
#   launch/torchrun.sh [--nproc N] STAGE [key=value ...]
#
#   --nproc N     processes on this node. Default: the CUDA devices torch sees (one per GPU),
#                 or 1 on a CPU-only machine. CPU runs take any N (gloo); TP x PP must divide
#                 the world size, e.g. `--nproc 4 train parallel.tensor_model_parallel_size=2`.
#   STAGE ...     a `minitron` stage and its Hydra overrides, passed through untouched.
#
# Alone it runs a standalone single-node job. launch/slurm/common.sh runs it once per node with
# these set, which turns it into one member of a multi-node c10d rendezvous:
#   MINITRON_NNODES          nodes in the job
#   MINITRON_RDZV_ENDPOINT   host:port of the rendezvous store (the job's first node)
#   MINITRON_RDZV_ID         rendezvous id shared by the nodes (the Slurm job id)
#
# Pre-emption: SIGUSR1 or SIGTERM to this script reaches every worker; they finish the current
# step, save a checkpoint and stop. This script then exits 3 (EXIT_REQUEUE in cli/errors.py);
# any other failure keeps torchrun's exit status.
set -euo pipefail

nproc=""
if [[ "${1:-}" == "--nproc" ]]; then
    nproc="${2:?--nproc needs a number}"
    shift 2
fi
if [[ $# -lt 1 ]]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
if [[ -z "$nproc" ]]; then
    # torch, not nvidia-smi: it honours CUDA_VISIBLE_DEVICES.
    nproc="$(python -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi

rdzv=(--standalone)
if [[ -n "${MINITRON_RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--nnodes "${MINITRON_NNODES:?set MINITRON_NNODES with MINITRON_RDZV_ENDPOINT}"
          --rdzv-backend c10d --rdzv-endpoint "$MINITRON_RDZV_ENDPOINT"
          --rdzv-id "${MINITRON_RDZV_ID:-minitron}")
fi

# The workers write this file when they saved and want a requeue: torchrun itself reports any
# worker failure as exit 1, so their exit code 3 would not reach us.
requeue_file="$(mktemp "${TMPDIR:-/tmp}/minitron-requeue.XXXXXX")"
rm -f "$requeue_file"
export MINITRON_REQUEUE_FILE="$requeue_file"

# torchrun would treat SIGUSR1 as fatal (default action) and, for the signals it handles, stops
# waiting after --shutdown-timeout. So it ignores USR1 (workers inherit that until the training
# loop installs its handler) and we deliver the signals to the workers ourselves.
(trap '' USR1; exec torchrun "${rdzv[@]}" --nproc-per-node "$nproc" \
    --shutdown-timeout "${MINITRON_SHUTDOWN_TIMEOUT:-300}" \
    -m megatron_minitron.cli.main "$@") &
torchrun_pid=$!

# shellcheck disable=SC2329  # called from the traps below
forward() {
    # Workers are torchrun's direct children (each in its own session, so a process-group
    # signal would miss them).
    pkill "-$1" -P "$torchrun_pid" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until
# torchrun is really gone.
rc=0
wait "$torchrun_pid" || rc=$?
while kill -0 "$torchrun_pid" 2>/dev/null; do
    rc=0
    wait "$torchrun_pid" || rc=$?
done

if [[ -e "$requeue_file" ]]; then
    rm -f "$requeue_file"
    exit 3
fi
exit "$rc"
