"""How long ``import ghist`` and ``ghist --help`` take, relative to ``import spatialdata``.

The target is at most 1.3x ``import spatialdata`` for both: ghist's own modules and their light dependencies
should add little to the SpatialData stack every user loads anyway; torch, Lightning, scanpy, squidpy, lifelines
and matplotlib load inside the functions that need them.

Each command runs in a fresh interpreter, so nothing is cached in ``sys.modules``; the commands take turns
(round robin) so that a busy machine slows all of them alike, and each figure is the median of ``--repeats``
runs. The time of a bare interpreter (``python -c pass``) is subtracted before taking the ratios.

    python benchmarks/import_time.py                  # 7 runs each
    python benchmarks/import_time.py --repeats 15 --max-ratio 1.3   # exit 1 if a ratio is above 1.3

The first round is a warm-up (file-system cache) and is not counted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _help_command() -> list[str]:
    """The ``ghist`` console script of this interpreter's environment, else ``python -m ghist._cli``."""
    script = Path(sys.executable).parent / "ghist"
    if script.exists():
        return [str(script), "--help"]
    found = shutil.which("ghist")
    return [found, "--help"] if found else [sys.executable, "-m", "ghist._cli", "--help"]


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each command (median reported)")
    parser.add_argument("--max-ratio", type=float, default=None, help="exit 1 if a ratio exceeds this")
    args = parser.parse_args(argv)

    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import spatialdata": [sys.executable, "-c", "import spatialdata"],
        "import ghist": [sys.executable, "-c", "import ghist"],
        "ghist --help": _help_command(),
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(args.repeats + 1):
        for name, cmd in commands.items():
            elapsed = _run(cmd)
            if round_:
                times[name].append(elapsed)
    median = {name: statistics.median(t) for name, t in times.items()}
    bare = median["python -c pass"]
    reference = median["import spatialdata"] - bare

    print(f"median of {args.repeats} runs, fresh interpreter each; net = minus a bare interpreter ({bare:.3f} s)")
    print(f"{'command':<22}{'wall s':>9}{'net s':>9}{'ratio':>8}")
    worst = 0.0
    for name in commands:
        if name == "python -c pass":
            continue
        net = median[name] - bare
        ratio = net / reference
        if name != "import spatialdata":
            worst = max(worst, ratio)
        print(f"{name:<22}{median[name]:>9.3f}{net:>9.3f}{ratio:>8.2f}")
    print(f"ghist_ratio_max={worst:.2f}")
    if args.max_ratio is not None and worst > args.max_ratio:
        print(f"FAIL: ratio {worst:.2f} > {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
