"""The package's layout stays readable: size limits on modules and classes, measured from the source (AST),
and no import circle anywhere in the package, imports for type checkers included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torchcfm_nsgf

ROOT = Path(torchcfm_nsgf.__file__).parent
MODULE_LINES = 650  # any module of the package
CLASS_LINES = 350  # any class of the package
# the modules that hold the matcher's parts (and the pool's) get a tighter limit
PART_LINES = 450
PARTS = (
    "matcher.py",
    "matcher_parts.py",
    "matcher_state.py",
    "flow.py",
    "paths.py",
    "replay.py",
    "serving.py",
    "coupling.py",
    "pool.py",
    "pool_storage.py",
    "pool_draws.py",
)
FILES = sorted(ROOT.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_classes_stay_within_their_sizes(path):
    source = path.read_text()
    lines = len(source.splitlines())
    limit = PART_LINES if path.parent == ROOT and path.name in PARTS else MODULE_LINES
    assert lines <= limit, f"{path.name} has {lines} lines (limit {limit}): split it along its seams"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= CLASS_LINES, (
                f"{path.name}: class {node.name} has {size} lines (limit {CLASS_LINES})"
            )


def test_the_matchers_parts_are_where_the_limits_look():
    for name in PARTS:
        assert (ROOT / name).exists(), name


def _imports(path: Path, module: str) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (in functions and for type checkers too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module.rsplit(".", node.level - (1 if path.name == "__init__.py" else 0))[0]
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchcfm_nsgf"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("torchcfm_nsgf"))
    return found


def test_no_module_imports_in_a_circle_not_even_for_type_checkers():
    modules = {_name(p): p for p in FILES}
    graph = {
        name: {m for m in _imports(path, name) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }  # a package's __init__ re-exports its children: an import of a parent package is not an edge
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    # the graph is the package's: the matcher's parts and NSGF++'s rooms are in it
    assert "torchcfm_nsgf.flow" in graph["torchcfm_nsgf.matcher"]
    assert "torchcfm_nsgf.nsgfpp.options" in graph["torchcfm_nsgf.nsgfpp.objective"]
    assert len(graph) == len(FILES)
