"""The package's import graph: no cycles (a tiny AST walk, every import counted, also those inside
functions), and `import fasc` never imports Streamlit (an optional extra: the app is `fasc.app`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fasc"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, from the source alone."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:  # `from a import b`: the submodule a.b if there is one, else a
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    if target in files:
                        deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_graph_sees_the_package():
    g = import_graph()
    assert {"fasc", "fasc.cli", "fasc.app.ui", "fasc.demo.train"} <= set(g)
    assert "fasc.export" in g["fasc.loading"] and "fasc.app.state" in g["fasc.app.ui"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_import_fasc_does_not_import_streamlit():
    code = ("import sys, fasc, fasc.cli, fasc.pipeline, fasc.comparison, fasc.plots\n"
            "assert 'streamlit' not in sys.modules, 'streamlit imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_library_modules_do_not_import_streamlit():
    """Only the app package names Streamlit (the source check behind the runtime one above)."""
    offenders = []
    for p in PACKAGE.rglob("*.py"):
        if "app" in p.relative_to(PACKAGE).parts[:1]:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [str(p) for n in names if n.split(".")[0] == "streamlit"]
    assert not offenders, offenders
