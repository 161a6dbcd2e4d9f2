"""The package's import graph follows shared/STYLE.md: imports flow down
cli -> pipeline -> eval -> training -> distill | pruning -> importance -> checkpoint -> models
-> data | runtime -> config; siblings (distill | pruning, data | runtime) do not import each other;
no two modules import each other, directly or round a longer loop. Function-level imports count:
they are deferred, not exempt. Every violation is printed before the test fails."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_minitron"
ROOT = "megatron_minitron"

# Higher rank sits higher; an import must go to a strictly lower rank or stay inside its package.
# Experiments that are not the product (the study) live in bench/, outside the package.
RANKS = {"cli": 9, "pipeline": 8, "eval": 7, "training": 6, "distill": 5,
         "pruning": 5, "importance": 4, "checkpoint": 3, "models": 2, "data": 1, "runtime": 1,
         "config": 0}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every package module `path` imports, at any depth in the file (`from a import b` counts
    a.b when b is a module, else a)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(ROOT))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith(ROOT):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    found.discard(name)
    return {m for m in found if m in modules}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def layer_violations(graph) -> list[str]:
    out = []
    for src, targets in sorted(graph.items()):
        a = package_of(src)
        for dst in sorted(targets):
            b = package_of(dst)
            if a == b or not b:
                continue
            if a not in RANKS or b not in RANKS:
                out.append(f"{src} -> {dst}: package without a layer (add it to RANKS)")
            elif RANKS[b] == RANKS[a]:
                out.append(f"{src} -> {dst}: sideways ({a} and {b} are siblings)")
            elif RANKS[b] > RANKS[a]:
                out.append(f"{src} -> {dst}: up a layer ({a} below {b})")
    return out


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in import_graph()} - {""}
    assert packages <= set(RANKS), sorted(packages - set(RANKS))


def test_no_import_goes_up_or_sideways():
    bad = layer_violations(import_graph())
    for line in bad:
        print("layer violation:", line)
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    bad = cycles(import_graph())
    for comp in bad:
        print("import cycle:", " <-> ".join(comp))
    assert not bad, bad


MODEL_LAYOUT = {"decoder", "self_attention", "mlp", "embedding", "word_embeddings",
                "final_layernorm", "output_layer"}
"""GPTModel / TransformerLayer attributes only models/ reaches: elsewhere models/layers.py's
accessors (its typed Layer names a layer's linears and norms)."""


def layout_reaches(path: Path) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: .{node.attr}"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and node.attr in MODEL_LAYOUT]


def test_only_models_reaches_into_the_model_layout():
    bad = [line for f in sorted(PACKAGE.rglob("*.py")) if package_of(module_name(f)) != "models"
           for line in layout_reaches(f)]
    for line in bad:
        print("model layout reached outside models/:", line)
    assert not bad, "\n".join(bad)


def parallel_state_users() -> list[str]:
    out = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("megatron.core.parallel_state") for n in names):
                out.append(f"{module_name(f)}:{node.lineno}")
    return out


def test_only_runtime_touches_parallel_state():
    bad = [u for u in parallel_state_users() if package_of(u.split(":")[0]) != "runtime"]
    for line in bad:
        print("parallel_state used outside runtime/:", line)
    assert not bad, bad
    assert parallel_state_users()  # the check sees runtime's own use


def test_the_checker_can_fail():
    graph = {"megatron_minitron.models.x": {"megatron_minitron.training.y"},
             "megatron_minitron.training.y": {"megatron_minitron.models.x"},
             "megatron_minitron.distill.z": {"megatron_minitron.pruning.w"}}
    assert layer_violations(graph) == [
        "megatron_minitron.distill.z -> megatron_minitron.pruning.w: sideways "
        "(distill and pruning are siblings)",
        "megatron_minitron.models.x -> megatron_minitron.training.y: up a layer "
        "(models below training)"]
    assert cycles(graph) == [["megatron_minitron.models.x", "megatron_minitron.training.y"]]


def test_the_layout_checker_can_fail(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("n = len(gpt.decoder.layers)\nw = layer.self_attention.linear_qkv\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert sorted(line.split(": ")[1] for line in layout_reaches(f)) == [
            ".decoder", ".self_attention"]
    finally:
        PACKAGE = saved


def test_relative_and_function_level_imports_are_seen(tmp_path):
    pkg = tmp_path / ROOT / "eval"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from ..training import loop\n    from . import y\n")
    mods = {"megatron_minitron.training.loop", "megatron_minitron.eval.y"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / ROOT
    try:
        assert imported_modules(f, mods) == mods
    finally:
        PACKAGE = saved
