"""Regions of interest (shapes elements) brought into a labels element's pixel space."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.affinity import affine_transform
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from .._validation import require_key


def region_in_labels_space(sdata: SpatialData, region_key: str, labels_key: str) -> shapely.Geometry:
    """Union of the geometries of ``sdata.shapes[region_key]`` in the pixel coordinates of ``labels_key``.

    Circles (points with a ``radius`` column, as spatialdata stores Visium spots) become discs.
    """
    shapes = require_key(sdata, "shapes", region_key)
    labels = require_key(sdata, "labels", labels_key)
    shape_cs = get_transformation(shapes, get_all=True)
    label_cs = get_transformation(labels, get_all=True)
    common = [cs for cs in shape_cs if cs in label_cs]
    if not common:
        raise ValueError(
            f"Shapes {region_key!r} (coordinate systems {sorted(shape_cs)}) and labels {labels_key!r} "
            f"({sorted(label_cs)}) share no coordinate system; expected at least one in common."
        )
    cs = "global" if "global" in common else common[0]
    to_cs = shape_cs[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    from_cs = np.linalg.inv(label_cs[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
    matrix = from_cs @ to_cs
    geoms = shapes.geometry.to_numpy()
    if "radius" in shapes.columns:
        radius = shapes["radius"].to_numpy(dtype=float)
        geoms = shapely.buffer(geoms, radius, quad_segs=16)
    if geoms.size == 0:
        raise ValueError(f"Shapes {region_key!r} hold no geometry; expected at least one region.")
    params = [matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]]
    return affine_transform(shapely.union_all(geoms), params)


def cells_in_region(centroids_xy: np.ndarray, region: shapely.Geometry) -> np.ndarray:
    """Boolean mask of the centroids (x, y) that fall inside ``region``."""
    centroids_xy = np.asarray(centroids_xy, dtype=float)
    return shapely.contains_xy(region, centroids_xy[:, 0], centroids_xy[:, 1])
