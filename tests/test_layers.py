"""The package's shape, enforced: no import cycle, layers only point down, few late imports, ruff clean.

The layers themselves are import-linter's contract in pyproject.toml ([tool.importlinter]); the map with
the reasons is docs/architecture.md. Function-level imports count everywhere (grimp sees them).
"""
from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "warmstart"
MAX_LATE_INTERNAL = 15  # docs/architecture.md, "Late imports"


def _graph():
    grimp = pytest.importorskip("grimp")
    return grimp.build_graph("warmstart")


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    class G:  # a, b, c in a ring and d alone
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges.get(m, set())
    assert _cycles(G()) == [["a", "b", "c"]]


def test_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_no_module_imports_the_package_root():
    graph = _graph()
    offenders = sorted(m for m in graph.modules if m != "warmstart" and "warmstart" in
                       graph.find_modules_directly_imported_by(m))
    assert offenders == []


def _late_internal_imports() -> list[tuple[str, int, str]]:
    """Package-internal imports inside functions, below the CLI (cli/ may defer imports to keep --help fast)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0:
                continue
            internal = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(
                "warmstart"))) or (isinstance(node, ast.Import) and any(a.name.startswith("warmstart")
                                                                        for a in node.names))
            if internal:
                found.append((str(rel), node.lineno, lines[node.end_lineno - 1]))
    return found


def test_late_internal_imports_are_few_and_each_says_why():
    late = _late_internal_imports()
    assert len(late) <= MAX_LATE_INTERNAL, "\n".join(f"{f}:{n}" for f, n, _ in late)
    unexplained = [f"{f}:{n}" for f, n, line in late if "#" not in line]
    assert unexplained == []


def test_layers_contract_holds():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed")
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_is_clean():
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed")
    r = subprocess.run([exe, "check", "--no-cache", "src", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]
