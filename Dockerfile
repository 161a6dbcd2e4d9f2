# megatron_minitron on NVIDIA's NGC PyTorch image, which already carries CUDA, NCCL, torch,
# Transformer-Engine and apex built for each other: we add only our package and its extras.
# Tag matrix and how to pick another base: docker/README.md. Build with docker/build.sh.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# The "gpu" extra (transformer-engine) is not installed: the base image's own TE build matches
# its torch and CUDA, and pip would otherwise try to replace it. "dev" (tests, linters) stays
# out of the runtime image.
ARG MINITRON_EXTRAS=hf,eval

# MINITRON_CONF_DIR: the package is installed into site-packages, so the Hydra YAML tree is
# found here rather than next to the source. CUDA_DEVICE_MAX_CONNECTIONS: megatron's TP overlap.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    MINITRON_CONF_DIR=/opt/megatron_minitron/conf

WORKDIR /opt/megatron_minitron

# Dependencies first, in their own layer: source edits then rebuild in seconds. The stub
# package lets pip resolve setup.py's extras before the real source is copied.
COPY setup.py ./
COPY docker/requirements.txt docker/requirements.txt
RUN mkdir megatron_minitron && touch megatron_minitron/__init__.py \
    && pip install --no-cache-dir -c docker/requirements.txt ".[${MINITRON_EXTRAS}]" \
    && pip uninstall -y megatron_minitron \
    && rm -rf megatron_minitron build ./*.egg-info

COPY megatron_minitron megatron_minitron
COPY conf conf
COPY launch launch
COPY README.md ./
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

# Fail the build, not the first job, if the base lost what the GPU path needs. apex is only
# reported: megatron-core falls back from its fused Adam/norms to TE's or torch's.
RUN python -c "import transformer_engine.pytorch, megatron.core, megatron_minitron" \
    && python -c "import importlib.util as u; print('apex:', u.find_spec('apex') is not None)" \
    && minitron --help

CMD ["bash"]
