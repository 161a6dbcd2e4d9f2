# shellcheck shell=bash
# Shared by the sbatch scripts in launch/slurm/: sourced, never run. It turns the SLURM_*
# variables of the allocation into one torchrun per node (launch/torchrun.sh) joined by a c10d
# rendezvous, forwards pre-emption signals and requeues a job that saved a checkpoint.
#
# Settings (environment variables; all optional):
#   MINITRON_HOME       repository root on the submit host (default: SLURM_SUBMIT_DIR; Slurm
#                       runs a copy of the sbatch file, so its own path tells us nothing)
#   NPROC_PER_NODE      processes per node (default: SLURM_GPUS_ON_NODE, else one per visible GPU)
#   CONTAINER_IMAGE     run the stage in this image through pyxis/enroot (empty: no container)
#   CONTAINER_MOUNTS    pyxis --container-mounts list (data, checkpoints, run folders, logs)
#   MINITRON_LOG_DIR    per-job logs go under here (default: MINITRON_HOME/logs)
#   MINITRON_RDZV_PORT  port of the c10d rendezvous store on the first node (default 29500)
#   MINITRON_NCCL_ENV   the NCCL settings file (default: launch/slurm/nccl.env)

minitron_job_init() {
    # The node count comes from the allocation (#SBATCH --nodes) and nowhere else.
    NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?not inside a Slurm allocation}}"
    MINITRON_HOME="${MINITRON_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
    NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
    CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
    CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"
    # Requeued jobs keep their id; each attempt gets its own folder so logs are never mixed.
    JOB_LOG_DIR="${MINITRON_LOG_DIR:-$MINITRON_HOME/logs}/${SLURM_JOB_NAME:-minitron}-${SLURM_JOB_ID:?}/restart${SLURM_RESTART_COUNT:-0}"
    mkdir -p "$JOB_LOG_DIR"

    # Not `| head -n 1`: under pipefail, scontrol dying of SIGPIPE would fail the job.
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    export MINITRON_NNODES="$NNODES"
    export MINITRON_RDZV_ENDPOINT="${hosts[0]:?no hosts in SLURM_JOB_NODELIST}:${MINITRON_RDZV_PORT:-29500}"
    export MINITRON_RDZV_ID="$SLURM_JOB_ID"

    set -a
    # shellcheck source=launch/slurm/nccl.env
    source "${MINITRON_NCCL_ENV:-$MINITRON_HOME/launch/slurm/nccl.env}"
    set +a

    # Inside the image the launcher sits where the Dockerfile put it.
    if [[ -n "$CONTAINER_IMAGE" ]]; then
        LAUNCHER="${MINITRON_LAUNCHER:-/opt/megatron_minitron/launch/torchrun.sh}"
    else
        LAUNCHER="${MINITRON_LAUNCHER:-$MINITRON_HOME/launch/torchrun.sh}"
    fi
    echo "minitron: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} nodes," \
         "rendezvous ${MINITRON_RDZV_ENDPOINT}, logs ${JOB_LOG_DIR}"
}

# minitron_stage [--single] STAGE [key=value ...]
# Run a stage on every node of the job (or, with --single, as one process on one node) and
# return its status: 0, 3 (saved on pre-emption, requeue me) or a failure.
minitron_stage() {
    local nodes="$NNODES" nproc=() rdzv=(MINITRON_NNODES="$NNODES")
    if [[ -n "$NPROC_PER_NODE" ]]; then
        nproc=(--nproc "$NPROC_PER_NODE")
    fi
    if [[ "${1:-}" == "--single" ]]; then
        # A standalone torchrun: no rendezvous to wait in for nodes that are not coming.
        nodes=1
        nproc=(--nproc 1)
        rdzv=(MINITRON_RDZV_ENDPOINT=)
        shift
    fi
    local stage="$1"
    local container=()
    if [[ -n "$CONTAINER_IMAGE" ]]; then
        container=(--container-image="$CONTAINER_IMAGE" --container-workdir="$MINITRON_HOME")
        if [[ -n "$CONTAINER_MOUNTS" ]]; then
            container+=(--container-mounts="$CONTAINER_MOUNTS")
        fi
    fi
    # One task per node; torchrun starts the ranks. No --kill-on-bad-exit: on pre-emption the
    # nodes stop one after the other, and killing the slower ones could cut their last save.
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0 \
        --output="$JOB_LOG_DIR/$stage-node%n.log" "${container[@]}" \
        env "${rdzv[@]}" bash "$LAUNCHER" "${nproc[@]}" "$@" &
    local srun_pid=$!
    # sbatch --signal=B:USR1@N signals only this shell; srun passes the signal to its tasks.
    # Bash runs traps only between commands, hence srun in the background and `wait`.
    # shellcheck disable=SC2064  # the pid is fixed now, on purpose
    trap "kill -USR1 $srun_pid 2>/dev/null || true" USR1
    # shellcheck disable=SC2064
    trap "kill -TERM $srun_pid 2>/dev/null || true" TERM
    local rc=0
    wait "$srun_pid" || rc=$?
    while kill -0 "$srun_pid" 2>/dev/null; do
        rc=0
        wait "$srun_pid" || rc=$?
    done
    trap - USR1 TERM
    return "$rc"
}

# minitron_finish STATUS: requeue on 3 (the job saved and resumes from run.dir's checkpoints
# when Slurm starts it again), otherwise end the job with STATUS.
minitron_finish() {
    local rc="$1"
    if [[ "$rc" -eq 3 ]]; then
        echo "minitron: pre-empted; checkpoint saved; requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"
}
