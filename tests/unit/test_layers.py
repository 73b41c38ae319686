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
    ("1", ("guard.cdc", "guard.keys")),
    ("2", ("guard.protect",)),
    ("3", ("guard.classify",)),
    ("4", ("guard.records",)),
    ("5", ("guard.pipeline",)),
    ("6", ("guard.kafka", "guard.erasure")),
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
