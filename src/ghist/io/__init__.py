"""ghist.io: slide files into SpatialData."""

from ._wsi import read_wsi

__all__ = ["read_wsi"]
