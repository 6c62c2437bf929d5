"""The benchmark scripts import each other downhill only: no circle, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def sibling_imports(path: Path, siblings: set[str]) -> set[str]:
    """The sibling scripts ``path`` imports anywhere in its body (``import x`` or ``from x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & siblings) - {path.stem}


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (module → modules it imports) as a path that ends where it starts, or None."""
    done, on_path = set(), []

    def visit(name: str) -> list[str] | None:
        if name in on_path:
            return on_path[on_path.index(name):] + [name]
        if name in done:
            return None
        on_path.append(name)
        for child in sorted(graph[name]):
            if circle := visit(child):
                return circle
        on_path.pop()
        done.add(name)
        return None

    return next((c for name in sorted(graph) if (c := visit(name))), None)


def test_the_circle_finder_finds_one():
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b"}, "b": set()}) is None


def test_benchmark_scripts_import_no_circle():
    scripts = {p.stem: p for p in BENCHMARKS.glob("*.py")}
    graph = {name: sibling_imports(path, set(scripts)) for name, path in scripts.items()}
    assert graph["memory_8b"] >= {"memory_cells", "model_shapes"}  # the scan sees function-level imports
    assert import_circle(graph) is None, " → ".join(import_circle(graph))
