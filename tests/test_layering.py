"""The package reads as its data flow: every import (lazy ones included) points down the layers, and none cycles."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "afprobe"

# Bottom to top. A module may import from its own layer or any layer below it, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("afprobe", "afprobe.errors", "afprobe.files", "afprobe.stats"),
    ("afprobe.data",),
    ("afprobe.model",),
    ("afprobe.behaviour",),
    ("afprobe.store",),
    ("afprobe.analysis",),
    ("afprobe.report",),
    ("afprobe.experiment",),
    ("afprobe.cli",),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the afprobe modules it imports anywhere in its body (top level, functions, lazily)."""
    modules = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> int:
    best, level = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")
    return level


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(source)
    )


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_no_import_cycles():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_the_checks_fail_on_a_constructed_cycle_and_upward_import(tmp_path):
    package = tmp_path / "afprobe"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "__init__.py").write_text("")
    (package / "model" / "a.py").write_text("def f():\n    from afprobe.model.b import g\n")
    (package / "model" / "b.py").write_text("from afprobe.model import a\nfrom afprobe.analysis import c\n")
    (package / "analysis").mkdir()
    (package / "analysis" / "__init__.py").write_text("")
    (package / "analysis" / "c.py").write_text("")
    graph = import_graph(package)
    assert find_cycle(graph) == ["afprobe.model.a", "afprobe.model.b", "afprobe.model.a"]
    assert upward_imports(graph) == ["afprobe.model.b (layer 2) imports afprobe.analysis.c (layer 5)"]


def test_every_module_belongs_to_a_layer():
    # layer_of raises for a module outside every layer; each layer holds at least one module
    assert {layer_of(module) for module in import_graph(PACKAGE)} == set(range(len(LAYERS)))


@pytest.mark.parametrize("name", ["load_model", "render_pairs", "score_prompts", "ActivationStore", "run_experiment"])
def test_curated_api_at_the_top(name):
    import afprobe

    assert name in afprobe.__all__
    assert getattr(afprobe, name) is not None
