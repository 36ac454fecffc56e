"""Training tiles: cut once into an on-disk chunked zarr store, split into spatial folds, read lazily by torch.

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

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from spatialdata import SpatialData
from tqdm.auto import tqdm

from .._constants import IMAGE_KEY, LABELS_KEY, TABLE_KEY
from .._docs import doc_image_key, doc_labels_key, doc_params, doc_progress, doc_table_key
from .._spatial import element_affine, image_pixel_size, is_integer_translation, read_labels_window
from .._validation import (
    ValidationError,
    _preview,
    check_cell_types,
    check_genes,
    check_instances,
    check_key_added,
    get_counts,
    get_image,
    get_labels,
    table_of_region,
)
from .._version import __version__
from ._tile_spots import SpotData, cells_in_spots, nucleus_centroids, prepare_spots, spot_targets, spot_tile_origins

if TYPE_CHECKING:
    from .._model._data import TileDataset

logger = logging.getLogger(__name__)

__all__ = ["TileSet", "make_tiles"]

_FORMAT = "ghist.tiles"
_FORMAT_VERSION = 2  # 2: spot-level stores; cell-level stores are still written as version 1
_ATTRS = "ghist_tiles"
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
_PAD_IMAGE = 255  # white, like glass
_WRITE_BATCH = 64  # tiles buffered before one write
_STRIP_BYTES = 256 * 2**20  # image + labels bytes read at once per band of tile rows
_EXPR_CHUNK_BYTES = 2**16  # about 64 KiB per expr chunk: a tile's cells span few rows
_EXPR_IN_MEMORY_BYTES = 64 * 2**20  # a sample's expression up to this size is read whole, once per process
_EXPR_BLOCK_ROWS = 16384  # cells densified at once when writing expression


# --------------------------------------------------------------------------------------------------------------------
# Spatial folds
# --------------------------------------------------------------------------------------------------------------------
def row_bands(n_rows: int, n_folds: int) -> np.ndarray:
    """1-based band of every tile row: ``n_folds`` horizontal bands of (nearly) equal height, top to bottom."""
    return (np.arange(n_rows) * n_folds // max(n_rows, 1) + 1).astype(np.int8)


def split_rows(n_rows: int, n_folds: int, fold: int | None) -> np.ndarray:
    """Split (``TRAIN``/``VAL``/``TEST``) of every tile row.

    Band ``fold`` is test; the validation band is the tenth of the rows (at least one) right below it, wrapping
    around to the top; the rest trains. ``fold=None``: every row trains.
    """
    split = np.full(n_rows, TRAIN, dtype=np.int8)
    if fold is None:
        return split
    test = np.flatnonzero(row_bands(n_rows, n_folds) == fold)
    split[test] = TEST
    if test.size == 0:
        return split
    n_val = max(1, math.floor(n_rows / 10 + 0.5))
    val = (test[-1] + 1 + np.arange(n_val)) % n_rows
    val = val[split[val] != TEST]
    split[val] = VAL
    return split


def _check_folds(n_folds: int, fold: int | None) -> None:
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 2:
        raise ValueError(f"`n_folds` must be an integer >= 2; got {n_folds!r}.")
    if fold is not None and (
        isinstance(fold, bool) or not isinstance(fold, int | np.integer) or not 1 <= fold <= n_folds
    ):
        raise ValueError(f"`fold` must be an integer in 1..{n_folds} (1-based test band) or None; got {fold!r}.")


def _split_problem(name: str, n_rows: int, n_folds: int, fold: int | None, tile_size: int) -> str | None:
    if fold is None:
        return None
    split = split_rows(n_rows, n_folds, fold)
    counts = {SPLIT_NAMES[s]: int((split == s).sum()) for s in (TRAIN, VAL, TEST)}
    empty = [k for k, v in counts.items() if v == 0]
    if not empty:
        return None
    return (
        f"sample {name!r} has {n_rows} rows of {tile_size}-px tiles; with n_folds={n_folds}, fold={fold} the "
        f"{'/'.join(empty)} split would be empty (train {counts['train']}, val {counts['val']}, test {counts['test']} "
        f"rows); expected at least one row each: use a smaller `tile_size` or fewer `n_folds`."
    )


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Sample:
    name: str
    sdata: SpatialData
    image: Any  # DataArray (c, y, x)
    labels: Any  # DataArray (y, x)
    matrix: np.ndarray  # image px -> label px
    table: Any  # AnnData rows annotating the labels
    table_ids: np.ndarray  # int64
    counts: Any  # X or layer of `table` (all genes)
    types: pd.Categorical | None
    pixel_size: float | None
    height: int
    width: int
    spots: SpotData | None = None
    spot_expr: np.ndarray | None = None  # (S, G) targets of the chosen genes
    spot_factor: np.ndarray | None = None  # (S,) factor applied to each spot's counts
    cell_spot: pd.Series | None = None  # nucleus id -> spot row (-1: in no spot), over the whole labels


def _as_samples(sdata_or_list: Any) -> list[tuple[str, SpatialData]]:
    if isinstance(sdata_or_list, SpatialData):
        return [("0", sdata_or_list)]
    if isinstance(sdata_or_list, Mapping):
        items = [(str(k), v) for k, v in sdata_or_list.items()]
    elif isinstance(sdata_or_list, Sequence) and not isinstance(sdata_or_list, str):
        items = [(str(i), v) for i, v in enumerate(sdata_or_list)]
    else:
        raise TypeError(
            f"Expected a SpatialData, a list of SpatialData or a dict name -> SpatialData; got "
            f"{type(sdata_or_list).__name__}."
        )
    if not items:
        raise ValueError("No samples given: expected at least one SpatialData.")
    bad = [name for name, s in items if not isinstance(s, SpatialData)]
    if bad:
        raise TypeError(f"Samples {bad} are not SpatialData objects.")
    return items


def _label_ids(labels: Any) -> np.ndarray:
    data = labels.data
    if hasattr(data, "dask"):
        import dask.array as da

        return np.asarray(da.unique(data).compute())
    return np.unique(np.asarray(data))


def _check_label_ids(label_ids: np.ndarray, labels_key: str) -> None:
    if label_ids.size and (label_ids.min() < 0 or label_ids.max() > np.iinfo(np.int32).max):
        raise ValueError(
            f"Labels {labels_key!r} hold ids in [{label_ids.min()}, {label_ids.max()}]; expected ids in "
            f"[0, {np.iinfo(np.int32).max}] (0 = background)."
        )


def _sample_matrix(
    sdata: SpatialData, name: str, *, image_key: str, labels_key: str, key_added: str | None
) -> np.ndarray:
    """Image -> labels pixel affine of a sample, checked invertible; also refuses an existing ``key_added``."""
    matrix = element_affine(sdata, image_key, labels_key)
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise ValueError(f"The transformation from image {image_key!r} to labels {labels_key!r} is singular.")
    if key_added is not None:
        check_key_added(sdata, key_added, "shapes", overwrite=None, where=f" of sample {name!r}")
    return matrix


def _prepare_sample(
    name: str,
    sdata: SpatialData,
    *,
    image_key: str,
    labels_key: str,
    table_key: str,
    cell_type_key: str | None,
    layer: str | None,
    key_added: str | None,
    spots_key: str | None = None,
) -> _Sample:
    if spots_key is not None:
        return _prepare_spot_sample(
            name,
            sdata,
            image_key=image_key,
            labels_key=labels_key,
            table_key=table_key,
            spots_key=spots_key,
            layer=layer,
            key_added=key_added,
        )
    image = get_image(sdata, image_key)
    labels = get_labels(sdata, labels_key)
    table, _, instance_key = table_of_region(sdata, table_key, labels_key, what="cells")
    where = f"table {table_key!r}"
    if layer is not None and layer not in table.layers:
        raise KeyError(f"Layer {layer!r} not found in {where} (have {sorted(table.layers)}).")
    ids = table.obs[instance_key]
    if not pd.api.types.is_integer_dtype(ids.dtype):
        raise ValueError(
            f"{where.capitalize()} instance key `obs[{instance_key!r}]` has dtype {ids.dtype}; expected integer "
            f"nucleus ids of labels {labels_key!r}."
        )
    ids = ids.to_numpy().astype(np.int64)
    dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()
    if len(dup):
        raise ValueError(f"{where.capitalize()} lists nucleus ids {_preview(dup.tolist())} more than once.")
    label_ids = _label_ids(labels)
    _check_label_ids(label_ids, labels_key)
    check_instances(ids, label_ids, table_key=table_key, labels_key=labels_key)
    types = check_cell_types(table, cell_type_key, table_key=table_key)
    matrix = _sample_matrix(sdata, name, image_key=image_key, labels_key=labels_key, key_added=key_added)
    return _Sample(
        name=name,
        sdata=sdata,
        image=image,
        labels=labels,
        matrix=matrix,
        table=table,
        table_ids=ids,
        counts=None,
        types=types,
        pixel_size=image_pixel_size(sdata, image_key),
        height=int(image.sizes["y"]),
        width=int(image.sizes["x"]),
    )


def _prepare_spot_sample(
    name: str,
    sdata: SpatialData,
    *,
    image_key: str,
    labels_key: str,
    table_key: str,
    spots_key: str,
    layer: str | None,
    key_added: str | None,
) -> _Sample:
    """A sample supervised by spots: the table annotates the spot circles, no cell is measured."""
    image = get_image(sdata, image_key)
    labels = get_labels(sdata, labels_key)
    spots = prepare_spots(
        sdata, spots_key=spots_key, table_key=table_key, image_key=image_key, labels_key=labels_key, layer=layer
    )
    label_ids = _label_ids(labels)
    _check_label_ids(label_ids, labels_key)
    matrix = _sample_matrix(sdata, name, image_key=image_key, labels_key=labels_key, key_added=key_added)
    return _Sample(
        name=name,
        sdata=sdata,
        image=image,
        labels=labels,
        matrix=matrix,
        table=spots.table,
        table_ids=np.zeros(0, dtype=np.int64),  # no measured cell
        counts=None,
        types=None,
        pixel_size=image_pixel_size(sdata, image_key),
        height=int(image.sizes["y"]),
        width=int(image.sizes["x"]),
        spots=spots,
    )


def _assign_spots(sample: _Sample) -> dict[str, float]:
    """Give every nucleus of the sample the spot holding its centroid; return a summary."""
    ids, xy = nucleus_centroids(sample.labels)
    spot = cells_in_spots(xy, sample.spots)
    sample.cell_spot = pd.Series(spot, index=ids)
    n_cells = _spot_n_cells(sample)
    return {
        "n_spots": len(n_cells),
        "n_spots_with_cells": int((n_cells > 0).sum()),
        "median_cells": float(np.median(n_cells[n_cells > 0])) if (n_cells > 0).any() else 0.0,
        "n_cells_in_spots": int(n_cells.sum()),
    }


def _spot_n_cells(sample: _Sample) -> np.ndarray:
    """Number of nuclei whose centroid lies in each spot of the sample (over the whole labels)."""
    spot = sample.cell_spot.to_numpy()
    return np.bincount(spot[spot >= 0], minlength=len(sample.spots.names)).astype(np.int64)


def _raise_collected(errors: list[tuple[str, Exception]], n_samples: int) -> None:
    if not errors:
        return
    if len(errors) == 1:
        name, err = errors[0]
        if n_samples == 1 or isinstance(err, ValidationError) or type(err) not in (KeyError, ValueError, TypeError):
            raise err
        msg = err.args[0] if err.args else str(err)
        raise type(err)(f"Sample {name!r}: {msg}") from err
    raise ValidationError([f"sample {name!r}: {err.args[0] if err.args else err}" for name, err in errors])


def _choose_genes(samples: list[_Sample], genes: Sequence[str] | None, table_key: str) -> list[str]:
    if genes is not None:
        for s in samples:
            where = f"table {table_key!r}" if len(samples) == 1 else f"table {table_key!r} of sample {s.name!r}"
            genes = check_genes(s.table.var_names, genes, where=where)
        return list(genes)
    common = pd.Index(samples[0].table.var_names)
    for s in samples[1:]:
        common = common[common.isin(s.table.var_names)]
    if len(common) == 0:
        raise ValueError(f"The tables {table_key!r} of samples {[s.name for s in samples]} share no gene.")
    dropped = len(samples[0].table.var_names) - len(common)
    if dropped:
        logger.info(
            "Using the %d genes common to all samples (%d of the first sample's are not).", len(common), dropped
        )
    return list(common)


def _cell_type_categories(samples: list[_Sample]) -> list[str] | None:
    if samples[0].types is None:
        return None
    names: list[str] = []
    for s in samples:
        names.extend(str(c) for c in s.types.categories if str(c) not in names)
    return names


# --------------------------------------------------------------------------------------------------------------------
# make_tiles
# --------------------------------------------------------------------------------------------------------------------
def _new_store_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="ghist_tiles_")) / "tiles.zarr"
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"`path` {str(path)!r} already exists and is not empty; pass a new path, or reopen a tile store with "
            "`ghist.pp.TileSet.open(path)`."
        )
    return path


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


def _band_rows(sample: _Sample, tile_size: int) -> int:
    """How many tile rows to read at once: about one image chunk high, within the memory budget."""
    data = sample.image.data
    chunk_h = data.chunks[1][0] if hasattr(data, "chunks") and data.chunks is not None else tile_size
    chunk_h = chunk_h if isinstance(chunk_h, int | np.integer) else tile_size
    rows = max(1, math.ceil(int(chunk_h) / tile_size))
    per_row = tile_size * sample.width * (3 + 4)
    return int(max(1, min(rows, _STRIP_BYTES // max(per_row, 1))))


def _cut_sample(
    sample: _Sample,
    index: int,
    *,
    tile_size: int,
    split_of_row: np.ndarray,
    bands: np.ndarray,
    writer: _Writer,
    meta: dict[str, list],
    pbar: tqdm,
) -> dict[str, int]:
    t = tile_size
    n_rows, n_cols = math.ceil(sample.height / t), math.ceil(sample.width / t)
    axis_aligned = sample.matrix[0, 1] == 0 and sample.matrix[1, 0] == 0
    identity_like = is_integer_translation(sample.matrix)
    step = _band_rows(sample, t)
    n_dropped = 0
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        ys, ye = r0 * t, min(r1 * t, sample.height)
        strip = np.asarray(sample.image.data[:, ys:ye, :])
        lab_strip = None
        if axis_aligned or identity_like:
            lab_strip = read_labels_window(sample.labels, sample.matrix, ys, 0, ye - ys, sample.width)
        for r in range(r0, r1):
            y0 = r * t
            h = min(t, sample.height - y0)
            for c in range(n_cols):
                x0 = c * t
                w = min(t, sample.width - x0)
                if lab_strip is not None:
                    lab = lab_strip[y0 - ys : y0 - ys + h, x0 : x0 + w]
                else:
                    lab = read_labels_window(sample.labels, sample.matrix, y0, x0, h, w)
                ids = _unique_ids(lab)
                pbar.update(1)
                if ids.size == 0:
                    n_dropped += 1
                    continue
                img = strip[:, y0 - ys : y0 - ys + h, x0 : x0 + w]
                _store_tile(img, lab, ids, (index, r, c, y0, x0, bands[r], split_of_row[r]), t, writer, meta)
    return {"n_rows": n_rows, "n_cols": n_cols, "n_dropped": n_dropped}


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


def _spot_tile_plan(sample: _Sample, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Origins (y0, x0) of the spot-centred tiles of a sample and their grid (row, col), for spots with cells."""
    n_cells = _spot_n_cells(sample)
    origins, centres = spot_tile_origins(sample.spots, sample.height, sample.width, tile_size)
    inside = (
        (centres[:, 0] >= 0) & (centres[:, 0] < sample.height) & (centres[:, 1] >= 0) & (centres[:, 1] < sample.width)
    )
    keep = (n_cells > 0) & inside
    n_rows, n_cols = math.ceil(sample.height / tile_size), math.ceil(sample.width / tile_size)
    rows = np.clip(np.floor(centres[keep, 0] / tile_size), 0, n_rows - 1).astype(np.int64)
    cols = np.clip(np.floor(centres[keep, 1] / tile_size), 0, n_cols - 1).astype(np.int64)
    order = np.lexsort((cols, rows))  # top to bottom, like the grid
    return origins[keep][order], np.c_[rows, cols][order]


def _cut_spot_tiles(
    sample: _Sample,
    index: int,
    *,
    tile_size: int,
    split_of_row: np.ndarray,
    bands: np.ndarray,
    writer: _Writer,
    meta: dict[str, list],
    pbar: tqdm,
) -> dict[str, int]:
    """``tiling="spots"``: one tile centred on every spot that holds a nucleus; bands by the spot's grid row."""
    t = tile_size
    origins, grid = _spot_tile_plan(sample, t)
    n_dropped = 0
    for (y0, x0), (r, c) in zip(origins.tolist(), grid.tolist()):
        h, w = min(t, sample.height - y0), min(t, sample.width - x0)
        lab = read_labels_window(sample.labels, sample.matrix, y0, x0, h, w)
        ids = _unique_ids(lab)
        pbar.update(1)
        if ids.size == 0:
            n_dropped += 1
            continue
        img = np.asarray(sample.image.data[:, y0 : y0 + h, x0 : x0 + w])
        _store_tile(img, lab, ids, (index, r, c, y0, x0, bands[r], split_of_row[r]), t, writer, meta)
    return {"n_rows": math.ceil(sample.height / t), "n_cols": math.ceil(sample.width / t), "n_dropped": n_dropped}


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

    geometry = [box(x0, y0, x0 + tile_size, y0 + tile_size) for y0, x0 in zip(tiles["y0"], tiles["x0"])]
    frame = gpd.GeoDataFrame(tiles.reset_index(drop=True), geometry=geometry)
    transformations = get_transformation(sample.sdata.images[image_key], get_all=True)
    return ShapesModel.parse(frame, transformations=transformations)


@doc_params(image_key=doc_image_key, labels_key=doc_labels_key, table_key=doc_table_key, progress=doc_progress)
def make_tiles(
    sdata: SpatialData | Sequence[SpatialData] | Mapping[str, SpatialData],
    *,
    image_key: str = IMAGE_KEY,
    labels_key: str = LABELS_KEY,
    table_key: str = TABLE_KEY,
    cell_type_key: str | None = None,
    spots_key: str | None = None,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    tile_size: int = 256,
    n_folds: int = 5,
    fold: int | None = 1,
    path: str | os.PathLike | None = None,
    key_added: str | None = None,
    tiling: Literal["grid", "spots"] = "grid",
    spot_coverage: float = 1.0,
    spot_target_sum: float | None = 1e4,
    spot_scaling: Literal["spot", "sample"] = "spot",
    progress: bool = True,
) -> TileSet:
    """Cut training tiles once into an on-disk store, with spatial folds.

    Every sample's H&E image is cut into a non-overlapping grid of ``tile_size`` tiles (in the image's own pixel
    space; edge tiles are padded with white and label 0). The nucleus labels are resampled into that pixel space
    through the coordinate transformations of ``sdata`` (nearest neighbour), so labels and image may live in
    different pixel spaces. Tiles without any labelled nucleus are dropped. The tiles, the per-cell expression
    (``log1p`` of the counts) and the cell types go to a chunked zarr store at ``path`` which
    :class:`TileSet` reads lazily.

    **Spatial folds.** Each sample's tile rows are split into ``n_folds`` horizontal bands of (nearly) equal height.
    Band ``fold`` (1-based, top first) is the test set; the tenth of the image right below it (at least one tile
    row, wrapping around to the top) is the validation set; all other rows train. Tiles are never split at random:
    neighbouring tiles share cells and tissue.

    **No cell in two splits.** A nucleus cut by a tile boundary appears in both tiles. Where a training tile
    shares a nucleus with a validation or test tile, that nucleus' pixels are labelled ``-1`` ("ignore") in the
    training tile: they are neither supervised (pixel map, cell type, expression) nor pooled into a cell. So no
    cell ever supervises training while also being evaluated. The store keeps the original ids, so the fold can be
    changed later with :meth:`TileSet.with_fold` without cutting again.

    **Spot-level supervision** (Visium / legacy ST; ``spots_key``). The sample holds the spots as a
    ``ShapesModel`` of circles (points with a ``"radius"`` column) and ``table_key`` names a table of raw spot
    counts annotating them (``region=spots_key``, instance key = the circles' index); no cell is measured, so the
    tiles' per-cell ``expr`` is NaN, and cell types are not available (``cell_type_key`` must be ``None``).
    Every nucleus belongs to the spot whose circle holds its centroid (computed over the whole labels and mapped
    through the coordinate transformations, so labels, image and spots may live in different spaces). A spot's
    target is its counts scaled to a library size (total over all genes of the table) of ``spot_target_sum``
    times its number of nuclei over the sample's median number per spot (``spot_scaling="spot"``), so that
    neither sections nor spots of different sequencing depth differ in scale, while a spot with more cells keeps
    more counts, as the sum of its cells' predicted counts does; the loss compares that sum with the target on
    the ``log1p`` scale (:func:`ghist._model._losses.spot_loss`). A tile supervises a spot
    only when at least ``spot_coverage`` of the spot's nuclei are visible (and not ``-1``) in it; the target of a
    partly visible spot is scaled by its visible fraction of nuclei. The default ``spot_coverage=1`` uses only
    spots whose nuclei are all in the tile: with ``tiling="grid"`` spots cut by a tile edge are then unused, so
    ``tiling="spots"`` (one tile centred on each spot holding a nucleus, shifted inside the image at its edges;
    folds by the grid row of the spot's centre) is the usual choice when spots are a sizeable fraction of a tile.
    Items of the datasets gain ``"cell_spot"`` and ``"spot_expr"`` (see :class:`TileSet`).

    Parameters
    ----------
    sdata
        One :class:`spatialdata.SpatialData` holding the H&E image, the nucleus labels and a table of measured
        cells annotating the labels; or a list of them (samples named ``"0"``, ``"1"``, ...); or a dict
        name -> SpatialData.
    {image_key}
    {labels_key}
    {table_key}
    cell_type_key
        Column of the table's ``obs`` holding cell types (``None``: no cell types; missing values: unknown).
    spots_key
        Circles of ``sdata.shapes`` for spot-level supervision (see above); ``table_key`` then names the table of
        raw spot counts annotating them.
    genes
        Genes to learn. Default: the genes common to every sample's table, in the first table's order.
    layer
        Layer of the table holding raw counts (default ``X``).
    tile_size
        Side of the square tiles, in pixels of the image.
    n_folds
        Number of horizontal bands per sample.
    fold
        The test band, 1-based (top band first). ``None``: every tile trains (no validation or test).
    path
        Directory of the new zarr store; must not exist or be empty. Default: a new temporary directory.
    key_added
        If given, also write the grid of kept tiles as polygons to ``sdata.shapes[key_added]`` of every sample
        (columns ``tile``, ``row``, ``col``, ``split``, ``n_cells``), in the image's coordinate systems.
    tiling
        ``"grid"``: a non-overlapping grid over the whole image; ``"spots"`` (needs ``spots_key``): one tile
        centred on every spot that holds a nucleus.
    spot_coverage
        Smallest visible fraction of a spot's nuclei for a tile to supervise that spot, in ``(0, 1]``.
    spot_target_sum
        Library size of a spot with the sample's median number of nuclei, that spot counts are scaled to (see
        ``spot_scaling``); ``None`` keeps raw counts.
    spot_scaling
        ``"spot"``: every spot is scaled on its own, to ``spot_target_sum`` times its number of nuclei over the
        sample's median number of nuclei per spot, so each spot's sequencing depth (which varies many-fold
        between the spots of one legacy ST section) is removed and only its composition and cell number are
        learnt. ``"sample"``: one factor per sample, ``spot_target_sum / median library size``, keeping the
        depth differences between its spots.
    {progress}

    Returns
    -------
    The :class:`TileSet` over the new store. With ``key_added``: ``sdata.shapes[key_added]`` for every sample.

    Examples
    --------
    >>> tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type", tile_size=256, fold=1)
    >>> tiles
    >>> loader = torch.utils.data.DataLoader(tiles.train, batch_size=8, shuffle=True, collate_fn=collate_tiles)

    """
    _check_spot_args(spots_key, cell_type_key, tiling, spot_coverage, spot_target_sum, spot_scaling)
    if isinstance(tile_size, bool) or not isinstance(tile_size, int | np.integer) or tile_size < 8:
        raise ValueError(f"`tile_size` must be an integer >= 8 pixels; got {tile_size!r}.")
    tile_size = int(tile_size)
    _check_folds(n_folds, fold)
    named = _as_samples(sdata)

    # Validate everything up front, before any work.
    samples: list[_Sample] = []
    errors: list[tuple[str, Exception]] = []
    for name, s in named:
        try:
            samples.append(
                _prepare_sample(
                    name,
                    s,
                    image_key=image_key,
                    labels_key=labels_key,
                    table_key=table_key,
                    cell_type_key=cell_type_key,
                    layer=layer,
                    key_added=key_added,
                    spots_key=spots_key,
                )
            )
        except (KeyError, ValueError, TypeError) as err:
            errors.append((name, err))
    _raise_collected(errors, len(named))
    genes = _choose_genes(samples, genes, table_key)
    spot_summaries = []
    if spots_key is not None:
        for s in samples:  # before subsetting the genes: the library size counts every gene
            spot_summaries.append(_assign_spots(s))
            s.spot_expr, s.spot_factor = spot_targets(
                s.spots, genes, spot_target_sum, scaling=spot_scaling, n_cells=_spot_n_cells(s)
            )
    for s in samples:  # counts of the chosen genes only
        s.table = s.table[:, genes]
        where = f"table {table_key!r}" + (f" of sample {s.name!r}" if len(samples) > 1 else "")
        s.counts = get_counts(s.table, layer=layer, where=where)
    cell_types = _cell_type_categories(samples)
    problems = [
        p
        for s in samples
        if (p := _split_problem(s.name, math.ceil(s.height / tile_size), n_folds, fold, tile_size)) is not None
    ]
    if problems:
        raise ValueError(problems[0]) if len(problems) == 1 else ValidationError(problems)
    path = _new_store_path(path)

    logger.info("Cutting %d sample(s) into %d-px tiles at %s", len(samples), tile_size, path)
    if tiling == "spots":
        n_grid = sum(len(_spot_tile_plan(s, tile_size)[0]) for s in samples)
    else:
        n_grid = sum(math.ceil(s.height / tile_size) * math.ceil(s.width / tile_size) for s in samples)
    try:
        root = zarr.open_group(str(path), mode="w")
        writer = _Writer(root, n_grid, tile_size)
        meta: dict[str, list] = {
            k: [] for k in ("sample", "row", "col", "y0", "x0", "band", "split", "n_pixels", "sum", "sumsq", "cells")
        }
        grid: list[dict[str, int]] = []
        summaries: list[dict[str, int]] = []
        cell_rows: list[np.ndarray] = []
        cell_spots: list[np.ndarray] = []
        cut = _cut_spot_tiles if tiling == "spots" else _cut_sample
        with tqdm(total=n_grid, desc="ghist.pp.make_tiles", unit="tile", disable=not progress) as pbar:
            for i, s in enumerate(samples):
                n_rows = math.ceil(s.height / tile_size)
                start = len(meta["cells"])
                info = cut(
                    s,
                    i,
                    tile_size=tile_size,
                    split_of_row=split_rows(n_rows, n_folds, fold),
                    bands=row_bands(n_rows, n_folds),
                    writer=writer,
                    meta=meta,
                    pbar=pbar,
                )
                grid.append(info)
                rows, summary = _write_sample_cells(
                    root, s, i, meta["cells"][start:], genes=genes, cell_types=cell_types
                )
                cell_rows.append(rows)
                summaries.append(summary)
                if spots_key is not None:
                    cell_spots.append(_write_sample_spots(root, s, i, meta["cells"][start:]))
        writer.close()
        if writer.n == 0:
            raise ValueError(
                f"No tile of image {image_key!r} shows a nucleus of labels {labels_key!r}: the image does not overlap "
                "the labels; check the coordinate transformations of both elements."
            )
        _write_tile_meta(root, meta, cell_rows, cell_spots if spots_key is not None else None)
        attrs = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION if spots_key is not None else 1,
            "genes": genes,
            "cell_types": cell_types,
            "tile_size": tile_size,
            "n_folds": int(n_folds),
            "fold": None if fold is None else int(fold),
            "samples": [s.name for s in samples],
            "n_rows": [g["n_rows"] for g in grid],
            "n_cols": [g["n_cols"] for g in grid],
            "image_shapes": [[s.height, s.width] for s in samples],
            "pixel_sizes": [s.pixel_size for s in samples],
            "n_dropped": [g["n_dropped"] for g in grid],
            "n_cells": [sm["n_cells"] for sm in summaries],
            "image_key": image_key,
            "labels_key": labels_key,
            "table_key": table_key,
            "cell_type_key": cell_type_key,
            "spots_key": spots_key,
            "layer": layer,
            "expr": "log1p(counts)",
            "tiling": tiling,
            "ghist_version": __version__,
        }
        if spots_key is not None:
            attrs.update(
                {
                    "spot_names": [s.spots.names for s in samples],
                    "spot_factors": [float(np.nanmedian(s.spot_factor)) for s in samples],
                    "spot_scaling": spot_scaling,
                    "spot_coverage": float(spot_coverage),
                    "spot_target_sum": None if spot_target_sum is None else float(spot_target_sum),
                    "spot_expr": "counts * samples/<i>/spot_factor (count scale, not log1p)",
                }
            )
        root.attrs[_ATTRS] = json.loads(json.dumps(attrs))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise

    tiles = TileSet(path)
    root.attrs[_ATTRS] = {**root.attrs[_ATTRS], "mean": tiles.mean.tolist(), "std": tiles.std.tolist()}
    n_drop = sum(g["n_dropped"] for g in grid)
    logger.info(
        "Cut %d tiles (train %d, val %d, test %d; %d without nuclei dropped) from %d sample(s): %d cells "
        "(%d without measurement), %d genes%s",
        len(tiles),
        len(tiles.train),
        len(tiles.val),
        len(tiles.test),
        n_drop,
        len(samples),
        tiles.n_cells,
        sum(sm["n_unmeasured"] for sm in summaries),
        len(genes),
        f", {len(cell_types)} cell types" if cell_types is not None else "",
    )
    for s, sm in zip(samples, spot_summaries):
        logger.info(
            "Sample %r: %d of %d spots hold a nucleus centroid (median %.0f nuclei per spot, %d nuclei in spots); "
            "spot counts scaled by %.3g (median over spots)",
            s.name,
            sm["n_spots_with_cells"],
            sm["n_spots"],
            sm["median_cells"],
            sm["n_cells_in_spots"],
            float(np.nanmedian(s.spot_factor)),
        )
        if sm["n_spots_with_cells"] == 0:
            logger.warning("Sample %r: no nucleus lies in any spot; check the spots' transformations.", s.name)
    unseen = sum(sm["n_table_unseen"] for sm in summaries)
    if unseen:
        logger.info("%d table cells fall in no tile (outside the image) and were left out.", unseen)
    if len(set(tiles.pixel_sizes) - {None}) > 1:
        logger.warning("The samples' images have different pixel sizes: %s µm/px.", tiles.pixel_sizes)
    for split in ("train", "val", "test") if fold is not None else ("train",):
        if len(getattr(tiles, split)) == 0:
            logger.warning("The %s split has no tile with nuclei.", split)

    if key_added is not None:
        table = tiles.tile_table()
        for s in samples:
            sub = table[table["sample"] == s.name].drop(columns=["sample"])
            s.sdata.shapes[key_added] = _tile_grid_shapes(s, sub, tile_size, image_key)
            logger.info("Added `sdata.shapes[%r]` (%d tiles) to sample %r", key_added, len(sub), s.name)
    return tiles


def _check_spot_args(
    spots_key: str | None,
    cell_type_key: str | None,
    tiling: str,
    spot_coverage: float,
    spot_target_sum: float | None,
    spot_scaling: str,
) -> None:
    if tiling not in ("grid", "spots"):
        raise ValueError(f"`tiling` must be 'grid' or 'spots'; got {tiling!r}.")
    if spot_scaling not in ("spot", "sample"):
        raise ValueError(f"`spot_scaling` must be 'spot' or 'sample'; got {spot_scaling!r}.")
    if spots_key is None:
        if tiling == "spots":
            raise ValueError("`tiling='spots'` centres tiles on spots; pass `spots_key` (the spot circles) too.")
        return
    if cell_type_key is not None:
        raise ValueError(
            f"`cell_type_key={cell_type_key!r}` was given with `spots_key={spots_key!r}`; spot-level tiles carry no "
            "cell types (the table annotates spots, not cells). Pass `cell_type_key=None`."
        )
    if isinstance(spot_coverage, bool) or not isinstance(spot_coverage, int | float) or not 0 < spot_coverage <= 1:
        raise ValueError(f"`spot_coverage` must be a fraction in (0, 1]; got {spot_coverage!r}.")
    if spot_target_sum is not None and (
        isinstance(spot_target_sum, bool) or not isinstance(spot_target_sum, int | float) or not spot_target_sum > 0
    ):
        raise ValueError(f"`spot_target_sum` must be a positive number or None; got {spot_target_sum!r}.")


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
# TileSet and its torch datasets
# --------------------------------------------------------------------------------------------------------------------
class TileSet:
    """Training tiles in an on-disk store (made by :func:`ghist.pp.make_tiles`) with their spatial folds.

    ``.train``, ``.val`` and ``.test`` are torch datasets reading tiles lazily from the store. Each item is a dict
    of tensors:

    - ``"image"``: float32 ``(3, T, T)``, standardised with :attr:`mean` and :attr:`std` (training tiles' stats);
    - ``"labels"``: int64 ``(T, T)``: 0 background, ``1..n`` the tile's ``n`` cells, ``-1`` ignore (a training
      tile's pixels of a cell that is also in a validation or test tile);
    - ``"cell_id"``: int64 ``(n,)`` original nucleus ids; ``"expr"``: float32 ``(n, G)`` log1p counts (rows of
      NaN for cells without measurement); ``"cell_type"``: int64 ``(n,)`` codes into :attr:`cell_types`
      (-1 unknown); ``"sample"`` and ``"tile"``: int.

    A spot-level store (``make_tiles(..., spots_key=...)``) adds:

    - ``"cell_spot"``: int64 ``(n,)`` the tile's spot holding each cell (``0..s-1``), ``-1`` for cells in no
      supervised spot (in no spot, or in a spot of which less than ``spot_coverage`` of the nuclei are visible);
    - ``"spot_expr"``: float32 ``(s, G)`` those spots' targets on the count scale (see :func:`make_tiles`), each
      multiplied by the visible fraction of its nuclei (1 for a fully visible spot);
    - ``"spot_index"``: int64 ``(s,)`` their rows in the sample's spot table (:attr:`spot_names`).

    Batch them with ``collate_fn=collate_tiles``.

    Parameters
    ----------
    path
        A tile store written by :func:`ghist.pp.make_tiles`.
    fold, n_folds
        Spatial fold to use; default: the store's. See :meth:`with_fold`.

    Examples
    --------
    >>> tiles = TileSet.open("tiles.zarr")
    >>> item = tiles.train[0]
    >>> item["image"].shape, item["expr"].shape

    """

    _UNSET: Any = object()

    def __init__(self, path: str | os.PathLike, *, fold: int | None = _UNSET, n_folds: int | None = None):
        self._path = Path(path)
        if not (self._path / "zarr.json").exists():
            raise FileNotFoundError(f"No tile store at {str(self._path)!r}; make one with `ghist.pp.make_tiles`.")
        root = zarr.open_group(str(self._path), mode="r")
        attrs = dict(root.attrs).get(_ATTRS)
        if not attrs or attrs.get("format") != _FORMAT:
            raise ValueError(f"{str(self._path)!r} is a zarr store but not a ghist tile store.")
        if attrs.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"Tile store {str(self._path)!r} has format version {attrs['format_version']}; this ghist reads "
                f"up to {_FORMAT_VERSION}. Update ghist."
            )
        self._attrs = attrs
        tiles = root["tiles"]
        self._sample = np.asarray(tiles["sample"][:], dtype=np.int64)
        self._row = np.asarray(tiles["row"][:], dtype=np.int64)
        self._col = np.asarray(tiles["col"][:], dtype=np.int64)
        self._y0 = np.asarray(tiles["y0"][:], dtype=np.int64)
        self._x0 = np.asarray(tiles["x0"][:], dtype=np.int64)
        self._n_pixels = np.asarray(tiles["n_pixels"][:], dtype=np.float64)
        self._sum = np.asarray(tiles["sum"][:], dtype=np.float64).reshape(-1, 3)
        self._sumsq = np.asarray(tiles["sumsq"][:], dtype=np.float64).reshape(-1, 3)
        self._offsets = np.asarray(tiles["cell_offsets"][:], dtype=np.int64)
        self._cell_ids = np.asarray(tiles["cell_ids"][:], dtype=np.int64)
        self._cell_rows = np.asarray(tiles["cell_rows"][:], dtype=np.int64)
        self._sample_types = [
            np.asarray(root[f"samples/{i}/cell_type"][:], dtype=np.int64) for i in range(len(attrs["samples"]))
        ]
        self._has_spots = attrs.get("spots_key") is not None
        if self._has_spots:
            self._cell_spot = np.asarray(tiles["cell_spot"][:], dtype=np.int64)
            self._spot_n_cells = [
                np.asarray(root[f"samples/{i}/spot_n_cells"][:], dtype=np.int64) for i in range(len(attrs["samples"]))
            ]
        n_folds = attrs["n_folds"] if n_folds is None else n_folds
        fold = attrs["fold"] if fold is TileSet._UNSET else fold
        _check_folds(n_folds, fold)
        self._n_folds, self._fold = int(n_folds), None if fold is None else int(fold)
        self._set_splits()

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> TileSet:
        """Reopen a tile store written by :func:`ghist.pp.make_tiles` (with the fold it was made with).

        Parameters
        ----------
        path
            The store's directory.

        Returns
        -------
        The :class:`TileSet`.

        Examples
        --------
        >>> tiles = TileSet.open(path)

        """
        return cls(path)

    def with_fold(self, fold: int | None, *, n_folds: int | None = None) -> TileSet:
        """The same tiles with another spatial fold (no re-cutting: splits, ignore masks and stats are recomputed).

        Parameters
        ----------
        fold
            Test band, 1-based; ``None``: every tile trains.
        n_folds
            Number of bands (default: the current one).

        Returns
        -------
        A new :class:`TileSet` over the same store.

        Examples
        --------
        >>> folds = [tiles.with_fold(k) for k in range(1, tiles.n_folds + 1)]

        """
        return TileSet(self._path, fold=fold, n_folds=self._n_folds if n_folds is None else n_folds)

    def _set_splits(self) -> None:
        attrs = self._attrs
        problems = [
            p
            for name, n_rows in zip(attrs["samples"], attrs["n_rows"])
            if (p := _split_problem(name, n_rows, self._n_folds, self._fold, attrs["tile_size"])) is not None
        ]
        if problems:
            raise ValueError(problems[0]) if len(problems) == 1 else ValidationError(problems)
        per_sample = [split_rows(n, self._n_folds, self._fold) for n in attrs["n_rows"]]
        first_row = np.concatenate([[0], np.cumsum(attrs["n_rows"])[:-1]]).astype(np.int64)
        self._split = np.concatenate(per_sample).astype(np.int8)[first_row[self._sample] + self._row]
        # Ignore: cells of training tiles that also occur in a validation or test tile of the same sample.
        tile_of_cell = np.repeat(np.arange(len(self._sample)), np.diff(self._offsets))
        key = (self._sample[tile_of_cell] << 32) | self._cell_ids
        self._n_cells = int(np.unique(key).size)
        held_out = self._split[tile_of_cell] != TRAIN
        self._ignore = ~held_out & np.isin(key, key[held_out])
        train = self._split == TRAIN
        n = self._n_pixels[train].sum()
        if n > 0:
            mean = self._sum[train].sum(axis=0) / n
            var = np.maximum(self._sumsq[train].sum(axis=0) / n - mean**2, 0.0)
            std = np.sqrt(var)
        else:
            mean, std = np.full(3, 127.5), np.full(3, 127.5)
        self._mean = mean.astype(np.float32)
        self._std = np.maximum(std, 1.0).astype(np.float32)  # guard against blank training tiles

    # -- metadata -----------------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """Directory of the zarr store."""
        return self._path

    @property
    def genes(self) -> list[str]:
        """Genes of the ``expr`` columns."""
        return list(self._attrs["genes"])

    @property
    def cell_types(self) -> list[str] | None:
        """Cell type names indexed by the ``cell_type`` codes, or ``None`` without cell types."""
        types = self._attrs["cell_types"]
        return None if types is None else list(types)

    @property
    def tile_size(self) -> int:
        """Tile side in pixels."""
        return int(self._attrs["tile_size"])

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean (0-255) of the training tiles' pixels, shape ``(3,)``."""
        return self._mean.copy()

    @property
    def std(self) -> np.ndarray:
        """Per-channel standard deviation (0-255) of the training tiles' pixels, shape ``(3,)``."""
        return self._std.copy()

    @property
    def samples(self) -> list[str]:
        """Sample names."""
        return list(self._attrs["samples"])

    @property
    def pixel_sizes(self) -> list[float | None]:
        """µm per image pixel of every sample (``None`` without a ``"microns"`` coordinate system)."""
        return list(self._attrs["pixel_sizes"])

    @property
    def pixel_size(self) -> float | None:
        """µm per image pixel (the median over samples that have one), or ``None``."""
        sizes = [p for p in self._attrs["pixel_sizes"] if p is not None]
        return float(np.median(sizes)) if sizes else None

    @property
    def spots_key(self) -> str | None:
        """The spots that supervise this store (``None``: cell-level supervision)."""
        return self._attrs.get("spots_key")

    @property
    def spot_names(self) -> list[list[str]] | None:
        """Per sample, the spots' instance ids in the order of ``"spot_index"`` (``None`` without spots)."""
        names = self._attrs.get("spot_names")
        return None if names is None else [list(n) for n in names]

    @property
    def spot_coverage(self) -> float | None:
        """Smallest visible fraction of a spot's nuclei for a tile to supervise it (``None`` without spots)."""
        return self._attrs.get("spot_coverage")

    def _spot_summary(self) -> str:
        n_spots = sum(len(n) for n in self._attrs["spot_names"])
        return f"{n_spots} spots, tiling {self._attrs.get('tiling', 'grid')!r}, coverage >= {self.spot_coverage:g}"

    @property
    def n_folds(self) -> int:
        """Number of horizontal bands per sample."""
        return self._n_folds

    @property
    def fold(self) -> int | None:
        """Test band (1-based), or ``None`` when every tile trains."""
        return self._fold

    @property
    def n_cells(self) -> int:
        """Distinct nuclei over all tiles and samples."""
        return self._n_cells

    @property
    def split(self) -> np.ndarray:
        """Split of every tile: ``"train"``, ``"val"`` or ``"test"``."""
        return np.asarray(SPLIT_NAMES, dtype=object)[self._split]

    def indices(self, split: str) -> np.ndarray:
        """Tile indices of a split (``"train"``, ``"val"``, ``"test"``)."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"`split` must be one of {list(SPLIT_NAMES)}; got {split!r}.")
        return np.flatnonzero(self._split == SPLIT_NAMES.index(split))

    def tile_table(self) -> pd.DataFrame:
        """One row per tile: ``tile``, ``sample``, ``row``, ``col``, ``y0``, ``x0``, ``split``, ``n_cells``."""
        return pd.DataFrame(
            {
                "tile": np.arange(len(self)),
                "sample": np.asarray(self.samples, dtype=object)[self._sample],
                "row": self._row,
                "col": self._col,
                "y0": self._y0,
                "x0": self._x0,
                "split": pd.Categorical(self.split, categories=list(SPLIT_NAMES)),
                "n_cells": np.diff(self._offsets),
            }
        )

    def __len__(self) -> int:
        return len(self._sample)

    def __repr__(self) -> str:
        t = self.tile_size
        px = f" at {self.pixel_size:.3g} µm/px" if self.pixel_size is not None else ""
        fold = f"fold {self._fold} of {self._n_folds}" if self._fold is not None else "no held-out fold"
        counts = ", ".join(f"{name} {int((self._split == i).sum())}" for i, name in enumerate(SPLIT_NAMES))
        per_sample = np.bincount(self._sample, minlength=len(self.samples))
        samples = ", ".join(f"{name!r} ({n} tiles)" for name, n in zip(self.samples, per_sample))
        genes = self.genes
        lines = [
            f"TileSet of {len(self)} tiles of {t}x{t} px{px}, {self.n_cells} cells ({fold}: {counts})",
            f"    samples: {samples}",
            f"    genes: {len(genes)} {_preview(genes).rsplit(' (', 1)[0]}",
            f"    cell types: {'none' if self.cell_types is None else self.cell_types}",
            *([f"    spots: {self.spots_key!r} ({self._spot_summary()})"] if self._has_spots else []),
            f"    path: {str(self._path)!r}",
        ]
        return "\n".join(lines)

    # -- datasets -----------------------------------------------------------------------------------------------
    def dataset(self, split: str, *, transform: Callable[[dict], dict] | None = None) -> TileDataset:
        """Torch dataset of one split (``"train"``, ``"val"``, ``"test"``), optionally with a ``transform``.

        Parameters
        ----------
        split
            Which split.
        transform
            Applied to every item (dict of tensors) after it is read.

        Returns
        -------
        The :class:`TileDataset`.

        Examples
        --------
        >>> ds = tiles.dataset("train")

        """
        from .._model._data import TileDataset

        return TileDataset(self, self.indices(split), transform=transform)

    @property
    def train(self) -> TileDataset:
        """Training tiles."""
        return self.dataset("train")

    @property
    def val(self) -> TileDataset:
        """Validation tiles (the band below the test band)."""
        return self.dataset("val")

    @property
    def test(self) -> TileDataset:
        """Test tiles (band ``fold``)."""
        return self.dataset("test")

    @property
    def all(self) -> TileDataset:
        """Every tile, whatever its split."""
        from .._model._data import TileDataset

        return TileDataset(self, np.arange(len(self)))

    # -- reading ------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_arrays", None)
        return state

    def _open_arrays(self) -> dict[str, Any]:
        arrays = self.__dict__.get("_arrays")
        if arrays is None or arrays["pid"] != os.getpid():
            root = zarr.open_group(str(self._path), mode="r")
            arrays = {
                "pid": os.getpid(),
                "images": root["images"],
                "labels": root["labels"],
                "expr": [_maybe_in_memory(root[f"samples/{i}/expr"]) for i in range(len(self._attrs["samples"]))],
            }
            if self._has_spots:
                arrays["spot_expr"] = [
                    _maybe_in_memory(root[f"samples/{i}/spot_expr"]) for i in range(len(self._attrs["samples"]))
                ]
            self._arrays = arrays
        return arrays

    def read(self, tile: int, *, standardise: bool = True) -> dict[str, Any]:
        """Read one tile as a dict of numpy arrays (the items of the torch datasets, see the class docstring).

        Parameters
        ----------
        tile
            Tile index, ``0 <= tile < len(self)``.
        standardise
            Standardise the image with :attr:`mean` / :attr:`std`; otherwise return the raw 0-255 values as float32.

        Returns
        -------
        Dict of numpy arrays (``"sample"`` and ``"tile"``: int).

        Examples
        --------
        >>> item = tiles.read(0)

        """
        tile = int(tile)
        if not 0 <= tile < len(self):
            raise IndexError(f"Tile {tile} out of range for a TileSet of {len(self)} tiles.")
        arrays = self._open_arrays()
        image = np.asarray(arrays["images"][tile], dtype=np.float32)
        labels = np.asarray(arrays["labels"][tile], dtype=np.int64)
        a, b = self._offsets[tile], self._offsets[tile + 1]
        ids, rows, ignore = self._cell_ids[a:b], self._cell_rows[a:b], self._ignore[a:b]
        keep = ~ignore
        new = np.where(keep, np.cumsum(keep), -1).astype(np.int64)
        positive = labels > 0
        if ids.size:
            labels[positive] = new[np.searchsorted(ids, labels[positive])]
        ids, rows = ids[keep], rows[keep]
        sample = int(self._sample[tile])
        n_genes = len(self._attrs["genes"])
        expr = np.full((ids.size, n_genes), np.nan, dtype=np.float32)
        measured = rows >= 0
        if measured.any():
            wanted, inverse = np.unique(rows[measured], return_inverse=True)
            source = arrays["expr"][sample]
            block = source[wanted] if isinstance(source, np.ndarray) else source.oindex[wanted, :]
            expr[measured] = np.asarray(block, dtype=np.float32)[inverse]
        cell_type = np.full(ids.size, -1, dtype=np.int64)
        cell_type[measured] = self._sample_types[sample][rows[measured]]
        if standardise:
            image = (image - self._mean[:, None, None]) / self._std[:, None, None]
        item = {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "labels": labels,
            "cell_id": ids.copy(),
            "expr": expr,
            "cell_type": cell_type,
            "sample": sample,
            "tile": tile,
        }
        if self._has_spots:
            item.update(self._read_spots(arrays, sample, self._cell_spot[a:b][keep], n_genes))
        return item

    def _read_spots(self, arrays: dict[str, Any], sample: int, cell_spot: np.ndarray, n_genes: int) -> dict[str, Any]:
        """Spots supervised by a tile whose kept cells have spot rows ``cell_spot`` (-1: none)."""
        has = cell_spot >= 0
        spots, inverse, visible = np.unique(cell_spot[has], return_inverse=True, return_counts=True)
        fraction = visible / np.maximum(self._spot_n_cells[sample][spots], 1)
        ok = fraction >= float(self._attrs["spot_coverage"]) - 1e-9
        local = np.where(ok, np.cumsum(ok) - 1, -1).astype(np.int64)
        out_spot = np.full(cell_spot.size, -1, dtype=np.int64)
        out_spot[has] = local[inverse]
        expr = np.zeros((int(ok.sum()), n_genes), dtype=np.float32)
        if ok.any():
            source = arrays["spot_expr"][sample]
            block = source[spots[ok]] if isinstance(source, np.ndarray) else source.oindex[spots[ok], :]
            expr = (np.asarray(block, dtype=np.float64) * fraction[ok][:, None]).astype(np.float32)
        return {
            "cell_spot": out_spot,
            "spot_expr": expr,
            "spot_index": spots[ok].astype(np.int64),
        }


def _maybe_in_memory(array: zarr.Array) -> zarr.Array | np.ndarray:
    """Small expression matrices are read whole (one read instead of chunk reads for every tile)."""
    if math.prod(array.shape) * array.dtype.itemsize <= _EXPR_IN_MEMORY_BYTES:
        return np.asarray(array[...])
    return array
