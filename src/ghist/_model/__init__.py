"""The GHIST network, its Lightning module and the user-facing model (private)."""

from ._model import GHISTModel

__all__ = ["GHISTModel"]
