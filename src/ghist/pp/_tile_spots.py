"""Spot-level supervision for :func:`ghist.pp.make_tiles` (Visium / legacy ST, DESIGN section 3).

A sample then holds, besides the H&E image and the nucleus labels, a ``ShapesModel`` of circles (points with a
``"radius"`` column, in any coordinate system shared with the labels) and a ``TableModel`` of raw spot counts
annotating those circles. Here:

- every nucleus gets the spot whose circle holds its centroid (:func:`cells_in_spots`), through the elements'
  coordinate transformations;
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
from anndata import AnnData
from scipy.spatial import cKDTree
from spatialdata import SpatialData

from .._spatial import element_affine
from .._validation import _preview, get_counts, positions_of_ids, table_of_region

logger = logging.getLogger(__name__)

__all__ = ["SpotData", "cells_in_spots", "nucleus_centroids", "prepare_spots", "spot_targets", "spot_tile_origins"]


@dataclass
class SpotData:
    """The spots of one sample, resolved from ``sdata`` (rows in the order of the spot table)."""

    key: str
    table: AnnData  # spot rows of the table, all genes
    counts: Any  # X or layer of ``table``
    names: list[str]  # spot instance ids, as strings
    centres: np.ndarray  # (S, 2) x, y in the shapes' intrinsic coordinates
    radius: np.ndarray  # (S,) in the same units
    labels_to_spots: np.ndarray  # 3x3: labels pixel (x, y, 1) -> shapes intrinsic
    image_to_spots: np.ndarray  # 3x3: image pixel (x, y, 1) -> shapes intrinsic


def prepare_spots(
    sdata: SpatialData,
    *,
    spots_key: str,
    table_key: str,
    image_key: str,
    labels_key: str,
    layer: str | None,
) -> SpotData:
    """Validate and resolve the spot circles and their table of raw counts.

    Raises
    ------
    KeyError
        The spots, the table, its instance key or the layer do not exist.
    ValueError
        The spots are not circles, the table does not annotate them, or it names spots that do not exist.

    """
    if spots_key not in sdata.shapes:
        raise KeyError(f"Spots {spots_key!r} not found in `sdata.shapes` (have {sorted(sdata.shapes)}).")
    shapes = sdata.shapes[spots_key]
    geom_types = set(shapes.geometry.geom_type.unique()) if len(shapes) else set()
    if "radius" not in shapes.columns or geom_types - {"Point"}:
        raise ValueError(
            f"Spots {spots_key!r} must be circles (point geometries with a 'radius' column, as "
            f"`ShapesModel.parse(coords, geometry=0, radius=...)` makes them); found geometries {sorted(geom_types)} "
            f"and columns {list(shapes.columns)}."
        )
    if len(shapes) == 0:
        raise ValueError(f"Spots {spots_key!r} hold no circle; expected at least one spot.")
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
    radius = shapes["radius"].to_numpy(dtype=np.float64)[row]
    if not np.isfinite(radius).all() or (radius <= 0).any():
        raise ValueError(f"Spots {spots_key!r} have radii <= 0 or not finite; expected positive radii.")
    centres = np.c_[shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()][row].astype(np.float64)
    return SpotData(
        key=spots_key,
        table=table,
        counts=counts,
        names=[str(i) for i in ids],
        centres=centres,
        radius=radius,
        labels_to_spots=element_affine(sdata, labels_key, spots_key),
        image_to_spots=element_affine(sdata, image_key, spots_key),
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
    """Ids ``(n,)`` and centroids ``(n, 2)`` (x, y, intrinsic: pixel ``(i, j)`` has centre ``(j + 0.5, i + 0.5)``).

    Reads a dask-backed labels element one chunk at a time (a nucleus spanning chunks is merged).
    """
    data = labels.data if hasattr(labels, "dims") else labels
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(block: np.ndarray, y0: int, x0: int) -> None:
        rows, cols = np.nonzero(block)
        if rows.size == 0:
            return
        ids, inverse = np.unique(block[rows, cols], return_inverse=True)
        parts.append(
            (
                ids.astype(np.int64),
                np.bincount(inverse).astype(np.float64),
                np.bincount(inverse, weights=cols + x0 + 0.5),
                np.bincount(inverse, weights=rows + y0 + 0.5),
            )
        )

    if hasattr(data, "dask"):
        y_starts = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]])
        x_starts = np.concatenate([[0], np.cumsum(data.chunks[1])[:-1]])
        for i, y0 in enumerate(y_starts):
            for j, x0 in enumerate(x_starts):
                add(np.asarray(data.blocks[i, j].compute()), int(y0), int(x0))
    else:
        add(np.asarray(data), 0, 0)
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.float64)
    ids = np.concatenate([p[0] for p in parts])
    uniq, inverse = np.unique(ids, return_inverse=True)
    n = np.bincount(inverse, weights=np.concatenate([p[1] for p in parts]))
    sx = np.bincount(inverse, weights=np.concatenate([p[2] for p in parts]))
    sy = np.bincount(inverse, weights=np.concatenate([p[3] for p in parts]))
    return uniq, np.c_[sx / n, sy / n]


def cells_in_spots(centroids_xy: np.ndarray, spots: SpotData) -> np.ndarray:
    """Index (into the spot table's rows) of the spot whose circle holds each labels-space centroid, or -1.

    Centroids are mapped into the shapes' own coordinates, where the radius is defined, so any affine between the
    elements is exact. Where circles overlap, a cell goes to the spot with the nearest centre.
    """
    xy = np.asarray(centroids_xy, dtype=np.float64).reshape(-1, 2)
    if xy.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    m = spots.labels_to_spots
    mapped = xy @ m[:2, :2].T + m[:2, 2]
    dist, nearest = cKDTree(spots.centres).query(mapped, k=1)
    inside = dist <= spots.radius[nearest]
    if not inside.all() and spots.radius.max() > spots.radius.min():
        # With unequal radii the nearest centre need not be the containing circle: check a few more.
        k = min(8, len(spots.centres))
        dists, idx = cKDTree(spots.centres).query(mapped[~inside], k=k)
        dists, idx = dists.reshape(-1, k), idx.reshape(-1, k)
        ok = dists <= spots.radius[idx]
        first = np.where(ok.any(axis=1), ok.argmax(axis=1), -1)
        fixed = np.where(first >= 0, idx[np.arange(len(first)), np.maximum(first, 0)], -1)
        nearest = nearest.copy()
        nearest[~inside] = np.maximum(fixed, 0)
        inside = inside.copy()
        inside[~inside] = fixed >= 0
    return np.where(inside, nearest, -1).astype(np.int64)


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
