"""ghist.pp."""

from ._annotate import annotate_cell_types
from ._detect_tissue import detect_tissue
from ._fit_segmenter import fit_segmenter
from ._reference import reference_profiles
from ._segment import segment_nuclei
from ._segmenter_model import NucleusSegmenter
from ._tiles import make_tiles
from ._tileset import TileSet
from ._xenium import prepare_xenium

__all__: list[str] = [
    "NucleusSegmenter",
    "TileSet",
    "annotate_cell_types",
    "detect_tissue",
    "fit_segmenter",
    "make_tiles",
    "prepare_xenium",
    "reference_profiles",
    "segment_nuclei",
]
