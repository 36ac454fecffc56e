"""Regions of interest (shapes elements) brought into a labels element's pixel space."""

from __future__ import annotations

import numpy as np
import shapely
from spatialdata import SpatialData

from .._spatial import region_in_pixels
from .._validation import require_key


def region_in_labels_space(sdata: SpatialData, roi_key: str, labels_key: str) -> shapely.Geometry:
    """Union of the geometries of ``sdata.shapes[roi_key]`` in the pixel coordinates of ``labels_key``.

    Circles (points with a ``radius`` column, as spatialdata stores Visium spots) become discs.
    """
    require_key(sdata, "labels", labels_key)
    return region_in_pixels(sdata, roi_key, labels_key)


def cells_in_region(centroids_xy: np.ndarray, region: shapely.Geometry) -> np.ndarray:
    """Boolean mask of the centroids (x, y) that fall inside ``region``."""
    centroids_xy = np.asarray(centroids_xy, dtype=float)
    return shapely.contains_xy(region, centroids_xy[:, 0], centroids_xy[:, 1])
