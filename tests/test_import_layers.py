"""The package's import contract, read from the source (lazy imports inside functions included):
modules import each other without cycles, and packages import only their own layer or lower ones.

Layers, lowest first. The on-disk formats (`formats`: JSON Lines, the corpus rows, a model
directory's clara.json, an export's manifest and shards, a checkpoint's meta, safetensors) sit
right above the file helpers, below every layer that reads or writes them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "clara_jax"

LAYERS = [
    {"file_io", "safe_paths"},  # file helpers
    {"formats"},  # on-disk formats: file names, schemas, versions, validating readers
    {"model"},
    {"parallel"},
    {"data"},
    {"interop"},
    {"inference"},
    {"training"},
    {"serving", "synthesis", "demo"},
    {"cli", "__init__"},  # entry points and the public API
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """clara_jax modules imported anywhere in the file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("clara_jax")
        ):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clara_jax"))
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its package {top!r} is in no layer of this test; add it")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read_from_the_source():
    graph = _graph()
    assert "clara_jax.model.clara" in graph["clara_jax.training.build"]  # from ... import name
    # a lazy import inside a function counts
    assert "clara_jax.inference.clara_model" in graph["clara_jax.training.controlled_stage3"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_their_layer_or_lower():
    upward = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert upward == []


def test_the_public_api_resolves_and_importing_the_package_starts_no_jax():
    import subprocess
    import sys

    import clara_jax

    for name in clara_jax.__all__:
        assert getattr(clara_jax, name) is not None, name
    assert callable(clara_jax.load_inference) and "stage3" in clara_jax.STAGES
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        clara_jax.nope  # noqa: B018
    code = (
        "import sys, clara_jax; print(sorted(m for m in ('jax', 'flax', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
