"""The import rule of the tree: every cross-process contract lives in ``neo_common``, so a service
package imports only ``neo_common`` and itself, the operator only ``neo_common``, and no module
imports itself back through others (docs/design.md, "Processes and packages").

Imports are read from the source (``ast``), function-level ones included: a lazy import crosses
the boundary as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {  # import name -> folder, as pyproject.toml's package-dir maps them
    "neo_common": ROOT / "services" / "common",
    "neo_gateway": ROOT / "services" / "gateway",
    "neo_gpu_worker": ROOT / "services" / "gpu_worker",
    "neo_cpu_attention": ROOT / "services" / "cpu_attention",
    "neo_operator": ROOT / "operator",
}
ALLOWED = {name: {"neo_common", name} for name in PACKAGES}
ALLOWED["neo_common"] = {"neo_common"}


def modules() -> dict[str, Path]:
    """Every module of the product, by dotted name."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (a ``from P import m`` of a submodule counts as ``P.m``)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m.split(".")[0] in PACKAGES}


GRAPH = {name: imports_of(name, path, modules()) for name, path in modules().items()}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_imports_only_neo_common_and_itself(package):
    crossing = sorted(f"{mod} imports {dep}" for mod, deps in GRAPH.items() if mod.split(".")[0] == package
                      for dep in deps if dep.split(".")[0] not in ALLOWED[package])
    assert not crossing, "\n".join(crossing)


def test_no_module_imports_itself_back():
    """No cycle in the module graph (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in GRAPH.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_rule_sees_a_crossing():
    """The checker itself: a gateway module importing the GPU worker would be caught."""
    assert "neo_gpu_worker" not in ALLOWED["neo_gateway"]
    assert any(dep.startswith("neo_common.") for deps in GRAPH.values() for dep in deps), "imports are read"
