"""ARCHITECTURE.md tells the truth about the code: its module table and its rules name things that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ghist"
TEXT = (ROOT / "ARCHITECTURE.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?\n(.*?)(?=^## |\Z)", TEXT, re.S | re.M)
    assert match, f"ARCHITECTURE.md has no '## {title}' section"
    return match.group(1)


def _first_column(section: str) -> list[str]:
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [cells[0].strip() for cells in rows if not set(cells[0].strip()) <= {"-"} and cells[0].strip() != "module"]


def _module_entries() -> list[str]:
    entries = []
    for cell in _first_column(_section("Modules")):
        entries += re.findall(r"`([^`]+)`", cell)
    return entries


def _covered(entry: str) -> list[Path]:
    return sorted(SRC.glob(entry)) if "*" in entry else ([SRC / entry] if (SRC / entry).exists() else [])


def test_every_module_in_the_table_exists():
    missing = [entry for entry in _module_entries() if not _covered(entry)]
    assert not missing, f"ARCHITECTURE.md's module table names modules that do not exist: {missing}"


def test_every_module_is_in_the_table():
    covered: set[Path] = set()
    for entry in _module_entries():
        for path in _covered(entry):
            covered.update(path.rglob("*.py") if path.is_dir() else [path])
        if entry.endswith("/*"):  # a whole subpackage
            covered.update((SRC / entry[:-2]).rglob("*.py"))
    modules = {p for p in SRC.rglob("*.py") if p.name != "__init__.py" and "data" not in p.relative_to(SRC).parts}
    absent = sorted(str(p.relative_to(SRC)) for p in modules - covered)
    assert not absent, f"add these modules to ARCHITECTURE.md's module table (one row each, its one job): {absent}"


def _top_level_names(path: Path) -> set[str]:
    """Classes, functions and assigned names at a module's top level (inside a top-level ``try`` too)."""
    tree = ast.parse(path.read_text())
    body = [n for top in tree.body for n in ([top, *top.body, *top.handlers] if isinstance(top, ast.Try) else [top])]
    return _names_of(body)


def _names_of(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_rules_name_code_that_exists():
    """Every ``module.name`` of the rules table's "the one place" column is defined in that module."""
    section = _section("Where each rule lives")
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    wrong = []
    for cells in rows:
        if len(cells) < 3:
            continue
        for ref in re.findall(r"`([\w/]+)\.(\w+)`", cells[1]):
            module, name = ref
            path = SRC / f"{module}.py"
            if name == "py":
                path = SRC / f"{module}.py"
                if not (path.exists() or (ROOT / f"{module}.py").exists()):
                    wrong.append(f"{module}.py")
                continue
            if not path.exists():
                continue  # a class attribute (``GHISTModel._to_state``) or prose, not a module path
            if name not in _top_level_names(path):
                wrong.append(f"{module}.{name}")
    assert not wrong, f"ARCHITECTURE.md's rules name code that is not there: {wrong}"


def _defined_names(path: Path) -> set[str]:
    """Every class, function (methods too) and assigned name of a module."""
    return _names_of(ast.walk(ast.parse(path.read_text())))


def test_names_after_a_module_are_in_it():
    """In "the one place", a bare name after a module's (`_validation.check_int`, `check_number`) is defined there."""
    section = _section("Where each rule lives")
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    wrong = []
    for cells in rows[2:]:
        module = None
        for token in re.findall(r"`([^`]+)`", cells[1]):
            ref = re.fullmatch(r"([\w/]+)\.(\w+)", token)
            if ref:
                path = SRC / f"{ref.group(1)}.py"  # `a/b.name` and `a/b.py` alike
                module = path if path.exists() else None
            elif re.fullmatch(r"\w+", token) and module is not None:
                if token not in _defined_names(module):
                    wrong.append(f"{module.relative_to(SRC)}: {token}")
            else:
                module = None
    assert not wrong, f"ARCHITECTURE.md's rules name code that is not in the module named before it: {wrong}"


def _module_string_constants(path: Path) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments of a source file (also inside a module-level ``if``/``try``)."""
    found = {}
    nodes = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If | ast.Try):
            nodes += [*node.body, *node.orelse, *getattr(node, "handlers", []), *getattr(node, "finalbody", [])]
        elif isinstance(node, ast.ExceptHandler):
            nodes += node.body
        elif isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if isinstance(node.value.value, str):
                found.update({t.id: node.value.value for t in targets if isinstance(t, ast.Name)})
    return found


def test_keys_and_prefixes_live_in_constants():
    """A name a user's data (or a file ghist writes) carries is written once, in ``_constants.py``."""
    misplaced = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_constants.py":
            continue
        for name in _module_string_constants(path):
            if name.endswith(("_KEY", "_PREFIX")):
                misplaced.append(f"{path.relative_to(SRC)}: {name}")
    assert not misplaced, f"move these to src/ghist/_constants.py and import them: {misplaced}"


def test_the_constants_check_sees_what_it_should(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        'A_KEY = "a"\n_B_PREFIX: str = "b:"\nif True:\n    C_KEY = "c"\nN_KEY = 3\n\ndef f():\n    D_KEY = "d"\n'
    )
    assert _module_string_constants(source) == {"A_KEY": "a", "_B_PREFIX": "b:", "C_KEY": "c"}


def _isinstance_types(node: ast.AST) -> tuple[str, set[str]] | None:
    """``(argument, type names)`` of an ``isinstance(name, types)`` call, else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"):
        return None
    if len(node.args) != 2 or not isinstance(node.args[0], ast.Name):
        return None
    types = {
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node.args[1])
        if isinstance(n, ast.Name | ast.Attribute)
    }
    return node.args[0].id, types


def _hand_written_int_checks(path: Path) -> set[str]:
    """Arguments checked as "an integer, not a bool, compared with a bound" by hand instead of by ``check_int``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.BoolOp):
            continue
        calls = [c for v in node.values for n in ast.walk(v) if (c := _isinstance_types(n)) is not None]
        bounded = any(isinstance(n, ast.Compare) for v in node.values for n in ast.walk(v))
        no_bool = {name for name, types in calls if "bool" in types}
        ints = {
            name for name, types in calls if types & {"int", "Integral", "integer"} and not types & {"float", "Real"}
        }
        if bounded:
            found |= no_bool & ints
    return found


# Hand-written checks allowed, by module (none now; an entry needs a reason beside it).
_KNOWN_INT_CHECKS: dict[str, set[str]] = {}


def test_integer_arguments_are_checked_by_check_int():
    """The rules table: "a numeric argument is an integer >= n" lives in ``_validation.check_int``."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = str(path.relative_to(SRC))
        if module != "_validation.py":
            extra = _hand_written_int_checks(path) - _KNOWN_INT_CHECKS.get(module, set())
            wrong += [f"{module}: {name}" for name in sorted(extra)]
    assert not wrong, f"use `_validation.check_int` for these hand-written integer checks: {wrong}"


def test_the_int_check_finder_sees_what_it_should(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "if isinstance(a, bool) or not isinstance(a, int | np.integer) or a < 1:\n    pass\n"
        "if isinstance(b, bool) or not isinstance(b, int | float) or b <= 0:\n    pass\n"  # a number: check_number
        "if isinstance(c, int) and not isinstance(c, bool):\n    pass\n"  # a type dispatch, no bound
    )
    assert _hand_written_int_checks(source) == {"a"}


def _module_level_imports(path: Path) -> set[str]:
    """Package modules ``path`` imports when it loads (not inside functions, not under ``if TYPE_CHECKING``)."""
    package = ["ghist", *path.relative_to(SRC).parent.parts]
    found = set()
    nodes = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                nodes += [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            nodes += [*node.body, *node.orelse, *node.finalbody, *(n for h in node.handlers for n in h.body)]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {f"{module}.{a.name}" for a in node.names} if not node.module else {module}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found |= {n for n in names if n and n.startswith("ghist")}
    return found


def test_the_model_package_loads_only_when_used():
    """ARCHITECTURE.md: outside ``_model/`` only ``_model/_spec.py`` is imported when a module loads."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        if "_model" in path.relative_to(SRC).parts[:1]:
            continue
        for module in _module_level_imports(path):
            if module.startswith("ghist._model") and module != "ghist._model._spec":
                wrong.append(f"{path.relative_to(SRC)} imports {module}")
    assert not wrong, f"import these inside the functions that need them: {wrong}"


def test_version_is_a_leaf():
    """``_version.py`` imports nothing of the package, as the module table says."""
    assert not {m for m in _module_level_imports(SRC / "_version.py") if m.startswith("ghist")}


def test_torch_files_are_read_in_one_place():
    """Every ``torch.load`` is ``_model/_safe_load.safe_torch_load``'s (``weights_only=True``, failures named)."""
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
                calls.append(str(path.relative_to(SRC)))
    assert calls == ["_model/_safe_load.py"], f"read torch files with `safe_torch_load`, not torch.load: {calls}"
