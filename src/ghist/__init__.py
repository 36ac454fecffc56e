"""ghist: single-cell spatial gene expression from H&E histology, for SpatialData."""

from __future__ import annotations

# The subpackages load eagerly (so ``ghist.pp`` and friends tab-complete); what makes them heavy (torch, matplotlib,
# lifelines, ...) loads inside the functions that need it, which tests/test_import.py guards.
from . import (
    _logging,  # noqa: F401  (sets up the "ghist" logger)
    datasets,
    io,
    models,
    pl,
    pp,
    tl,
)
from ._version import __version__

__all__ = ["GHISTModel", "__version__", "datasets", "io", "models", "pl", "pp", "tl"]


def __getattr__(name: str):
    # The model pulls in torch and Lightning: load it only when asked for.
    if name == "GHISTModel":
        from ._model import GHISTModel

        return GHISTModel
    raise AttributeError(f"module 'ghist' has no attribute {name!r}")
