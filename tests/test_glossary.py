"""ARCHITECTURE.md's glossary names every public parameter, and renamed parameters keep their old names for a while."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest

import ghist
from ghist._deprecation import renamed_arguments

ROOT = Path(__file__).resolve().parents[1]
MODULES = (ghist.pp, ghist.tl, ghist.pl, ghist.io, ghist.datasets, ghist.models)


def public_callables() -> list[tuple[str, object]]:
    """Every public function, public method of a public class, and method of ``GHISTModel``, by name."""
    found = []
    for module in MODULES:
        short = module.__name__.split(".")[-1]
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                found.append((f"{short}.{name}", obj))
            elif inspect.isclass(obj):
                found += _methods(f"{short}.{name}", obj)
    return found + _methods("GHISTModel", ghist.GHISTModel)


def _methods(prefix: str, cls: type) -> list[tuple[str, object]]:
    return [
        (f"{prefix}.{name}", member)
        for name, member in inspect.getmembers(cls, lambda m: inspect.isfunction(m) or inspect.ismethod(m))
        if not name.startswith("_") or name == "__init__"
    ]


def public_parameters() -> dict[str, list[str]]:
    """Parameter name -> where it appears (``self``, and bare ``*args``/``**kwargs``, left out)."""
    uses: dict[str, list[str]] = {}
    for where, func in public_callables():
        for p in inspect.signature(func).parameters.values():
            if p.name in ("self", "cls", "args", "kwargs"):
                continue
            uses.setdefault(p.name, []).append(where)
    return uses


def glossary(text: str | None = None) -> tuple[set[str], set[str]]:
    """(names, deprecated aliases) of the table under ARCHITECTURE.md's "Glossary" heading."""
    text = (ROOT / "ARCHITECTURE.md").read_text() if text is None else text
    match = re.search(r"^## Glossary.*?\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "ARCHITECTURE.md has no '## Glossary' section"
    names, aliases = set(), set()
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= {"-"} or cells[0] == "name":
            continue
        names.update(re.findall(r"`(\w+)`", cells[0]))
        aliases.update(re.findall(r"`(\w+)`", cells[-1]))
    return names, aliases


def test_glossary_parser():
    text = (
        "## Glossary\n\n| name | means | aliases |\n|---|---|---|\n| `a`, `b` | x `c` | `d` (`f.g`) |\n\n"
        "## Next\n| `z` | | |"
    )
    assert glossary(text) == ({"a", "b"}, {"d"})


def test_every_public_parameter_is_in_the_glossary():
    names, aliases = glossary()
    uses = public_parameters()
    missing = {name: where[:3] for name, where in uses.items() if name not in names | aliases}
    assert not missing, f"add these parameters to ARCHITECTURE.md's glossary (or use its word): {missing}"


def test_glossary_has_no_stale_names():
    names, _ = glossary()
    stale = sorted(names - set(public_parameters()))
    assert not stale, f"ARCHITECTURE.md's glossary lists names no public parameter has any more: {stale}"


def test_renamed_parameters_are_in_the_glossary():
    names, aliases = glossary()
    renamed = [(where, func) for where, func in public_callables() if hasattr(func, "__renamed_arguments__")]
    assert renamed, "no public function uses renamed_arguments"
    for where, func in renamed:
        params = inspect.signature(func).parameters
        for old, new in func.__renamed_arguments__.items():
            assert new in params, f"{where}: {old} -> {new}"
            assert old not in params, f"{where}: {old} -> {new}"
            assert new in names, f"{where}: the glossary must list {new}"
            assert old in aliases, f"{where}: the glossary must list {old} as a deprecated alias"


def test_renamed_arguments_warns_and_forwards():
    @renamed_arguments(old="new")
    def func(*, new=1):
        """Doc."""
        return new

    assert func(new=2) == 2
    with pytest.warns(FutureWarning, match=r"func\(old=\.\.\.\)` is deprecated.*use `new=\.\.\.`"):
        assert func(old=3) == 3
    with pytest.raises(TypeError, match="both `old` and its new name `new`"):
        func(old=3, new=4)
    assert func.__doc__ == "Doc."
    assert list(inspect.signature(func).parameters) == ["new"]


def test_old_names_still_work_in_public_functions():
    result = ghist.pl.hazard_ratios  # the cheapest renamed public function to call for real
    import matplotlib.pyplot as plt
    import pandas as pd

    res = pd.DataFrame(
        {"hr": [2.0, 0.5], "ci_lower": [1.5, 0.3], "ci_upper": [2.5, 0.8], "p": [0.001, 0.2], "q": [0.002, 0.2]},
        index=["f1", "f2"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = result(res, q_highlight=0.01, show=False)
    with pytest.warns(FutureWarning, match="q_highlight"):
        old = result(res, alpha=0.01, show=False)
    assert [t.get_text() for t in new.get_legend().get_texts()] == [t.get_text() for t in old.get_legend().get_texts()]
    plt.close("all")
