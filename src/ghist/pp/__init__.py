"""ghist.pp."""

from ._reference import reference_profiles
from ._segment import segment_nuclei
from ._tiles import TileSet, make_tiles

__all__: list[str] = ["TileSet", "make_tiles", "reference_profiles", "segment_nuclei"]
