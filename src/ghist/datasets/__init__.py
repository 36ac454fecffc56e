"""ghist.datasets."""

from ._registry import REGISTRY, data_dir, fetch, her2st, xenium_breast_preview, xenium_breast_preview_sdata
from ._synthetic import synthetic, synthetic_reference

__all__ = [
    "REGISTRY",
    "data_dir",
    "fetch",
    "her2st",
    "synthetic",
    "synthetic_reference",
    "xenium_breast_preview",
    "xenium_breast_preview_sdata",
]
