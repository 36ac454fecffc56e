from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", default=False, help="also run tests that need a CUDA GPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        return
    skip_gpu = pytest.mark.skip(reason="needs --gpu")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # keywords would also match a test or parameter id
            item.add_marker(skip_gpu)
