"""The one centroid rule: where a nucleus is, for spots, regions of interest, tables and tile choice alike.

A nucleus' centroid is the mean of the centres of its pixels **in the labels element's own pixel space**: pixel
``(row i, col j)`` covers ``[j, j + 1) x [i, i + 1)`` and its centre is ``(j + 0.5, i + 0.5)``, as in spatialdata
(:func:`spatialdata.get_centroids`). It is computed over the whole nucleus, never over the part of it a tile or a
resampled window shows, and only then mapped into another element's coordinates (:func:`map_points`), so a nucleus
lies under the same spot in :func:`ghist.pp.make_tiles`, :func:`ghist.tl.predict` (``obsm["spatial"]`` and
``roi_key``), :func:`ghist.tl.aggregate_to_spots` and :func:`ghist.tl.evaluate`, whatever pixel size or tile grid
each works on.

The same function also gives the centroid of the *visible* pixels of each cell in a window (a tile's labels),
which is what tile choice needs; it is then in that window's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Centroids", "label_centroids", "map_points"]

# Ids below this are summed with `np.bincount` over an array as long as the largest id (fast, a few MB); larger ids
# (sparse numbering) go through `np.unique` per chunk instead.
_DENSE_IDS = 1 << 24


@dataclass(frozen=True)
class Centroids:
    """Nuclei of a labels raster: ids ``(n,)`` ascending, pixel counts ``(n,)`` and centroids ``(n, 2)`` (x, y)."""

    ids: np.ndarray
    area: np.ndarray
    xy: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _sums(block: np.ndarray, y0: int, x0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ids present in ``block`` (0 left out) with their pixel counts and the sums of their pixel centres."""
    flat = np.asarray(block).ravel()
    rows = np.arange(block.shape[0], dtype=np.float64) + (y0 + 0.5)
    cols = np.arange(block.shape[1], dtype=np.float64) + (x0 + 0.5)
    if flat.size == 0:
        empty = np.zeros(0)
        return np.zeros(0, dtype=np.int64), empty, empty, empty
    low, high = int(flat.min()), int(flat.max())
    if low >= 0 and high < _DENSE_IDS:
        inverse, n = flat, high + 1
        ids = None
    else:
        ids, inverse = np.unique(flat, return_inverse=True)
        n = ids.size
    area = np.bincount(inverse, minlength=n).astype(np.float64)
    sx = np.bincount(inverse, weights=np.broadcast_to(cols, block.shape).ravel(), minlength=n)
    sy = np.bincount(inverse, weights=np.broadcast_to(rows[:, None], block.shape).ravel(), minlength=n)
    if ids is None:
        ids = np.arange(n, dtype=np.int64)
    present = (area > 0) & (ids != 0)
    return ids[present].astype(np.int64), area[present], sx[present], sy[present]


def label_centroids(labels: Any, *, offset: tuple[float, float] = (0.0, 0.0)) -> Centroids:
    """Every nucleus of ``labels`` with its pixel count and centroid, by the rule of this module.

    Parameters
    ----------
    labels
        A 2-D labels raster (a DataArray, a dask or numpy array; 0 is background). A dask-backed raster is read one
        chunk at a time, so memory follows the number of nuclei, not the raster; a nucleus over several chunks is
        merged.
    offset
        ``(y0, x0)`` of the raster's first pixel in the pixel space the centroids are wanted in (a window cut from a
        larger raster at ``y0, x0``).

    Returns
    -------
    The nuclei in ascending id order; centroids ``(x, y)`` in pixels (pixel ``(i, j)`` has centre
    ``(j + 0.5, i + 0.5)``).

    Examples
    --------
    >>> c = label_centroids(np.array([[0, 1, 1], [2, 2, 0]]))
    >>> c.ids.tolist(), c.area.tolist(), c.xy.tolist()
    ([1, 2], [2.0, 2.0], [[2.0, 0.5], [1.0, 1.5]])

    """
    data = labels.data if hasattr(labels, "dims") else labels
    if data.ndim != 2:
        raise ValueError(f"Labels must be 2-D (y, x); got shape {tuple(data.shape)}.")
    y_off, x_off = offset
    parts = []
    if hasattr(data, "dask"):
        y_starts = np.cumsum((0, *data.chunks[0][:-1]))
        x_starts = np.cumsum((0, *data.chunks[1][:-1]))
        for i, y0 in enumerate(y_starts):
            for j, x0 in enumerate(x_starts):
                block = np.asarray(data.blocks[i, j].compute())
                parts.append(_sums(block, int(y0) + y_off, int(x0) + x_off))
    else:
        parts.append(_sums(np.asarray(data), y_off, x_off))
    ids = np.concatenate([p[0] for p in parts])
    if len(parts) == 1:
        uniq, area, sx, sy = parts[0]
    else:
        uniq, inverse = np.unique(ids, return_inverse=True)
        area = np.bincount(inverse, weights=np.concatenate([p[1] for p in parts]), minlength=uniq.size)
        sx = np.bincount(inverse, weights=np.concatenate([p[2] for p in parts]), minlength=uniq.size)
        sy = np.bincount(inverse, weights=np.concatenate([p[3] for p in parts]), minlength=uniq.size)
    if uniq.size == 0:
        return Centroids(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros((0, 2)))
    return Centroids(uniq.astype(np.int64), area, np.c_[sx / area, sy / area])


def map_points(xy: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points ``(n, 2)`` (x, y) through a 3x3 affine acting on ``(x, y, 1)`` (e.g. labels pixels -> spots' space)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    m = np.asarray(matrix, dtype=np.float64)
    return xy @ m[:2, :2].T + m[:2, 2]
