"""ghist.pp."""

from ._annotate import annotate_cell_types
from ._reference import reference_profiles
from ._segment import segment_nuclei
from ._tiles import make_tiles
from ._tileset import TileSet
from ._xenium import prepare_xenium

__all__: list[str] = [
    "TileSet",
    "annotate_cell_types",
    "make_tiles",
    "prepare_xenium",
    "reference_profiles",
    "segment_nuclei",
]
