"""Batches for the network: torch datasets over tile stores and the collate function that batches them.

Both :func:`ghist.tl.fit` (tiles of a :class:`~ghist.pp.TileSet`, :class:`TileDataset`) and :func:`ghist.tl.predict`
(tiles cut from a slide, :class:`SlideTileDataset`) hand the network batches in one format, built here by
:func:`collate_tiles`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .._centroids import label_centroids
from .._tiling import SlideWindows

if TYPE_CHECKING:
    from xarray import DataArray

__all__ = [
    "SlideTileDataset",
    "TileDataset",
    "as_tensors",
    "collate_slide_tiles",
    "collate_tiles",
    "worker_context",
]


def worker_context(num_workers: int) -> str | None:
    """Start method of DataLoader worker processes: ``"forkserver"`` where it exists, else the platform's default.

    A worker forked from a process that already runs threads (dask's pool, zarr's IO loop, a notebook's kernel)
    inherits their locks in whatever state they were, and can wait on one forever: the test suite hung that way.
    Workers started from a clean server process only receive the pickled dataset (stores reopen per process).
    """
    import multiprocessing

    if num_workers <= 0:
        return None
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def as_tensors(item: dict[str, Any]) -> dict[str, Any]:
    """The numpy arrays of a tile item as tensors (shared memory, no copy); other values unchanged."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in item.items()}


class TileSource(Protocol):
    """What :class:`TileDataset` needs of a tile store (:class:`ghist.pp.TileSet` is one).

    Named here rather than imported from :mod:`ghist.pp`, which imports this module: the batch format depends on no
    reader of stores.
    """

    path: Path

    def read(self, i: int) -> dict[str, Any]:
        """Tile ``i`` as a dict of numpy arrays."""


class TileDataset(Dataset):
    """A torch :class:`~torch.utils.data.Dataset` over some tiles of a :class:`TileSet` (read lazily).

    Parameters
    ----------
    tiles
        The :class:`~ghist.pp.TileSet` (or any :class:`TileSource`).
    indices
        Tile indices of this dataset.
    transform
        Applied to every item after it is read.

    Examples
    --------
    >>> ds = TileDataset(tiles, tiles.indices("train"))
    >>> ds[0]["labels"].shape

    """

    def __init__(
        self, tiles: TileSource, indices: Sequence[int] | np.ndarray, *, transform: Callable[[dict], dict] | None = None
    ):
        self.tiles = tiles
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"Index {i} out of range for a dataset of {len(self)} tiles.")
        item = as_tensors(self.tiles.read(int(self.indices[i])))
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return f"TileDataset of {len(self)} tiles from {str(self.tiles.path)!r}"


def collate_tiles(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch tile items: stack images and labels, make cell labels batch-unique, concatenate the cells.

    Tile ``b``'s cell ``k`` (label ``k``) becomes label ``offset_b + k`` with ``offset_b`` the number of cells of
    tiles ``0..b-1``, so batch label ``j > 0`` is row ``j - 1`` of the concatenated per-cell arrays; 0 (background)
    and -1 (ignore) stay.

    Parameters
    ----------
    items
        Items of a :class:`TileDataset`.

    Returns
    -------
    ``"image"`` (B, 3, T, T), ``"labels"`` (B, T, T), ``"cell_id"`` (N,), ``"expr"`` (N, G), ``"cell_type"`` (N,),
    ``"cell_batch"`` (N,) tile of each cell within the batch, ``"n_cells"`` N (int), ``"sample"`` and ``"tile"`` (B,).
    Spot-level items also give ``"spot_expr"`` (S, G) (the tiles' spots concatenated), ``"cell_spot"`` (N,) the
    row of each cell's spot in it (tile ``b``'s spot ``k`` becomes ``k`` plus the number of spots of tiles
    ``0..b-1``; -1 stays), ``"spot_batch"`` (S,) tile of each spot and ``"spot_index"`` (S,).

    Examples
    --------
    >>> loader = DataLoader(tiles.train, batch_size=8, collate_fn=collate_tiles)

    """
    if len(items) == 0:
        raise ValueError("collate_tiles got an empty batch.")
    labels, batch_of_cell = [], []
    offset = 0
    for b, item in enumerate(items):
        lab = item["labels"]
        n = int(item["cell_id"].shape[0])
        labels.append(torch.where(lab > 0, lab + offset, lab))
        batch_of_cell.append(torch.full((n,), b, dtype=torch.int64))
        offset += n
    batch = {
        "image": torch.stack([item["image"] for item in items]),
        "labels": torch.stack(labels),
        "cell_id": torch.cat([item["cell_id"] for item in items]),
        "expr": torch.cat([item["expr"] for item in items]),
        "cell_type": torch.cat([item["cell_type"] for item in items]),
        "cell_batch": torch.cat(batch_of_cell),
        "n_cells": offset,
        "sample": torch.as_tensor([int(item["sample"]) for item in items], dtype=torch.int64),
        "tile": torch.as_tensor([int(item["tile"]) for item in items], dtype=torch.int64),
    }
    with_spots = ["cell_spot" in item for item in items]
    if any(with_spots):
        if not all(with_spots):
            raise ValueError("collate_tiles got a batch mixing spot-level and cell-level tiles.")
        cell_spot, spot_batch = [], []
        n_spots = 0
        for b, item in enumerate(items):
            spot = item["cell_spot"]
            cell_spot.append(torch.where(spot >= 0, spot + n_spots, spot))
            s = int(item["spot_expr"].shape[0])
            spot_batch.append(torch.full((s,), b, dtype=torch.int64))
            n_spots += s
        batch["cell_spot"] = torch.cat(cell_spot)
        batch["spot_expr"] = torch.cat([item["spot_expr"] for item in items])
        batch["spot_batch"] = torch.cat(spot_batch)
        batch["spot_index"] = torch.cat([item["spot_index"] for item in items])
    return batch


# ---------------------------------------------------------------------------------------------- slide tiles
# Per-cell values of a slide tile that predict needs to choose, for each nucleus, the tile that saw it best.
SLIDE_CELL_KEYS = ("visible", "margin", "centroid")


class SlideTileDataset(Dataset):
    """A torch :class:`~torch.utils.data.Dataset` over the tiles of a whole slide, read and resampled lazily.

    Tile ``i`` is the ``tile_size`` square at ``origins[i]`` of the working grid: the slide's pixel grid scaled by
    ``scale`` (the model's pixel size). Its image is resampled (area mean from the nearest pyramid level when the
    grid is coarser, bilinear when finer; white outside the slide) and
    standardised, its labels are read through ``to_labels`` (nearest neighbour), and its nuclei are renumbered
    ``1..N`` in the order of their ids. Items have the format of :class:`TileDataset` items (so
    :func:`collate_tiles` batches both; ``"expr"`` is ``(N, 0)`` and ``"cell_type"`` is -1: nothing is measured),
    plus, per cell, ``"visible"`` (pixels of the nucleus inside the tile), ``"margin"`` (distance of its visible
    centroid to the nearest tile edge) and ``"centroid"`` (visible centroid, ``(x, y)`` on the working grid: pixel
    ``(i, j)`` has centre ``(j + 0.5, i + 0.5)``, :mod:`ghist._centroids`).

    Only the slide region a tile covers is read, when the tile is asked for: the (dask-backed) image and labels stay
    lazy, and the dataset pickles to DataLoader worker processes, which then read and resample tiles in parallel.
    Their chunks are decoded through a cache (:mod:`ghist._chunk_cache`): a sweep of tiles in order decodes each
    chunk about once per row of tiles over it, not once per tile.

    Parameters
    ----------
    image
        ``(c, y, x)`` RGB image (uint8 values), dask- or numpy-backed.
    labels
        ``(y, x)`` nucleus labels.
    origins
        ``(n, 2)`` top-left corners ``(y0, x0)`` of the tiles on the working grid.
    scale
        Working-grid pixels per image pixel (1: the image's own grid, no resampling).
    to_labels
        ``3x3`` affine from working-grid ``(x, y, 1)`` to labels pixel ``(x, y, 1)``.
    tile_size
        Side of the tiles, in working-grid pixels.
    mean, std
        Per-channel statistics (0-255 scale) standardising the image.
    labels_key
        Name of the labels element, for error messages.
    levels
        The image's pyramid, ``(downsample_y, downsample_x, array)`` finest first (see
        :func:`ghist._validation.raster_levels`); default: ``image`` alone. A working grid coarser than the image
        is read from the coarsest level that is at least as fine, and averaged over each working pixel's area
        (anti-aliased, as pyramid levels and training tiles cut at a pixel size are); a finer one is interpolated
        bilinearly from full resolution.

    Raises
    ------
    ValueError
        When a tile is read: its labels hold a negative id (ids are ``0`` for background and positive for nuclei)
        or an id beyond ``int64``. Checked per tile, as tiles are read, so the slide is read once.

    Examples
    --------
    >>> ds = SlideTileDataset(image, labels, origins, scale=1.0, to_labels=np.eye(3), tile_size=256, mean=m, std=s)
    >>> loader = DataLoader(ds, batch_size=8, collate_fn=collate_slide_tiles, num_workers=4)

    """

    def __init__(
        self,
        image: DataArray,
        labels: DataArray,
        origins: np.ndarray,
        *,
        scale: float,
        to_labels: np.ndarray,
        tile_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        labels_key: str = "labels",
        levels: Sequence[tuple[float, float, DataArray]] | None = None,
    ):
        self.image = image
        # Tiles are swept in order across chunks many times their size: read through caches of decoded chunks.
        self.windows = SlideWindows(levels if levels is not None else [(1.0, 1.0, image)], labels, scale, to_labels)
        self.origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        self.scale = float(scale)
        self.to_labels = np.asarray(to_labels, dtype=float)
        self.tile_size = int(tile_size)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.labels_key = str(labels_key)

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"Index {i} out of range for a dataset of {len(self)} tiles.")
        i = int(i) % len(self)
        if get_worker_info() is None:
            return as_tensors(self.read(i))
        import dask

        # In a DataLoader worker the workers are the parallelism: read this tile's few chunks in this thread
        # rather than through a thread pool inherited (and possibly broken) across the fork.
        with dask.config.set(scheduler="synchronous"):
            return as_tensors(self.read(i))

    def read(self, i: int) -> dict[str, Any]:
        """Tile ``i`` as a dict of numpy arrays (``"sample"`` and ``"tile"``: int)."""
        y0, x0 = (int(v) for v in self.origins[i])
        size = self.tile_size
        rgb, lab = self.windows.read(y0, x0, size, size)
        ids, local = np.unique(lab, return_inverse=True)
        local = local.reshape(lab.shape)
        self._check_ids(ids, i)
        if ids.size and ids[0] == 0:
            ids = ids[1:]
        else:
            local = local + 1  # no background pixel in this tile: ids start at local 1
        # The visible part's centroid (the one rule, on this tile's pixels): where the network saw the cell.
        seen = label_centroids(local)
        counts = np.zeros(ids.size, dtype=np.int64)
        xy = np.zeros((ids.size, 2))
        counts[seen.ids - 1], xy[seen.ids - 1] = seen.area, seen.xy
        cx, cy = xy[:, 0], xy[:, 1]
        # Distance from the visible centroid to the nearest tile edge: how much context the network had around it.
        margin = np.minimum(np.minimum(cx, size - cx), np.minimum(cy, size - cy)) - 0.5
        image = (rgb.astype(np.float32) - self.mean[:, None, None]) / self.std[:, None, None]
        n = ids.size
        return {
            "image": image,
            "labels": local.astype(np.int64),
            "cell_id": ids.astype(np.int64),
            "expr": np.zeros((n, 0), dtype=np.float32),
            "cell_type": np.full(n, -1, dtype=np.int64),
            "sample": 0,
            "tile": int(i),
            "visible": counts,
            "margin": margin,
            "centroid": xy + np.array([x0, y0], dtype=np.float64),
        }

    def _check_ids(self, ids: np.ndarray, i: int) -> None:
        """Refuse ids that would turn background into a cell (negative) or overflow the int64 cell ids."""
        if not ids.size:
            return
        if ids[0] < 0:
            raise ValueError(
                f"Labels {self.labels_key!r} hold negative ids (smallest {int(ids[0])}, in tile {i}); expected 0 for "
                "background and positive integers for nuclei. Relabel, e.g. `labels.where(labels > 0, 0)`."
            )
        if ids.dtype == np.uint64 and ids[-1] > np.iinfo(np.int64).max:
            raise ValueError(
                f"Labels {self.labels_key!r} hold ids up to {int(ids[-1])} (in tile {i}); expected ids that fit in "
                "int64. Relabel them consecutively, e.g. with `skimage.segmentation.relabel_sequential`."
            )

    def __repr__(self) -> str:
        return f"SlideTileDataset of {len(self)} tiles of {self.tile_size} px (scale {self.scale:.3g})"


def collate_slide_tiles(items: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Batch :class:`SlideTileDataset` items with :func:`collate_tiles`, leaving out tiles without a nucleus.

    Returns
    -------
    The :func:`collate_tiles` batch plus ``"visible"``, ``"margin"`` and ``"centroid"`` concatenated over the
    cells, or ``None`` when no tile of the batch holds a nucleus.

    """
    items = [item for item in items if item["cell_id"].shape[0]]
    if not items:
        return None
    batch = collate_tiles(items)
    for key in SLIDE_CELL_KEYS:
        batch[key] = torch.cat([item[key] for item in items])
    return batch
