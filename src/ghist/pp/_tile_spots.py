"""Spot-level supervision for :func:`ghist.pp.make_tiles` (Visium / legacy ST; ``docs/method.md``, "Spot mode").

A sample then holds, besides the H&E image and the nucleus labels, a ``ShapesModel`` of spots (circles: points
with a ``"radius"`` column; or polygons such as Visium HD bins; in any coordinate system shared with the labels)
and a ``TableModel`` of raw spot counts annotating those spots. Here:

- every nucleus gets the one spot holding its centroid (:func:`cells_in_spots`), through the elements' coordinate
  transformations, by the rule of :mod:`ghist._spot_membership` that aggregation and evaluation use too;
- every spot gets its target: its counts scaled to a fixed library size per typical spot (:func:`spot_targets`),
  on the count scale that the summed per-cell predictions are compared with;
- spot-centred tile origins (:func:`spot_tile_origins`) for ``tiling="spots"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import shapely
from anndata import AnnData
from spatialdata import SpatialData

from .._centroids import label_centroids, map_points
from .._spatial import element_affine
from .._spot_membership import SpotGeometry, assign_to_spots, spot_geometry
from .._validation import _preview, get_counts, positions_of_ids, table_of_region

logger = logging.getLogger(__name__)

__all__ = [
    "SpotData",
    "cells_in_spots",
    "nucleus_centroids",
    "prepare_spots",
    "spot_footprint",
    "spot_targets",
    "spot_tile_origins",
]

# Circles whose neighbours' centres are at most this many diameters apart are taken to tile the plane (bins drawn as
# inscribed circles) rather than to be Visium/ST spots with gaps by design (1.8 and 2 diameters apart).
_TOUCHING = 1.1


@dataclass
class SpotData:
    """The spots of one sample, resolved from ``sdata`` (rows in the order of the spot table)."""

    key: str
    table: AnnData  # spot rows of the table, all genes
    counts: Any  # X or layer of ``table``
    names: list[str]  # spot instance ids, as strings
    centres: np.ndarray  # (S, 2) x, y in the shapes' intrinsic coordinates (circle centres, polygon centroids)
    radius: np.ndarray | None  # (S,) in the same units; None for polygons
    labels_to_spots: np.ndarray  # 3x3: labels pixel (x, y, 1) -> shapes intrinsic
    image_to_spots: np.ndarray  # 3x3: image pixel (x, y, 1) -> shapes intrinsic
    geometry: SpotGeometry  # every spot of the shapes element, in its order (membership is decided over all)
    row_of_shape: np.ndarray  # (len(geometry),) row of the table for each spot of the shapes element, or -1


def prepare_spots(
    sdata: SpatialData,
    *,
    spots_key: str,
    table_key: str,
    image_key: str,
    labels_key: str,
    layer: str | None,
) -> SpotData:
    """Validate and resolve the spots (circles or polygons) and their table of raw counts.

    Raises
    ------
    KeyError
        The spots, the table, its instance key or the layer do not exist.
    ValueError
        The spots are neither circles nor polygons, the table does not annotate them, or it names spots that do
        not exist.

    """
    if spots_key not in sdata.shapes:
        raise KeyError(f"Spots {spots_key!r} not found in `sdata.shapes` (have {sorted(sdata.shapes)}).")
    shapes = sdata.shapes[spots_key]
    geometry = spot_geometry(shapes, spots_key)
    table, _, instance_key = table_of_region(sdata, table_key, spots_key, what="spots")
    where = f"spot table {table_key!r}"
    ids = table.obs[instance_key]
    shape_index = pd.Index(shapes.index)
    row = positions_of_ids(ids, shape_index)
    if (row < 0).any():
        missing = ids[row < 0].tolist()
        raise ValueError(
            f"The {where} lists spots {_preview(missing)} (`obs[{instance_key!r}]`) that are not in "
            f"`sdata.shapes[{spots_key!r}]` (index {_preview(shape_index.tolist())})."
        )
    if pd.Index(row).duplicated().any():
        dup = ids[pd.Index(row).duplicated()].unique().tolist()
        raise ValueError(f"The {where} lists spots {_preview(dup)} more than once.")
    counts = get_counts(table, layer=layer, where=f"the {where}")
    row_of_shape = np.full(len(geometry), -1, dtype=np.int64)
    row_of_shape[row] = np.arange(len(row))
    return SpotData(
        key=spots_key,
        table=table,
        counts=counts,
        names=[str(i) for i in ids],
        centres=geometry.centres[row],
        radius=None if geometry.radius is None else geometry.radius[row],
        labels_to_spots=element_affine(sdata, labels_key, spots_key),
        image_to_spots=element_affine(sdata, image_key, spots_key),
        geometry=geometry,
        row_of_shape=row_of_shape,
    )


def spot_targets(
    spots: SpotData,
    genes: list[str],
    target_sum: float | None,
    *,
    scaling: str = "spot",
    n_cells: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The spots' training targets ``(S, G)`` on the count scale, and the factor ``(S,)`` applied to each spot.

    Library size: a spot's total over *all* genes of the table.

    - ``scaling="spot"``: each spot's counts are scaled to ``target_sum * n_cells / median n_cells`` (median
      over the spots holding a nucleus): its own sequencing depth is removed, its number of nuclei kept, as the
      sum of its cells' predictions keeps it. Spots with zero counts get NaN targets (unmeasured).
    - ``scaling="sample"``: all counts of the sample are multiplied by one factor, ``target_sum / median library
      size`` (over spots with counts): differences in depth between the spots of a section are kept.

    ``target_sum=None`` keeps the raw counts (factor 1).
    """
    counts = spots.counts
    library = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    factor = np.ones(library.size)
    positive = library[library > 0]
    if target_sum is not None and positive.size == 0:
        raise ValueError(f"Every spot of {spots.key!r} has zero counts; expected raw counts.")
    if target_sum is not None and scaling == "sample":
        factor[:] = float(target_sum) / float(np.median(positive))
    elif target_sum is not None:
        if n_cells is None or len(n_cells) != library.size:
            raise ValueError("`scaling='spot'` needs the number of nuclei in each spot (`n_cells`).")
        n_cells = np.asarray(n_cells, dtype=np.float64)
        typical = float(np.median(n_cells[n_cells > 0])) if (n_cells > 0).any() else 1.0
        with np.errstate(divide="ignore"):
            factor = np.where(library > 0, float(target_sum) * np.maximum(n_cells, 1) / typical / library, np.nan)
    gene_idx = pd.Index(spots.table.var_names).get_indexer(genes)
    block = counts[:, gene_idx]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return (block.astype(np.float64) * factor[:, None]).astype(np.float32), factor


def nucleus_centroids(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``(n,)`` and centroids ``(n, 2)`` (x, y) of every nucleus, by the one rule of :mod:`ghist._centroids`.

    Reads a dask-backed labels element one chunk at a time (a nucleus spanning chunks is merged).
    """
    cells = label_centroids(labels)
    return cells.ids, cells.xy


def cells_in_spots(centroids_xy: np.ndarray, spots: SpotData) -> np.ndarray:
    """Row of the spot table of the one spot holding each labels-space centroid, or -1.

    Centroids are mapped into the shapes' own coordinates, where the geometry is defined, so any affine between the
    elements is exact. Which spot holds a cell is decided over every spot of the shapes element by
    :func:`ghist._spot_membership.assign_to_spots` (nearest centre where spots overlap); a cell whose spot the
    table does not list gets -1.
    """
    shape_pos = assign_to_spots(map_points(centroids_xy, spots.labels_to_spots), spots.geometry)
    return np.where(shape_pos >= 0, spots.row_of_shape[np.maximum(shape_pos, 0)], -1).astype(np.int64)


def spot_footprint(centroids_xy: np.ndarray, spots: SpotData) -> dict[str, Any]:
    """How many nuclei lie among the spots, and how many of those fall in no spot.

    The spots' footprint is their convex hull (of the polygons, or of the circles: the points within the largest
    radius of the centres' hull), so nuclei beyond the outer spots do not count. ``contiguous``: the spots are meant
    to tile the plane (polygons, or circles whose neighbours' centres are at most 1.1 diameters apart, as when bins
    are drawn as inscribed circles), so the nuclei between them are lost by the geometry, not by design of the assay
    (Visium and legacy ST spots are 1.8 and 2 diameters apart).

    Parameters
    ----------
    centroids_xy
        ``(n, 2)`` nucleus centroids in the labels' pixel space (x, y).
    spots
        From :func:`prepare_spots`.

    Returns
    -------
    ``{"n_cells_near_spots", "n_cells_between_spots", "contiguous", "spacing"}``; ``spacing``, the median distance
    between neighbouring spot centres, in the shapes' units.

    Examples
    --------
    >>> spot_footprint(xy, spots)["n_cells_between_spots"]

    """
    geometry = spots.geometry
    xy = map_points(centroids_xy, spots.labels_to_spots)
    if geometry.radius is not None:
        size = 2 * float(np.median(geometry.radius))
        hull = shapely.convex_hull(shapely.multipoints(geometry.centres))
        margin = float(geometry.radius.max())
    else:
        size = float(np.sqrt(np.median(shapely.area(geometry.polygons))))
        hull = shapely.convex_hull(shapely.multipoints(shapely.get_coordinates(geometry.polygons)))
        margin = 0.0
    if len(geometry) > 1:
        from scipy.spatial import cKDTree  # loaded when needed: it weighs on `import ghist`

        spacing = float(np.median(cKDTree(geometry.centres).query(geometry.centres, k=2)[0][:, 1]))
    else:
        spacing = size
    in_spot = assign_to_spots(xy, geometry) >= 0
    tolerance = 1e-9 * max(1.0, float(np.abs(geometry.centres).max()))
    near = in_spot | (shapely.distance(hull, shapely.points(xy)) <= margin + tolerance)
    return {
        "n_cells_near_spots": int(near.sum()),
        "n_cells_between_spots": int((near & ~in_spot).sum()),
        "contiguous": bool(geometry.radius is None or spacing <= _TOUCHING * size),
        "spacing": spacing,
    }


def spot_tile_origins(
    spots: SpotData, height: int, width: int, tile_size: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left image pixels ``(n, 2)`` (y0, x0) of tiles centred on the spots, and the spots' centres (y, x).

    A tile that would leave the image is shifted back inside (when the image is at least a tile wide).
    """
    to_image = np.linalg.inv(spots.image_to_spots)
    centres = spots.centres if keep is None else spots.centres[keep]
    xy = centres @ to_image[:2, :2].T + to_image[:2, 2]
    y0 = np.floor(xy[:, 1] - tile_size / 2 + 0.5).astype(np.int64)
    x0 = np.floor(xy[:, 0] - tile_size / 2 + 0.5).astype(np.int64)
    y0 = np.clip(y0, 0, max(height - tile_size, 0))
    x0 = np.clip(x0, 0, max(width - tile_size, 0))
    return np.c_[y0, x0], np.c_[xy[:, 1], xy[:, 0]]
