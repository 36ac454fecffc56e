"""ghist.io: slide files and nucleus outlines into SpatialData, predicted cells out to QuPath."""

from ._backends import SlideReadError
from ._nuclei import read_nuclei
from ._qupath import write_qupath
from ._slide_store import open_slide_store
from ._wsi import read_wsi

__all__ = ["SlideReadError", "open_slide_store", "read_nuclei", "read_wsi", "write_qupath"]
