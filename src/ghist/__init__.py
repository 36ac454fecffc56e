"""ghist: single-cell spatial gene expression from H&E histology, for SpatialData."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import (
    _logging,  # noqa: F401  (sets up the "ghist" logger)
    datasets,
    pl,
    pp,
    tl,
)

try:
    __version__ = version("ghist")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["GHISTModel", "__version__", "datasets", "pl", "pp", "tl"]


def __getattr__(name: str):
    # The model pulls in torch and Lightning: load it only when asked for.
    if name == "GHISTModel":
        from ._model import GHISTModel

        return GHISTModel
    raise AttributeError(f"module 'ghist' has no attribute {name!r}")
