"""The GHIST network, its Lightning module and the user-facing model (private)."""

from ._losses import ghist_losses, spot_loss
from ._model import GHISTModel
from ._network import GHISTNetwork, neighbourhood_refine, specialist_expression

__all__ = ["GHISTModel", "GHISTNetwork", "ghist_losses", "neighbourhood_refine", "specialist_expression", "spot_loss"]
