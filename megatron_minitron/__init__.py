"""megatron_minitron: Minitron-style compression (importance, pruning, distillation) on megatron-core."""

import re
import warnings

__version__ = "0.1.0"

# megatron-core warns on every import that the optional GPU extras are absent; our runtime
# reports the chosen implementation itself (runtime.device.transformer_engine_status).
for _msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
             "full scope is deprecated", "When using async grad allreduce"):
    warnings.filterwarnings("ignore", message=_msg)

UNACTIONABLE_WARNINGS = (
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. "
                    "Please use `load` instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
)
"""megatron-core's dist-checkpointing calls these deprecated torch APIs on every load; a user
can do nothing about them. Filtered by exact message, nothing else."""


def filter_unactionable_warnings() -> None:
    """Ignore UNACTIONABLE_WARNINGS for the rest of the process (megatron_minitron's import
    does this, for the CLI and the benchmarks alike)."""
    for category, message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category)


# For every process that imports us, `minitron` and the benchmarks alike.
filter_unactionable_warnings()
