"""Tiling: the one grid planner and the one window cutter for training tiles, prediction tiles and segmentation blocks.

**Grids** (:func:`plan_grid`) place windows of ``size`` pixels every ``size - overlap`` pixels along each axis of a
raster, row by row. Two rules for the last window of an axis:

- ``edge="clip"``: windows start at ``0, stride, 2 * stride, ...`` while they start inside the raster, and the last
  one is cut short by the raster's edge (training tiles of :func:`ghist.pp.make_tiles`, segmentation blocks of
  :func:`ghist.pp.segment_nuclei`: every pixel in exactly one window when there is no overlap);
- ``edge="inside"``: every window lies whole inside the raster (the last one is moved back to end at the edge), so
  the network always sees a full tile (:func:`ghist.tl.predict`); a raster smaller than one window gets one window
  at 0.

**Windows** (:class:`SlideWindows`) are cut from an image and its labels on a *working grid*: the image's pixel grid
scaled to a chosen pixel size. The image is read through :func:`ghist._spatial.read_image_window` (nearest pyramid
level, area mean; white outside the image) and the labels through :func:`ghist._spatial.read_labels_window` (nearest
neighbour through the affine, 0 outside), both through caches of decoded chunks (:mod:`ghist._chunk_cache`) so that a
row-major sweep decodes each storage chunk about once per row of windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._chunk_cache import chunk_cached
from ._spatial import read_image_window, read_labels_window

__all__ = ["Grid", "SlideWindows", "grid_starts", "plan_grid"]


def grid_starts(length: int, size: int, stride: int, *, edge: Literal["clip", "inside"] = "clip") -> np.ndarray:
    """Start of each window along one axis of ``length`` pixels (see the module's two ``edge`` rules).

    Examples
    --------
    >>> grid_starts(10, 4, 4).tolist(), grid_starts(10, 4, 3, edge="inside").tolist()
    ([0, 4, 8], [0, 3, 6])

    """
    if size < 1 or stride < 1:
        raise ValueError(f"Window size and stride must be >= 1, got {size} and {stride}.")
    if edge == "clip":
        return np.arange(0, max(length, 1), stride, dtype=np.int64)
    if edge != "inside":
        raise ValueError(f"`edge` must be 'clip' or 'inside', got {edge!r}.")
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - size, stride, dtype=np.int64)
    return np.append(starts, length - size)


@dataclass(frozen=True)
class Grid:
    """Windows of ``size`` pixels over a raster of ``shape`` (h, w), row by row.

    ``origins`` ``(n, 2)`` are the windows' top-left pixels ``(y0, x0)`` and ``cells`` ``(n, 2)`` their ``(row, col)``
    in the grid of ``n_rows x n_cols`` windows (a subset, e.g. windows touching a region, keeps both).
    """

    origins: np.ndarray
    cells: np.ndarray
    n_rows: int
    n_cols: int
    size: int
    shape: tuple[int, int]

    def __len__(self) -> int:
        return len(self.origins)

    def bounds(self, halo: int = 0) -> np.ndarray:
        """``(n, 4)`` windows ``(y0, y1, x0, x1)`` grown by ``halo`` on every side and clipped to the raster."""
        y0, x0 = self.origins[:, 0], self.origins[:, 1]
        h, w = self.shape
        return np.c_[
            np.maximum(y0 - halo, 0),
            np.minimum(y0 + self.size + halo, h),
            np.maximum(x0 - halo, 0),
            np.minimum(x0 + self.size + halo, w),
        ].astype(np.int64)

    def subset(self, keep: np.ndarray) -> Grid:
        """The windows selected by ``keep`` (a boolean mask or indices), in grid order."""
        return Grid(self.origins[keep], self.cells[keep], self.n_rows, self.n_cols, self.size, self.shape)


def plan_grid(shape: Sequence[int], size: int, *, overlap: int = 0, edge: Literal["clip", "inside"] = "clip") -> Grid:
    """Windows of ``size`` pixels every ``size - overlap`` pixels over a raster of ``shape`` (h, w), row by row.

    Parameters
    ----------
    shape
        ``(height, width)`` of the raster (or working grid) in pixels.
    size
        Side of the windows.
    overlap
        Pixels shared by neighbouring windows (``0 <= overlap < size``).
    edge
        ``"clip"``: the last window of an axis is cut by the edge; ``"inside"``: it is moved back to end at the
        edge (every window whole, when the raster is at least one window wide).

    Returns
    -------
    The :class:`Grid`.

    Examples
    --------
    >>> plan_grid((5, 9), 4).origins.tolist()
    [[0, 0], [0, 4], [0, 8], [4, 0], [4, 4], [4, 8]]

    """
    if not 0 <= overlap < size:
        raise ValueError(f"`overlap` must be in [0, {size}), got {overlap}.")
    h, w = (int(s) for s in shape)
    ys = grid_starts(h, size, size - overlap, edge=edge)
    xs = grid_starts(w, size, size - overlap, edge=edge)
    rows, cols = np.divmod(np.arange(ys.size * xs.size, dtype=np.int64), xs.size)
    origins = np.c_[ys[rows], xs[cols]].astype(np.int64)
    return Grid(origins, np.c_[rows, cols], int(ys.size), int(xs.size), int(size), (h, w))


class SlideWindows:
    """The window cutter: RGB and labels windows of a slide on a working grid, read lazily.

    Parameters
    ----------
    levels
        The image's pyramid, ``(downsample_y, downsample_x, array)`` finest first
        (:func:`ghist._validation.raster_levels`); one level ``(1, 1, image)`` for a plain image.
    labels
        ``(y, x)`` labels raster.
    scale
        Working-grid pixels per image pixel (1: the image's own grid).
    to_labels
        ``3x3`` affine from working-grid ``(x, y, 1)`` to labels pixel ``(x, y, 1)``.
    cache
        Read dask-backed rasters through caches of decoded chunks (one reader per copy: not thread-safe).

    Examples
    --------
    >>> windows = SlideWindows(raster_levels(sdata.images["he"]), sdata.labels["nuclei"], 1.0, np.eye(3))
    >>> rgb, labels = windows.read(0, 0, 256, 256)

    """

    def __init__(
        self,
        levels: Sequence[tuple[float, float, Any]],
        labels: Any,
        scale: float,
        to_labels: np.ndarray,
        *,
        cache: bool = True,
    ):
        wrap = chunk_cached if cache else (lambda array: array)
        self.levels = [(dy, dx, wrap(level)) for dy, dx, level in levels]
        self.labels = wrap(labels)
        self.scale = float(scale)
        self.to_labels = np.asarray(to_labels, dtype=float)

    def image(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """RGB window ``(3, h, w)`` uint8 on the working grid, white outside the image."""
        return read_image_window(self.levels, self.scale, y0, x0, h, w)

    def labels_window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Labels window ``(h, w)`` on the working grid (nearest neighbour), 0 outside the labels."""
        return read_labels_window(self.labels, self.to_labels, y0, x0, h, w)

    def read(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """The RGB and labels windows at ``(y0, x0)`` of ``h x w`` working-grid pixels."""
        return self.image(y0, x0, h, w), self.labels_window(y0, x0, h, w)
