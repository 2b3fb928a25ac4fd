"""The import graph of minicpmo_cli against the layer order written in README.md's Layout section.

Every import counts, also those inside functions (they are how heavy modules stay lazy, but they are still
dependencies): a module may import only from its own layer or the layers below it, and the module graph must
have no cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "minicpmo_cli"


def readme_layers() -> list[list[str]]:
    """[["cli/", "__main__.py"], ["server/"], ...] from the numbered list of README's Layout section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        match = re.match(r"^\d+\. (.*?):", line)
        if match:
            layers.append(re.findall(r"`([^`]+)`", match.group(1)))
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT / relative).with_suffix(".py").exists() or (ROOT / relative / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Our modules that ``path`` imports (``from pkg import module`` counts as importing that module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if is_module(child) else base)
    return {name for name in found if name == "minicpmo_cli" or name.startswith("minicpmo_cli.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def layer_of(module: str, layers: list[list[str]]) -> int:
    """The index of the README layer that holds ``module`` (a package ``x/`` or a file ``x.py``)."""
    relative = module.split(".")[1:]
    for index, entries in enumerate(layers):
        for entry in entries:
            if entry.endswith("/") and relative[:1] == [entry.rstrip("/")]:
                return index
            if entry.endswith(".py") and relative == [entry[:-3]] or (entry == "__init__.py" and not relative):
                return index
    raise AssertionError(f"{module} is in no layer of README.md's Layout section: add it there")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_readme_lists_the_layers():
    layers = readme_layers()
    assert len(layers) >= 8, layers
    assert layers[0][0] == "cli/" and "errors.py" in layers[-1]


def test_every_module_sits_in_a_layer():
    layers = readme_layers()
    for module in import_graph():
        layer_of(module, layers)


def test_imports_point_only_down_the_layers():
    layers = readme_layers()
    upward = [f"{source} (layer {layer_of(source, layers) + 1}) imports {target} (layer "
              f"{layer_of(target, layers) + 1})"
              for source, targets in sorted(import_graph().items()) for target in sorted(targets)
              if target != "minicpmo_cli" and layer_of(target, layers) < layer_of(source, layers)]
    assert upward == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def test_the_layer_check_sees_an_upward_import(tmp_path):
    # The checker itself must catch what it is for: model/ importing generation/ is upward.
    layers = readme_layers()
    assert layer_of("minicpmo_cli.model.omni", layers) > layer_of("minicpmo_cli.generation.text", layers)
    assert layer_of("minicpmo_cli.cli.chat", layers) == layer_of("minicpmo_cli.__main__", layers)
