from __future__ import annotations

import os

# Set before torch loads. Under pytest-xdist each worker's torch would use every core: on 2 cores, 2 workers run 4
# OpenMP threads that spin while they wait for each other, and a test that trains takes several times as long (5x
# for some on the 2-core development machine). So: threads that sleep while waiting, and the cores shared out among
# the workers. A value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))

import matplotlib  # noqa: E402 (after the environment above)

matplotlib.use("Agg")

import pytest  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", default=False, help="also run tests that need a CUDA GPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        return
    skip_gpu = pytest.mark.skip(reason="needs --gpu")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # keywords would also match a test or parameter id
            item.add_marker(skip_gpu)
