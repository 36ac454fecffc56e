"""The tile store: its layout, and cutting a sample's tile plan into it (used by :func:`ghist.pp.make_tiles`).

Store layout (``path``, zarr v3)::

    attrs["ghist_tiles"]      JSON metadata: genes, cell types, tile size, folds, samples, pixel sizes, ...
    images                    (N, 3, T, T) uint8, one tile per chunk; edge tiles padded with white (255)
    labels                    (N, T, T) int32, the original nucleus ids in the image's pixel space (0 = background)
    tiles/{sample,row,col}    (N,) int32   grid position of every tile
    tiles/{y0,x0}             (N,) int64   top-left image pixel of every tile
    tiles/{band,split}        (N,) int8    spatial band (1..n_folds); split (0 train, 1 val, 2 test) of the store's fold
    tiles/{n_pixels,sum,sumsq}             per-tile pixel count and per-channel sums over real (unpadded) pixels
    tiles/cell_offsets        (N + 1,) int64, tile t's cells are cell_ids[cell_offsets[t]:cell_offsets[t + 1]]
    tiles/cell_ids            (M,) int64   sorted nucleus ids of every tile
    tiles/cell_rows           (M,) int64   row of each of those cells in its sample's ``expr`` (-1: not measured)
    samples/<i>/expr          (n_i, G) float32, log1p(counts), rows ordered by first appearance in the tile grid
    samples/<i>/cell_id       (n_i,) int64
    samples/<i>/cell_type     (n_i,) int32 code into the cell types (-1: unknown)

With spot-level supervision (``spots_key``; format version 2; no measured cells, so every ``cell_rows`` is -1)::

    tiles/cell_spot           (M,) int64   row of each tile cell's spot in its sample's ``spot_expr`` (-1: no spot)
    samples/<i>/spot_expr     (S_i, G) float32, the spots' counts times ``spot_factor`` (count scale, not log1p)
    samples/<i>/spot_factor   (S_i,) float64 the factor applied to each spot's counts (see ``spot_scaling``)
    samples/<i>/spot_n_cells  (S_i,) int64  nuclei whose centroid lies in each spot (over the whole labels)
    attrs: spot_names (per sample, the spots' instance ids), spot_factors (median per sample), spot_coverage,
           spot_target_sum, spot_scaling, tiling
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from tqdm.auto import tqdm

from .._spatial import is_integer_translation
from ._tile_samples import _Sample, _spot_n_cells
from ._tile_spots import spot_tile_origins

logger = logging.getLogger(__name__)

_FORMAT = "ghist.tiles"
_FORMAT_VERSION = 2  # 2: spot-level stores; cell-level stores are still written as version 1
_ATTRS = "ghist_tiles"
_PAD_IMAGE = 255  # white, like glass
_WRITE_BATCH = 64  # tiles buffered before one write
_STRIP_BYTES = 256 * 2**20  # image + labels bytes read at once per strip of tile rows
_EXPR_CHUNK_BYTES = 2**16  # about 64 KiB per expr chunk: a tile's cells span few rows
_EXPR_IN_MEMORY_BYTES = 64 * 2**20  # a sample's expression up to this size is read whole, once per process
_EXPR_BLOCK_ROWS = 16384  # cells densified at once when writing expression
_META_KEYS = ("sample", "row", "col", "y0", "x0", "band", "split", "n_pixels", "sum", "sumsq", "cells")


def _new_meta() -> dict[str, list]:
    """Per-tile metadata, one entry per stored tile, gathered while cutting (:func:`_write_tile_meta` writes it)."""
    return {k: [] for k in _META_KEYS}


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.path.getsize(os.path.join(root, name))
    return total


def _remove_folder(folder: str, owner_pid: int) -> None:
    """Finalizer of :class:`_TempFolder`: remove the folder, in the process that made it only."""
    if os.getpid() != owner_pid:  # a forked DataLoader worker holds a copy of the owner: never delete from there
        return
    size = _folder_bytes(Path(folder)) if logger.isEnabledFor(logging.DEBUG) else 0  # a walk over every chunk file
    shutil.rmtree(folder, ignore_errors=True)
    logger.debug("Removed the temporary tile store %s (%.1f MB)", folder, size / 2**20)


class _TempFolder:
    """A temporary folder holding a tile store, removed once nothing refers to this owner any more.

    Every :class:`~ghist.pp.TileSet` of the store (also those from :meth:`~ghist.pp.TileSet.with_fold` or reopened
    at its path) holds the owner, so the folder lives exactly as long as some tile set of it. Only the creating
    process removes it: a pickled owner (sent to DataLoader workers) comes back as the live owner in the creating
    process and as an inert copy anywhere else.
    """

    _live: ClassVar[weakref.WeakValueDictionary[str, _TempFolder]] = weakref.WeakValueDictionary()

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ghist_tiles_"))
        self.pid = os.getpid()
        self._finalizer: weakref.finalize | None = weakref.finalize(self, _remove_folder, str(self.folder), self.pid)
        _TempFolder._live[os.path.realpath(self.folder)] = self
        logger.debug("Made the temporary folder %s for a tile store", self.folder)

    @classmethod
    def _restore(cls, folder: str, pid: int) -> _TempFolder:
        live = cls._live.get(os.path.realpath(folder))
        if live is not None and live.pid == pid:
            return live
        inert = cls.__new__(cls)  # in another process: refers to the folder, never removes it
        inert.folder, inert.pid, inert._finalizer = Path(folder), pid, None
        return inert

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return _TempFolder._restore, (str(self.folder), self.pid)

    @classmethod
    def owning(cls, path: Path) -> _TempFolder | None:
        """The live owner of the temporary folder holding ``path``, if any (a store reopened at its path)."""
        return cls._live.get(os.path.realpath(Path(path).parent))

    def remove(self) -> None:
        """Remove the folder now (a failed ``make_tiles``)."""
        if self._finalizer is not None:
            self._finalizer()

    def log_created(self, path: Path) -> None:
        logger.info(
            "Tile store written to the temporary folder %s (%.1f MB); it is removed once no TileSet of it is used "
            "any more (pass `path` to keep it).",
            path,
            _folder_bytes(self.folder) / 2**20,
        )


def _new_store_path(path: str | os.PathLike | None) -> tuple[Path, _TempFolder | None]:
    """Where to write a new store, with the owner of its temporary folder when ``path`` is None."""
    if path is None:
        owner = _TempFolder()
        return owner.folder / "tiles.zarr", owner
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"`path` {str(path)!r} already exists and is not empty; pass a new path, or reopen a tile store with "
            "`ghist.pp.TileSet.open(path)`."
        )
    return path, None


def _channel_sums(image: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    flat = image.reshape(3, -1).astype(np.float32)
    return flat.shape[1], flat.sum(axis=1, dtype=np.float64), np.einsum("ij,ij->i", flat, flat, dtype=np.float64)


def _unique_ids(labels: np.ndarray) -> np.ndarray:
    ids = pd.unique(labels.ravel())
    ids = ids[ids != 0]
    ids.sort()
    return ids.astype(np.int64)


class _Writer:
    """Buffers tiles and writes them to the store in batches."""

    def __init__(self, root: zarr.Group, n_max: int, tile_size: int):
        t = tile_size
        self.images = root.create_array(
            "images", shape=(n_max, 3, t, t), chunks=(1, 3, t, t), dtype="uint8", fill_value=_PAD_IMAGE
        )
        self.labels = root.create_array("labels", shape=(n_max, t, t), chunks=(1, t, t), dtype="int32", fill_value=0)
        self.n = 0
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def add(self, image: np.ndarray, labels: np.ndarray) -> None:
        self._images.append(image)
        self._labels.append(labels)
        if len(self._images) >= _WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._images:
            return
        k = len(self._images)
        self.images[self.n : self.n + k] = np.stack(self._images)
        self.labels[self.n : self.n + k] = np.stack(self._labels)
        self.n += k
        self._images, self._labels = [], []

    def close(self) -> None:
        self.flush()
        self.images.resize((self.n, *self.images.shape[1:]))
        self.labels.resize((self.n, *self.labels.shape[1:]))


# --------------------------------------------------------------------------------------------------------------------
# Tile plans: which windows of a sample become tiles
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TilePlan:
    """The tiles to cut from one sample, in store order.

    ``grid`` places every tile in the sample's grid of ``tile_size`` rows and columns: its row decides its band and
    split. ``on_rows``: every tile starts on its grid row (``y0 == row * tile_size``) and the tiles are ordered by
    row, so whole strips of rows can be read at once.
    """

    origins: np.ndarray  # (K, 2) int64 top-left image pixel (y0, x0) of each tile
    grid: np.ndarray  # (K, 2) int64 grid (row, col) of each tile
    n_rows: int
    n_cols: int
    on_rows: bool

    def __len__(self) -> int:
        return len(self.origins)


def _grid_shape(sample: _Sample, tile_size: int) -> tuple[int, int]:
    return math.ceil(sample.height / tile_size), math.ceil(sample.width / tile_size)


def _grid_plan(sample: _Sample, tile_size: int) -> _TilePlan:
    """``tiling="grid"``: a non-overlapping grid over the whole image, row by row (the last tiles cut by the edge)."""
    from .._tiling import plan_grid

    grid = plan_grid((sample.height, sample.width), tile_size, edge="clip")
    return _TilePlan(grid.origins, grid.cells, grid.n_rows, grid.n_cols, on_rows=True)


def _spot_plan(sample: _Sample, tile_size: int) -> _TilePlan:
    """``tiling="spots"``: one tile centred on every spot that holds a nucleus; its grid cell is the spot centre's."""
    n_cells = _spot_n_cells(sample)
    origins, centres = spot_tile_origins(sample.spots, sample.height, sample.width, tile_size)
    inside = (
        (centres[:, 0] >= 0) & (centres[:, 0] < sample.height) & (centres[:, 1] >= 0) & (centres[:, 1] < sample.width)
    )
    keep = (n_cells > 0) & inside
    n_rows, n_cols = _grid_shape(sample, tile_size)
    rows = np.clip(np.floor(centres[keep, 0] / tile_size), 0, n_rows - 1).astype(np.int64)
    cols = np.clip(np.floor(centres[keep, 1] / tile_size), 0, n_cols - 1).astype(np.int64)
    order = np.lexsort((cols, rows))  # top to bottom, like the grid
    return _TilePlan(origins[keep][order], np.c_[rows, cols][order], n_rows, n_cols, on_rows=False)


# --------------------------------------------------------------------------------------------------------------------
# Cutting a plan
# --------------------------------------------------------------------------------------------------------------------
def _strip_rows(sample: _Sample, tile_size: int) -> int:
    """How many tile rows to read at once: about one image chunk high, within the memory budget."""
    data = sample.image.data
    chunk_h = data.chunks[1][0] if hasattr(data, "chunks") and data.chunks is not None else tile_size
    chunk_h = chunk_h if isinstance(chunk_h, int | np.integer) else tile_size
    rows = max(1, math.ceil(int(chunk_h) / tile_size))
    per_row = tile_size * sample.width * (3 + 4)
    return int(max(1, min(rows, _STRIP_BYTES // max(per_row, 1))))


def _strips(sample: _Sample, plan: _TilePlan, tile_size: int) -> Iterator[tuple[int | None, int, np.ndarray]]:
    """Groups of the plan's tiles read together.

    ``(ys, ye, tiles)``: the image rows ``ys:ye`` of a strip and its tiles, or ``ys=None`` for a tile read alone.
    """
    if not plan.on_rows:
        for k in range(len(plan)):
            yield None, 0, np.array([k])
        return
    step = _strip_rows(sample, tile_size)
    rows = plan.grid[:, 0]
    for r0 in range(0, plan.n_rows, step):
        r1 = min(r0 + step, plan.n_rows)
        tiles = np.arange(np.searchsorted(rows, r0), np.searchsorted(rows, r1))
        if tiles.size:
            yield r0 * tile_size, min(r1 * tile_size, sample.height), tiles


def _windows(sample: _Sample, plan: _TilePlan, tile_size: int) -> Iterator[tuple[int, np.ndarray, partial[np.ndarray]]]:
    """Every tile ``k`` of the plan with its labels window and a reader of its image window.

    Windows are cut by :class:`ghist._tiling.SlideWindows` (the cutter predict's tiles come from too). The image is
    read only for tiles that are kept. On the image's own grid a strip of tile rows is cut once and its tiles sliced
    from it; its labels too when the labels map onto the image's rows (axis-aligned or an integer translation).
    Under rotation, or at another pixel size (resampled from the pyramid), each tile is cut on its own.
    """
    from .._tiling import SlideWindows

    t = tile_size
    levels = sample.levels if sample.levels is not None else [(1.0, 1.0, sample.image)]
    windows = SlideWindows(levels, sample.labels, sample.scale, sample.matrix, cache=False)
    labels_by_strip = (sample.matrix[0, 1] == 0 and sample.matrix[1, 0] == 0) or is_integer_translation(sample.matrix)
    for ys, ye, tiles in _strips(sample, plan, t):
        strip_image = strip_labels = None
        if ys is not None:
            if sample.levels is None:
                strip_image = windows.image(ys, 0, ye - ys, sample.width)
            if labels_by_strip:
                strip_labels = windows.labels_window(ys, 0, ye - ys, sample.width)
        for k in tiles.tolist():
            y0, x0 = plan.origins[k].tolist()
            h, w = min(t, sample.height - y0), min(t, sample.width - x0)
            if strip_labels is not None:
                lab = strip_labels[y0 - ys : y0 - ys + h, x0 : x0 + w]
            else:
                lab = windows.labels_window(y0, x0, h, w)
            if strip_image is not None:
                yield k, lab, partial(_slice, strip_image, y0 - ys, x0, h, w)
            else:
                yield k, lab, partial(windows.image, y0, x0, h, w)


def _slice(strip: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    return strip[:, y0 : y0 + h, x0 : x0 + w]


def _cut_tiles(
    sample: _Sample,
    index: int,
    plan: _TilePlan,
    *,
    tile_size: int,
    band_of_row: np.ndarray,
    split_of_row: np.ndarray,
    writer: _Writer,
    meta: dict[str, list],
    pbar: tqdm,
) -> int:
    """Cut the plan's tiles of sample ``index`` into the store; return how many were dropped (no nucleus)."""
    n_dropped = 0
    for k, lab, read_image in _windows(sample, plan, tile_size):
        ids = _unique_ids(lab)
        pbar.update(1)
        if ids.size == 0:
            n_dropped += 1
            continue
        (y0, x0), (r, c) = plan.origins[k].tolist(), plan.grid[k].tolist()
        where = (index, r, c, y0, x0, band_of_row[r], split_of_row[r])
        _store_tile(read_image(), lab, ids, where, tile_size, writer, meta)
    return n_dropped


def _store_tile(
    img: np.ndarray,
    lab: np.ndarray,
    ids: np.ndarray,
    where: tuple[int, int, int, int, int, int, int],
    tile_size: int,
    writer: _Writer,
    meta: dict[str, list],
) -> None:
    """Pad a (possibly partial) tile to ``tile_size``, queue it for writing and record its metadata."""
    t = tile_size
    h, w = lab.shape
    n_pix, s1, s2 = _channel_sums(img)
    if h < t or w < t:
        full_img = np.full((3, t, t), _PAD_IMAGE, dtype=np.uint8)
        full_img[:, :h, :w] = img
        full_lab = np.zeros((t, t), dtype=np.int32)
        full_lab[:h, :w] = lab
        img, lab = full_img, full_lab
    writer.add(np.ascontiguousarray(img, dtype=np.uint8), np.asarray(lab, dtype=np.int32))
    index, r, c, y0, x0, band, split = where
    for key, value in (
        ("sample", index),
        ("row", r),
        ("col", c),
        ("y0", y0),
        ("x0", x0),
        ("band", band),
        ("split", split),
        ("n_pixels", n_pix),
        ("sum", s1),
        ("sumsq", s2),
        ("cells", ids),
    ):
        meta[key].append(value)


# --------------------------------------------------------------------------------------------------------------------
# Per-sample tables and tile metadata
# --------------------------------------------------------------------------------------------------------------------
def _write_sample_spots(root: zarr.Group, sample: _Sample, index: int, tile_cells: list[np.ndarray]) -> np.ndarray:
    """Write the sample's spot targets and cell counts; return each tile cell's spot row (-1: in no spot)."""
    group = root.require_group(f"samples/{index}")
    group.create_array("spot_expr", data=np.asarray(sample.spot_expr, dtype=np.float32))
    group.create_array("spot_n_cells", data=_spot_n_cells(sample))
    group.create_array("spot_factor", data=np.asarray(sample.spot_factor, dtype=np.float64))
    spot = sample.cell_spot.to_numpy()
    flat = np.concatenate(tile_cells) if tile_cells else np.zeros(0, dtype=np.int64)
    where = sample.cell_spot.index.get_indexer(flat)
    return np.where(where >= 0, spot[np.maximum(where, 0)], -1).astype(np.int64)


def _write_sample_cells(
    root: zarr.Group,
    sample: _Sample,
    index: int,
    tile_cells: list[np.ndarray],
    *,
    genes: list[str],
    cell_types: list[str] | None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Write the sample's measured cells (first-appearance order); return each tile cell's row (-1: unmeasured)."""
    flat = np.concatenate(tile_cells) if tile_cells else np.zeros(0, dtype=np.int64)
    seen = pd.unique(flat)
    table_index = pd.Index(sample.table_ids)
    table_row = table_index.get_indexer(seen)
    measured = seen[table_row >= 0]
    measured_table_rows = table_row[table_row >= 0]
    n_genes = len(genes)
    chunk_rows = int(max(16, min(max(len(measured), 1), _EXPR_CHUNK_BYTES // (4 * n_genes))))
    group = root.require_group(f"samples/{index}")
    expr = group.create_array(
        "expr", shape=(len(measured), n_genes), chunks=(chunk_rows, n_genes), dtype="float32", fill_value=np.nan
    )
    gene_idx = pd.Index(sample.table.var_names).get_indexer(genes)
    counts = sample.counts
    for b0 in range(0, len(measured), _EXPR_BLOCK_ROWS):
        rows = measured_table_rows[b0 : b0 + _EXPR_BLOCK_ROWS]
        block = counts[rows][:, gene_idx]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        expr[b0 : b0 + len(rows)] = np.log1p(block.astype(np.float32))
    group.create_array("cell_id", data=measured.astype(np.int64))
    codes = np.full(len(measured), -1, dtype=np.int32)
    if cell_types is not None and sample.types is not None:
        remap = np.array([cell_types.index(str(c)) for c in sample.types.categories], dtype=np.int32)
        own = np.asarray(sample.types.codes)[measured_table_rows]
        codes = np.where(own >= 0, remap[np.maximum(own, 0)] if remap.size else -1, -1).astype(np.int32)
    group.create_array("cell_type", data=codes)
    rows_of_flat = pd.Index(measured).get_indexer(flat).astype(np.int64)
    summary = {
        "n_cells": len(seen),
        "n_measured": len(measured),
        "n_unmeasured": int(len(seen) - len(measured)),
        "n_table_unseen": int(len(sample.table_ids) - len(measured)),
    }
    return rows_of_flat, summary


def _tile_grid_shapes(sample: _Sample, tiles: pd.DataFrame, tile_size: int, image_key: str):
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    f = 1 / sample.scale  # tile origins are on the grid of `pixel_size`; shapes are in the image's pixels
    geometry = [
        box(x0 * f, y0 * f, (x0 + tile_size) * f, (y0 + tile_size) * f) for y0, x0 in zip(tiles["y0"], tiles["x0"])
    ]
    frame = gpd.GeoDataFrame(tiles.reset_index(drop=True), geometry=geometry)
    transformations = get_transformation(sample.sdata.images[image_key], get_all=True)
    return ShapesModel.parse(frame, transformations=transformations)


def _write_tile_meta(
    root: zarr.Group, meta: dict[str, list], cell_rows: list[np.ndarray], cell_spots: list[np.ndarray] | None = None
) -> None:
    n = len(meta["sample"])
    group = root.require_group("tiles")
    for key, dtype in (("sample", np.int32), ("row", np.int32), ("col", np.int32), ("y0", np.int64), ("x0", np.int64)):
        group.create_array(key, data=np.asarray(meta[key], dtype=dtype).reshape(n))
    for key in ("band", "split"):
        group.create_array(key, data=np.asarray(meta[key], dtype=np.int8).reshape(n))
    group.create_array("n_pixels", data=np.asarray(meta["n_pixels"], dtype=np.int64).reshape(n))
    for key in ("sum", "sumsq"):
        group.create_array(key, data=np.asarray(meta[key], dtype=np.float64).reshape(n, 3))
    counts = np.array([len(c) for c in meta["cells"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ids = np.concatenate(meta["cells"]).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    rows = np.concatenate(cell_rows).astype(np.int64) if cell_rows else np.zeros(0, dtype=np.int64)
    group.create_array("cell_offsets", data=offsets)
    group.create_array("cell_ids", data=ids)
    group.create_array("cell_rows", data=rows)
    if cell_spots is not None:
        spots = np.concatenate(cell_spots).astype(np.int64) if cell_spots else np.zeros(0, dtype=np.int64)
        group.create_array("cell_spot", data=spots)


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------
def _maybe_in_memory(array: zarr.Array) -> zarr.Array | np.ndarray:
    """Small expression matrices are read whole (one read instead of chunk reads for every tile)."""
    if math.prod(array.shape) * array.dtype.itemsize <= _EXPR_IN_MEMORY_BYTES:
        return np.asarray(array[...])
    return array
