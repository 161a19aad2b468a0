"""The merge-method registry: a method's signature is its schema, and its facts replace name tests."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import warmstart
from warmstart.errors import ConfigError
from warmstart.merge import REGISTRY, get_method, merge_tensors

SRC = Path(warmstart.__file__).parent


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_declared_params_are_the_function_signature(name):
    m = REGISTRY[name]
    sig = inspect.signature(m.impl)
    kw = {p.name.rstrip("_"): p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert m.defaults == kw
    assert list(sig.parameters)[:3] == ["tensors", "base", "weights"]
    assert m.seeded == ("seed" in kw) and m.sparsifies == ("density" in kw)


def test_unknown_parameter_refused_naming_it():
    t = [torch.ones(4), torch.zeros(4)]
    with pytest.raises(ConfigError, match=r"'ties' has no parameter\(s\) \['bogus'\]") as e:
        merge_tensors("ties", t, torch.zeros(4), [0.5, 0.5], bogus=1)
    assert "density" in e.value.hint


def test_keyword_parameter_reaches_the_function():
    t, b = [torch.full((3,), 2.0)], torch.zeros(3)
    out = merge_tensors("task_arithmetic", t, b, [1.0], **{"lambda": 0.25})  # θ₀ + λ·w·δ
    assert torch.equal(out, torch.full((3,), 0.5))


def test_a_function_without_a_schema_cannot_register():
    from warmstart.merge.methods import register

    with pytest.raises(TypeError, match="fn\\(tensors, base, weights"):
        register("bad", "https://example.org", needs_base=False)(lambda tensors, base, weights, **kw: tensors[0])


def test_facts():
    assert get_method("linear").base_is_input and get_method("linear").factor_space
    assert {n for n, m in REGISTRY.items() if m.factor_space} == {"linear", "task_arithmetic"}
    assert get_method("slerp").points == 2 and "t" in get_method("slerp").mergekit_requires
    assert all(m.needs_base for m in REGISTRY.values() if m.task_vectors)
    with pytest.raises(ConfigError, match="needs a base"):
        merge_tensors("ties", [torch.ones(2)], None, [1.0])


def _names_compared(tree: ast.AST) -> list[tuple[int, str]]:
    """Method names used in ==, !=, in, not in, or .startswith() — string tests the registry should answer."""
    names, hits = set(REGISTRY), []

    def consts(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [c for e in node.elts for c in consts(e)]
        return []

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for o in node.ops):
            for side in [node.left, *node.comparators]:
                hits += [(node.lineno, c) for c in consts(side) if c in names]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "startswith":
            hits += [(node.lineno, c) for a in node.args for c in consts(a)
                     if any(n.startswith(c) for n in names)]
    return hits


def test_no_method_name_compared_outside_the_registry():
    found = []
    for p in SRC.rglob("*.py"):
        if p.parent.name == "merge" and p.name in ("methods.py", "methods_more.py"):
            continue
        found += [f"{p.relative_to(SRC)}:{line} {name!r}" for line, name in _names_compared(ast.parse(p.read_text()))]
    assert not found, found


def test_cli_lists_the_registry(cli):
    r = cli("merge", "--list-methods")
    assert r.code == 0, r.err
    for name, m in REGISTRY.items():
        assert f"{name}: {m.doc}" in r.out
    assert "density=1.0, normalize=True, lambda=1.0, tie_break='position'" in r.out  # ties, from its signature
