"""`minitron --help` (the stages) and `minitron STAGE --help` (the config sections that stage
reads, each field with its default and the first sentence of its docstring)."""

import ast
import dataclasses
import inspect
import textwrap
from typing import Dict, List

README = "README.md, section \"Stages\" (and docs/USAGE.md for every stage in detail)"

STAGES = {
    "train": "Pretrain or fine-tune (teacher correction) with the LM loss.",
    "data": "Preprocess text/JSONL into megatron indexed datasets.",
    "convert": "Hugging Face <-> megatron checkpoints.",
    "importance": "Estimate width and depth importance scores.",
    "prune": "Slice a checkpoint to a target architecture.",
    "search": "Architecture search under a parameter budget.",
    "distill": "Knowledge distillation from a teacher.",
    "cache-teacher": "Cache a teacher's distributions for teacher-free distillation.",
    "eval": "Perplexity and lm-eval-harness evaluation.",
    "pipeline": "The whole Minitron recipe, end to end.",
}

_RUN = ["run", "parallel", "runtime", "checkpoint", "logger"]
STAGE_SECTIONS: Dict[str, List[str]] = {
    "train": ["train", "model", "data", *_RUN],
    "data": ["preprocess", "data", "run"],
    "convert": ["convert", "run", "logger"],
    "importance": ["importance", "data", *_RUN],
    "prune": ["prune", "importance", *_RUN],
    "search": ["search", "prune", "distill", "train", "data", *_RUN],
    "distill": ["distill", "train", "model", "data", *_RUN],
    "cache-teacher": ["cache", "distill", "train", "data", *_RUN],
    "eval": ["eval", "data", *_RUN],
    "pipeline": ["pipeline", "importance", "prune", "search", "distill", "train", "eval",
                 "cache", "model", "data", *_RUN],
}
"""The MinitronConfig sections each stage reads, its own first."""


def usage() -> str:
    lines = ["usage: minitron STAGE [key=value ...]   (Hydra overrides, e.g. run.dir=runs/x)",
             "       minitron STAGE --help            (the config sections STAGE reads)", "",
             "stages:"]
    lines += [f"  {name:<13} {text}" for name, text in STAGES.items()]
    lines += ["", f"More: {README}."]
    return "\n".join(lines)


def field_docs(cls) -> Dict[str, str]:
    """{field: its attribute docstring} of a dataclass, from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _first_sentence(text: str, width: int = 200) -> str:
    cut = text.find(". ")
    text = text if cut < 0 else text[:cut + 1]
    return text if len(text) <= width else text[:width - 3] + "..."


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "{...}" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def stage_help(stage: str) -> str:
    from megatron_minitron.config.schema import MinitronConfig

    sections = {f.name: f for f in dataclasses.fields(MinitronConfig)}
    lines = [f"minitron {stage}: {STAGES[stage]}", "",
             "Settings (key=value overrides; defaults shown).", f"More: {README}."]
    for name in STAGE_SECTIONS[stage]:
        cls = sections[name].default_factory()  # type: ignore[misc]
        cls = type(cls)
        lines += ["", f"{name}:"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  {name}.{f.name} = {_default(f)}")
            if f.name in docs:
                lines.append(textwrap.fill(_first_sentence(docs[f.name]), 98,
                                           initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
