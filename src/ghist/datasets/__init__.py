"""ghist.datasets."""

from ._cohort import synthetic_cohort
from ._registry import REGISTRY, data_dir, fetch, her2st, xenium_breast_preview, xenium_breast_preview_sdata
from ._synthetic import synthetic, synthetic_reference
from ._xenium_like import synthetic_xenium

__all__ = [
    "REGISTRY",
    "data_dir",
    "fetch",
    "her2st",
    "synthetic",
    "synthetic_cohort",
    "synthetic_reference",
    "synthetic_xenium",
    "xenium_breast_preview",
    "xenium_breast_preview_sdata",
]
