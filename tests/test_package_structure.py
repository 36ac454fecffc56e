"""The package's conventions, checked on every public function, and the boundaries between modules."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import ghist

SUBPACKAGES = [ghist.pp, ghist.tl, ghist.pl, ghist.datasets, ghist.models]
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
    params = inspect.signature(func).parameters
    # numpydoc has no empty sections: a function without parameters has no Parameters section
    for section in ("Parameters", "Returns", "Examples") if params else ("Returns", "Examples"):
        assert f"{section}\n---" in doc, f"{func.__qualname__} lacks a {section} section"
    documented = documented_parameters(doc)
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        assert name in documented, f"{func.__qualname__}: parameter {name!r} has no entry in its Parameters section"


_SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}\s*$", re.MULTILINE)


def documented_parameters(doc: str) -> set[str]:
    """The names a numpy docstring's Parameters section has an entry for (``name : type`` or ``a, b : type`` lines).

    An entry is an unindented line of the section; the lines under it (its description) are indented. A name that
    only appears in another parameter's description is not documented.
    """
    headers = list(_SECTION.finditer(doc))
    for i, header in enumerate(headers):
        if header.group(1) != "Parameters":
            continue
        end = headers[i + 1].start() if i + 1 < len(headers) else len(doc)
        names = set()
        for line in doc[header.end() : end].splitlines():
            if not line.strip() or line[0].isspace():
                continue
            names.update(n.strip().lstrip("*") for n in line.split(" : ")[0].split(","))
        return names
    return set()


def test_documented_parameters_reads_entries_not_words():
    doc = inspect.cleandoc(
        """Summary.

        Parameters
        ----------
        sdata : SpatialData
            The data; see ``key`` below.
        a, b : int
            Two at once.
        *args
            Extra positional arguments.
        flag
            No type.

        Returns
        -------
        key : str
            Not a parameter.
        """
    )
    assert documented_parameters(doc) == {"sdata", "a", "b", "args", "flag"}
    assert documented_parameters("Summary.\n\nReturns\n-------\nint\n    A number.") == set()


# ------------------------------------------------------------------------------------------ package boundaries
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ghist"
MAX_LINES = 700
# Benchmarks of internals the public API has no switch for, and the private modules each may use: the network
# benchmarks time the network itself, which is private by design; tile_reads.py sweeps predict's own tile grid with
# the chunk cache on and off.
_NETWORK = ("ghist._model",)
INTERNAL_BENCHMARKS = {
    "forward.py": _NETWORK,
    "train_step.py": _NETWORK,
    "_common.py": _NETWORK,
    "tile_reads.py": ("ghist._model", "ghist._chunk_cache", "ghist._validation", "ghist.tl._predict"),
}
FUNCTION_PACKAGES = ("pp", "tl", "pl")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_ghist_names(tree: ast.AST) -> set[str]:
    """``ghist._x...`` modules imported, and ``ghist._x`` attributes used, in a parsed file."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ghist":
            modules = [f"ghist.{node.attr}"]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "ghist" and any(_is_private(p) for p in parts[1:]):
                found.add(module)
    return found


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Absolute module of a (possibly relative) ``from ... import`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_source_file_too_long():
    long = {
        str(p.relative_to(ROOT)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by job (at most {MAX_LINES} lines): {long}"


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "scripts").glob("*.py")), ROOT / "docs" / "conf.py"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_scripts_use_public_api(path):
    names = _private_ghist_names(ast.parse(path.read_text()))
    allowed = INTERNAL_BENCHMARKS.get(path.name, ()) if path.parent.name == "benchmarks" else ()
    names = {n for n in names if not any(n == a or n.startswith(f"{a}.") for a in allowed)}
    assert not names, f"{path.name} uses private ghist names {sorted(names)}; use (or add) public API"


# the documentation's sources only, not what a docs build writes next to them
DOC_SOURCES = sorted(p for p in (ROOT / "docs").rglob("*.md") if not {"_build", "generated"} & set(p.parts))


@pytest.mark.parametrize("path", DOC_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_use_public_api(path):
    hits = sorted(set(re.findall(r"\bghist\._[A-Za-z]\w*", path.read_text())))
    assert not hits, f"{path.name} uses private ghist names {hits}; use (or add) public API"


@pytest.mark.parametrize(
    "path",
    sorted(p for pkg in FUNCTION_PACKAGES for p in (SRC / pkg).rglob("*.py")),
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_no_private_imports_between_pp_tl_pl(path):
    """``pp``, ``tl`` and ``pl`` share code through neutral private modules (``ghist._x``), not each other's."""
    module = ".".join(("ghist", *path.relative_to(SRC).with_suffix("").parts))
    is_package = path.name == "__init__.py"
    module = module.removesuffix(".__init__")
    own = module.split(".")[1]
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if (
                len(parts) > 2
                and parts[0] == "ghist"
                and parts[1] in FUNCTION_PACKAGES
                and parts[1] != own
                and _is_private(parts[2])
            ):
                bad.append(f"line {node.lineno}: {'.'.join(parts[:3])}")
                break
    assert not bad, f"{module} imports private code of another subpackage: {bad}"


# ------------------------------------------------------------------------------------------ self-contained docs
# A reader of the package has its sources and docs only: no pointers to design notes or trackers outside them.
_OUTSIDE_REFERENCE = re.compile(r"\bDESIGN\b|\bDESIGN\.md|\bSTYLE\.md|\bSTYLE section|\b[Ii]ssue \d+, item \d+")
_TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".ipynb", ".json"}


def _own_text_files() -> list[Path]:
    roots = (SRC, ROOT / "docs")
    return sorted(
        p
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and p.suffix in _TEXT_SUFFIXES and not {"_build", "generated", "__pycache__"} & set(p.parts)
    )


def test_no_references_outside_the_repository():
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}"
        for p in _own_text_files()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if _OUTSIDE_REFERENCE.search(line)
    ]
    assert not hits, "explain in the repository's own words (docs/method.md) instead of citing:\n" + "\n".join(hits)
    assert _OUTSIDE_REFERENCE.search('GHIST losses (DESIGN section 3, "Losses")')  # the pattern catches the old form
    assert not _OUTSIDE_REFERENCE.search("Visium / ST spots have gaps by design")


# ------------------------------------------------------------------------------------------ adding to a SpatialData
# One write convention (ARCHITECTURE.md, "Adding to a SpatialData"): element under `key_added`, `overwrite=False`,
# added through `ghist._write.write_element`, and what was added returned.
_WRITER_PACKAGES = [ghist.pp, ghist.tl, ghist.io, ghist.datasets]
WRITERS = [
    pytest.param(getattr(mod, name), id=f"{mod.__name__}.{name}")
    for mod in _WRITER_PACKAGES
    for name in mod.__all__
    if inspect.isfunction(getattr(mod, name))
    and any(p == "key_added" or p.startswith("key_added_") for p in inspect.signature(getattr(mod, name)).parameters)
]


def test_write_convention_covers_the_writers():
    names = {p.id for p in WRITERS}
    for name in ("segment_nuclei", "detect_tissue", "make_tiles", "prepare_xenium"):
        assert f"ghist.pp.{name}" in names
    for name in ("predict", "aggregate_to_spots", "evaluate"):
        assert f"ghist.tl.{name}" in names


@pytest.mark.parametrize("func", WRITERS)
def test_write_convention(func):
    from ghist import _constants

    name, params = func.__qualname__, inspect.signature(func).parameters
    see = "see ARCHITECTURE.md, 'Adding to a SpatialData'"
    overwrite = params.get("overwrite")
    assert overwrite is not None, f"{name} has `key_added` but no `overwrite`; {see}"
    assert overwrite.kind is overwrite.KEYWORD_ONLY, f"{name}(overwrite) must be keyword-only"
    assert overwrite.default is False, f"{name}(overwrite) must default to False"
    names = {v for k, v in vars(_constants).items() if k.isupper() and isinstance(v, str)}
    for p in params.values():
        if p.name == "key_added" or p.name.startswith("key_added_"):
            assert p.default is None or p.default in names, f"{name}({p.name}): default not named in _constants.py"
    returns = str(inspect.signature(func).return_annotation)
    if "sdata" in params:  # adds to a SpatialData: returns what it added, never None, and has no copy=
        assert "copy" not in params, f"{name}: `copy=` is for AnnData functions only; {see}"
        returned = set(returns.split(" | "))
        assert not returned & {"None", "inspect._empty"}, f"{name} must return what it added, not {returns}; {see}"
        if "inplace" in params:
            assert params["inplace"].default is False
    else:  # a function of an AnnData (scanpy): copy=False modifies it, copy=True returns a modified copy
        assert "copy" in params, f"{name}: a function of an AnnData with `key_added` takes scanpy's `copy=`"


# the write sites of the package; anything else that assigns into a SpatialData builds its own new object
_OWN_OBJECTS = {
    "datasets/_registry.py",  # builds the SpatialData it returns
    "_cli.py",  # the demo's in-memory test slide
    "tl/_cohort.py",  # a scratch SpatialData per slide, never the user's
}
_ELEMENT_KINDS = {"images", "labels", "shapes", "points", "tables"}


def _direct_element_writes(tree: ast.AST) -> list[int]:
    """Lines that assign or delete ``<x>.<kind>[...]`` or call ``<x>.write_element(...)``."""
    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else []
        for target in targets:
            if (
                isinstance(target, ast.Subscript)
                and not isinstance(target.slice, ast.Slice)  # a slice of an array, not an element
                and isinstance(target.value, ast.Attribute)
                and target.value.attr in _ELEMENT_KINDS
            ):
                lines.append(node.lineno)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("write_element", "delete_element_from_disk")
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_one_writer():
    """Elements reach a user's SpatialData only through `ghist._write.write_element` (memory and store, atomic)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in _OWN_OBJECTS | {"_write.py"} or rel.startswith("datasets/"):
            continue
        for line in _direct_element_writes(ast.parse(path.read_text())):
            bad.append(f"{rel}:{line}")
    assert not bad, f"write through ghist._write.write_element instead: {bad}"
    example = "sdata.tables['a'] = t\ndel sdata.labels['b']\nsdata.write_element('c')\n" + (
        "x = sdata.tables['a']\nstore.images[0:2] = tiles"  # reads, and slices of arrays, are not element writes
    )
    assert _direct_element_writes(ast.parse(example)) == [1, 2, 3]
