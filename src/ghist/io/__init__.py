"""ghist.io: slide files into SpatialData."""

from ._backends import SlideReadError
from ._wsi import read_wsi

__all__ = ["SlideReadError", "read_wsi"]
