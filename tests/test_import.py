"""``import ghist`` and ``ghist --help`` stay light: heavy dependencies load inside the functions that need them.

Each check runs in a fresh interpreter, since this test session has long since imported everything. How long the
imports take is measured by ``benchmarks/import_time.py`` (timings are too noisy for a unit test).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "lightning", "scanpy", "squidpy", "lifelines", "matplotlib")

_REPORT = "import json, sys; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"


def _loaded_after(code: str) -> list[str]:
    script = code + "\n" + _REPORT.format(heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import ghist", id="import ghist"),
        # The subpackages are imported by ``import ghist``; listed so that a lazy package could not hide them.
        pytest.param("import ghist.pp, ghist.tl, ghist.pl, ghist.datasets, ghist.models", id="subpackages"),
    ],
)
def test_import_is_light(code):
    assert _loaded_after(code) == []


def test_cli_help_is_light():
    code = (
        "import contextlib, io, ghist._cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    ghist._cli.main(['--help'])"
    )
    assert _loaded_after(code) == []


def test_cli_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "ghist._cli", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "demo" in out
