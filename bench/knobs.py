"""`key=value` command-line knobs of the quality benchmarks, typed by their defaults."""

from typing import Dict, List


def parse_knobs(argv: List[str], defaults: Dict[str, object]) -> Dict[str, object]:
    """defaults updated from `key=value` arguments, each converted to its default's type."""
    knobs = dict(defaults)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in knobs or not value:
            raise SystemExit(f"unknown knob {arg!r}; use key=value with keys {sorted(knobs)}")
        knobs[key] = type(defaults[key])(value)
    return knobs
