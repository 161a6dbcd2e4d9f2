"""megatron_minitron: Minitron-style compression (importance, pruning, distillation) on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns on every import that the optional GPU extras are absent; our runtime
# reports the chosen implementation itself (runtime.device.transformer_engine_status).
for _msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
             "full scope is deprecated", "When using async grad allreduce"):
    warnings.filterwarnings("ignore", message=_msg)
