#!/usr/bin/env bash
# Build the megatron_minitron image from the repository's Dockerfile.
#
#   docker/build.sh [TAG]            TAG defaults to megatron_minitron:<git short sha>
#
#   BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3   another NGC base (see docker/README.md)
#   MINITRON_EXTRAS=hf,eval                        setup.py extras to install
#
# After the build it prints the versions the image really carries, for docker/README.md's
# matrix (the base's release notes are the plan; this is the record).
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${1:-megatron_minitron:$(git rev-parse --short HEAD 2>/dev/null || echo dev)}"
build_args=()
if [[ -n "${BASE_IMAGE:-}" ]]; then
    build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
if [[ -n "${MINITRON_EXTRAS:-}" ]]; then
    build_args+=(--build-arg "MINITRON_EXTRAS=$MINITRON_EXTRAS")
fi

docker build "${build_args[@]}" -t "$tag" .
docker run --rm "$tag" python -c '
import importlib.metadata as md
for dist in ("torch", "megatron-core", "transformer-engine", "apex", "wandb", "transformers"):
    try:
        print(f"{dist:20s} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist:20s} (not installed)")
'
echo "built $tag"
