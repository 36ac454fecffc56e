"""Which spot holds each cell: the one rule shared by spot training, spot aggregation and spot evaluation.

By default (``overlap="nearest"``) a cell belongs to **exactly one** spot, or to none:

- the candidates are the spots whose geometry holds the cell's nucleus centroid — circles (points with a
  ``"radius"`` column, Visium / legacy ST): within ``radius`` of the centre, boundary included; polygons (e.g. the
  square bins of Visium HD read by ``spatialdata_io.visium_hd``): inside or on the boundary, up to rounding of the
  coordinates (a gap of ``1e-9`` times the coordinates' magnitude between two squares that should share an edge
  is closed);
- of several candidates (overlapping circles, a centroid on an edge shared by two squares) the one with the
  nearest centre (polygons: centroid) wins, then the one listed first in the shapes element.

With ``overlap="all"`` (:func:`spot_pairs`, :func:`ghist.tl.aggregate_to_spots`) a cell counts for every spot that
holds it instead. Training on spots and spot evaluation always use one spot per cell, so that no cell is supervised
twice.

The rule works in the spots' intrinsic coordinates (where the radius is defined): callers map the centroids there
with :func:`ghist._spatial.element_affine` first. Spot rows are positions in the shapes element, never in a table
that annotates it, so a table's order cannot change which spot a cell goes to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import shapely

__all__ = ["SPOT_OVERLAP", "SpotGeometry", "assign_to_spots", "membership_matrix", "spot_geometry", "spot_pairs"]

#: How a cell under several overlapping spots counts: for the nearest one only (default), or for all of them.
SPOT_OVERLAP = ("nearest", "all")

# Closes floating-point gaps between polygons that should share an edge, relative to the coordinates' magnitude.
_POLYGON_TOLERANCE = 1e-9
_POINT, _POLYGON, _MULTIPOLYGON = 0, 3, 6


@dataclass(frozen=True)
class SpotGeometry:
    """The spots of one shapes element, in its order and its intrinsic coordinates.

    ``radius`` is set for circles, ``polygons`` for polygons; ``centres`` ``(S, 2)`` (x, y) are the circles'
    centres or the polygons' centroids.
    """

    key: str
    index: pd.Index
    centres: np.ndarray
    radius: np.ndarray | None = None
    polygons: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """``"circles"`` or ``"polygons"``."""
        return "circles" if self.radius is not None else "polygons"

    def __len__(self) -> int:
        return len(self.centres)


def spot_geometry(shapes: pd.DataFrame, key: str) -> SpotGeometry:
    """Validate a shapes element as spots: circles (points with a positive ``"radius"``) or polygons.

    Parameters
    ----------
    shapes
        The GeoDataFrame of ``sdata.shapes[key]``.
    key
        Its key, for error messages.

    Returns
    -------
    The spots' geometry, in the order of ``shapes``.

    Raises
    ------
    ValueError
        No spot, geometries that are neither all points with a radius nor all polygons, or radii that are not
        finite and positive.

    Examples
    --------
    >>> import geopandas as gpd, shapely
    >>> spots = spot_geometry(gpd.GeoDataFrame({"radius": [1.0]}, geometry=shapely.points([[0.0, 0.0]])), "spots")
    >>> spots.kind, spots.centres.tolist()
    ('circles', [[0.0, 0.0]])

    """
    if len(shapes) == 0:
        raise ValueError(f"Spots {key!r} hold no spot; expected at least one circle or polygon.")
    geoms = np.asarray(shapes.geometry.to_numpy())
    types = shapely.get_type_id(geoms)
    names = sorted({str(t) for t in shapes.geometry.geom_type.unique()})
    if "radius" in shapes.columns:
        if (types != _POINT).any():
            raise ValueError(
                f"Spots {key!r} have a 'radius' column, so must all be points (circles); found geometries {names}."
            )
        radius = shapes["radius"].to_numpy(dtype=np.float64)
        if not np.isfinite(radius).all() or (radius <= 0).any():
            raise ValueError(f"Spots {key!r} have radii <= 0 or not finite; expected positive radii.")
        centres = np.c_[shapely.get_x(geoms), shapely.get_y(geoms)].astype(np.float64)
        return SpotGeometry(key=key, index=pd.Index(shapes.index), centres=centres, radius=radius)
    if not set(types.tolist()) <= {_POLYGON, _MULTIPOLYGON}:
        raise ValueError(
            f"Spots {key!r} must be circles (points with a 'radius' column, as `ShapesModel.parse(coords, "
            f"geometry=0, radius=...)` makes them) or polygons (e.g. Visium HD bins); found geometries {names} "
            f"and columns {list(shapes.columns)}."
        )
    centroids = shapely.centroid(geoms)
    centres = np.c_[shapely.get_x(centroids), shapely.get_y(centroids)].astype(np.float64)
    return SpotGeometry(key=key, index=pd.Index(shapes.index), centres=centres, polygons=geoms)


def spot_pairs(xy: np.ndarray, spots: SpotGeometry, *, overlap: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(point, spot)`` of every point and the spots holding it, under the ``overlap`` rule.

    Parameters
    ----------
    xy
        ``(n, 2)`` nucleus centroids (x, y) in the spots' intrinsic coordinates.
    spots
        From :func:`spot_geometry`.
    overlap
        ``"nearest"``: at most one pair per point, its spot after the tie-break of the module's rule; ``"all"``:
        one pair per spot holding the point.

    Returns
    -------
    Points ``(m,)`` and spots ``(m,)`` (positions in the shapes element), int64, by point, then nearest centre.

    Examples
    --------
    >>> import geopandas as gpd, shapely
    >>> circles = gpd.GeoDataFrame({"radius": [2.0, 2.0]}, geometry=shapely.points([[0.0, 0.0], [3.0, 0.0]]))
    >>> [a.tolist() for a in spot_pairs(np.array([[1.0, 0.0]]), spot_geometry(circles, "s"), overlap="all")]
    [[0, 0], [0, 1]]

    """
    if overlap not in SPOT_OVERLAP:
        raise ValueError(f"`overlap` must be one of {list(SPOT_OVERLAP)}, got {overlap!r}.")
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if not np.isfinite(xy).all():
        raise ValueError("Cell centroids must be finite; found NaN or infinite coordinates.")
    if spots.radius is not None:
        reach = float(spots.radius.max())
        from scipy.spatial import cKDTree  # loaded when needed: it weighs on `import ghist`

        pairs = cKDTree(xy).sparse_distance_matrix(
            cKDTree(spots.centres), max_distance=reach * (1 + 1e-9), output_type="ndarray"
        )
        cell, spot = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    else:
        tolerance = _POLYGON_TOLERANCE * max(1.0, float(np.abs(shapely.bounds(spots.polygons)).max()))
        tree = shapely.STRtree(spots.polygons)
        cell, spot = tree.query(shapely.points(xy), predicate="dwithin", distance=tolerance)
        cell, spot = cell.astype(np.int64), spot.astype(np.int64)
    # One distance formula for the containment test and the tie-break, whatever found the candidates.
    dist = np.hypot(xy[cell, 0] - spots.centres[spot, 0], xy[cell, 1] - spots.centres[spot, 1])
    if spots.radius is not None:
        inside = dist <= spots.radius[spot]
        cell, spot, dist = cell[inside], spot[inside], dist[inside]
    order = np.lexsort((spot, dist, cell))  # by cell, then nearest centre, then first spot
    cell, spot = cell[order], spot[order]
    if overlap == "nearest":
        first = np.r_[True, cell[1:] != cell[:-1]] if len(cell) else np.zeros(0, dtype=bool)
        cell, spot = cell[first], spot[first]
    return cell, spot


def assign_to_spots(xy: np.ndarray, spots: SpotGeometry) -> np.ndarray:
    """The spot (position in the shapes element) holding each point, or -1: the ``overlap="nearest"`` rule.

    Parameters
    ----------
    xy
        ``(n, 2)`` nucleus centroids (x, y) in the spots' intrinsic coordinates.
    spots
        From :func:`spot_geometry`.

    Returns
    -------
    ``(n,)`` int64: the spot of each point after the tie-break of the module's rule, ``-1`` outside every spot.
    :func:`spot_pairs` with ``overlap="all"`` gives every spot of a point instead.

    Examples
    --------
    >>> import geopandas as gpd, shapely
    >>> circles = gpd.GeoDataFrame({"radius": [2.0, 2.0]}, geometry=shapely.points([[0.0, 0.0], [3.0, 0.0]]))
    >>> assign_to_spots(np.array([[0.5, 0.0], [2.0, 0.0], [1.5, 0.0], [9.0, 9.0]]), spot_geometry(circles, "s"))
    array([ 0,  1,  0, -1])

    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    out = np.full(len(xy), -1, dtype=np.int64)
    cell, spot = spot_pairs(xy, spots, overlap="nearest")
    out[cell] = spot
    return out


def membership_matrix(assignment: np.ndarray, n_spots: int) -> sp.csr_matrix:
    """Sparse 0/1 ``(n_spots, n_cells)`` matrix of :func:`assign_to_spots`' result: one 1 per cell in a spot.

    Examples
    --------
    >>> membership_matrix(np.array([1, -1, 1]), 2).toarray()
    array([[0., 0., 0.],
           [1., 0., 1.]])

    """
    assignment = np.asarray(assignment, dtype=np.int64)
    cells = np.flatnonzero(assignment >= 0)
    data = np.ones(len(cells), dtype=np.float64)
    return sp.csr_matrix((data, (assignment[cells], cells)), shape=(int(n_spots), len(assignment)))
