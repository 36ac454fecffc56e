"""The GHIST network, its Lightning module and the user-facing model (private).

The names below load on first use (they import torch); ``_spec`` alone is light, so that ``ghist.tl`` can build
fit's signature and docstring from it at import time.
"""

import importlib

_NAMES = {
    "GHISTModel": "._model",
    "GHISTNetwork": "._network",
    "neighbourhood_refine": "._network",
    "specialist_expression": "._network",
    "ghist_losses": "._losses",
    "spot_loss": "._losses",
}

__all__ = ["GHISTModel", "GHISTNetwork", "ghist_losses", "neighbourhood_refine", "specialist_expression", "spot_loss"]


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
