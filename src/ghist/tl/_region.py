"""Regions of interest (shapes elements) brought into a labels element's pixel space."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.affinity import affine_transform
from spatialdata import SpatialData

from .._spatial import element_affine
from .._validation import require_key


def region_in_labels_space(sdata: SpatialData, roi_key: str, labels_key: str) -> shapely.Geometry:
    """Union of the geometries of ``sdata.shapes[roi_key]`` in the pixel coordinates of ``labels_key``.

    Circles (points with a ``radius`` column, as spatialdata stores Visium spots) become discs.
    """
    shapes = require_key(sdata, "shapes", roi_key)
    require_key(sdata, "labels", labels_key)
    matrix = element_affine(sdata, roi_key, labels_key)
    geoms = shapes.geometry.to_numpy()
    if "radius" in shapes.columns:
        radius = shapes["radius"].to_numpy(dtype=float)
        geoms = shapely.buffer(geoms, radius, quad_segs=16)
    if geoms.size == 0:
        raise ValueError(f"Shapes {roi_key!r} hold no geometry; expected at least one region.")
    params = [matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]]
    return affine_transform(shapely.union_all(geoms), params)


def cells_in_region(centroids_xy: np.ndarray, region: shapely.Geometry) -> np.ndarray:
    """Boolean mask of the centroids (x, y) that fall inside ``region``."""
    centroids_xy = np.asarray(centroids_xy, dtype=float)
    return shapely.contains_xy(region, centroids_xy[:, 0], centroids_xy[:, 1])
