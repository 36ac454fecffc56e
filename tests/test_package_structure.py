"""The conventions of STYLE.md, checked on every public function."""

from __future__ import annotations

import inspect

import pytest

import ghist

SUBPACKAGES = [ghist.pp, ghist.tl, ghist.pl, ghist.datasets]
PUBLIC = [
    pytest.param(getattr(mod, name), id=f"{mod.__name__}.{name}")
    for mod in SUBPACKAGES
    for name in mod.__all__
    if inspect.isfunction(getattr(mod, name))
]


def test_public_names_resolve():
    for mod in SUBPACKAGES:
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"
            assert not name.startswith("_")
    assert ghist.GHISTModel.__name__ == "GHISTModel"
    assert ghist.__version__


@pytest.mark.parametrize("func", PUBLIC)
def test_signature_conventions(func):
    params = list(inspect.signature(func).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{func.__qualname__}: at most 3 positional parameters"
    for p in params:
        if p.name in {"key_added", "copy", "overwrite", "progress", "inplace"}:
            assert p.kind is p.KEYWORD_ONLY, f"{func.__qualname__}({p.name}) must be keyword-only"


@pytest.mark.parametrize("func", PUBLIC)
def test_docstrings(func):
    doc = inspect.getdoc(func)
    assert doc, f"{func.__qualname__} has no docstring"
    for section in ("Parameters", "Returns", "Examples"):
        assert f"{section}\n---" in doc, f"{func.__qualname__} lacks a {section} section"
    for name in inspect.signature(func).parameters:
        if name in ("kwargs", "args"):
            continue
        assert name in doc, f"{func.__qualname__}: parameter {name!r} is not documented"
