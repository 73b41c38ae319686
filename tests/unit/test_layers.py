"""The import direction of docs/architecture.md: a package imports only packages of lower layers.

Every `import` in guard/ is read with `ast` (those inside functions too), so a new module or a lazy
import that reaches upward fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parents[2] / "guard"

#: Lowest first, labelled as in docs/architecture.md. A unit may import its own modules and any unit listed
#: before it; units that share a row don't import each other. The product (layers 0-6) never imports the
#: tools (layers 7-10).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("0", ("guard.errors",)),
    ("0", ("guard.config",)),
    ("0", ("guard.kafka_security",)),
    ("0", ("guard.telemetry",)),
    ("0", ("guard.secretfile",)),
    ("1", ("guard.cdc", "guard.keys", "guard.audit")),
    ("2", ("guard.protect",)),
    ("3", ("guard.classify",)),
    ("3b", ("guard.policy",)),
    ("4", ("guard.records",)),
    ("5", ("guard.pipeline",)),
    ("6", ("guard.kafka", "guard.erasure")),
    # anomaly detection (facts, rules, state in Redis, alerts; streams/analyzer.py runs it) and the reveal service
    ("6b", ("guard.anomaly", "guard.reveal")),
    # the branch transfer: keys, policy entities, erasure, audit, and the anomalies it reports
    ("6c", ("guard.transfer",)),
    # tools: data, the local stack, the demo and the benchmark, the command line
    ("7", ("guard.workload", "guard.doctor")),
    ("8", ("guard.stack",)),
    ("9", ("guard.demo", "guard.bench")),
    ("10", ("guard.cli",)),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
LABEL = {unit: label for label, units in LAYERS for unit in units}


def unit_of(module: str) -> str | None:
    """The layered unit a dotted module name belongs to (None: not part of `guard`)."""
    parts = module.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        if name in RANK:
            return name
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(GUARD.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every guard import, `from guard import x` read as `guard.x`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "guard":
                found += [(node.lineno, f"guard.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "guard" or name.startswith("guard.")]


def sources() -> list[Path]:
    return sorted(p for p in GUARD.rglob("*.py") if p.name != "__init__.py" or p.parent != GUARD)


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in sources() if unit_of(module_name(p)) is None]
    assert not missing, f"add these to LAYERS here and to docs/architecture.md: {missing}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(GUARD.parent)))
def test_imports_point_down(path: Path) -> None:
    here = unit_of(module_name(path))
    assert here is not None
    upward = []
    for line, name in imported(ast.parse(path.read_text(), str(path))):
        there = unit_of(name)
        if there is None or there == here:
            continue
        if RANK[there] >= RANK[here]:
            upward.append(f"{path.name}:{line} imports {name} (layer {LABEL[there]}; {here} is layer {LABEL[here]})")
    assert not upward, "imports against the layer order of docs/architecture.md:\n" + "\n".join(upward)


def module_graph() -> dict[str, set[str]]:
    """Module → the guard modules it imports (lazy imports too); `from pkg import name` counts as importing
    `pkg.name` when that is a module, else `pkg`."""
    modules = {module_name(p): p for p in sources()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names]
            else:
                continue
            targets |= {t for t in found if t in modules and t != name}
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_graph_sees_a_submodule_imported_from_its_package() -> None:
    assert "guard.keys.scripts" in module_graph()["guard.keys.store"]  # `from guard.keys import scripts`


def test_cycles_finds_a_circle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others() -> None:
    """Within a layer too, imports run one way: a module that needs something of a module importing it
    takes it from a third, lower module (as `guard.bench.drain`, `guard.stack.secrets` and `procs` are)."""
    found = cycles(module_graph())
    assert not found, "import cycles (move what both sides need into a module below them):\n" + "\n".join(
        " <-> ".join(c) for c in found)
