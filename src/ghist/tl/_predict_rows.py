"""One row per cell while predicting: keep each cell's prediction from the tile that saw it best.

A nucleus seen by several overlapping tiles keeps the row of its best tile (:func:`best_rows`). Two keepers, one
rule:

- :class:`MemoryRows` holds one preallocated row per cell to predict and overwrites it when a better tile comes:
  the output is in memory once, never per tile;
- :class:`StoreRows` appends every tile's rows of expression (and its standard deviation) to a temporary zarr
  array on disk as batches finish, keeps only the small per-row bookkeeping in memory, and at the end hands back
  dask arrays of the best rows in cell order, so that the table can be written chunk by chunk without ever being
  in memory (a SpatialData backed by a zarr store).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .._model._inference import CellPrediction

# Rows per chunk of the temporary arrays and of the table's X written from them (about 4.5 MB at 280 genes).
ROWS_PER_CHUNK = 4096


def best_rows(ids: np.ndarray, visible: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Row of each cell's best tile, ordered by cell id.

    The tile where most of its nucleus was visible; among those, the one where it lies farthest from the edges (most
    context around it); then the first seen.

    Examples
    --------
    >>> best_rows(np.array([5, 5, 2]), np.array([10, 12, 3]), np.array([1.0, 0.5, 2.0])).tolist()
    [2, 1]

    """
    order = np.lexsort((-margin, -visible, ids))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    return order[first]


@dataclass
class CellRows:
    """The kept prediction of every cell that some tile saw, in cell-id order (``n`` cells).

    ``expr``/``std`` are numpy arrays (:class:`MemoryRows`) or dask arrays (:class:`StoreRows`); the other fields
    are numpy. ``centroid`` (n, 2) is the visible centroid on the working grid and ``margin`` its distance to the
    edge of the cell's best tile (for the neighbourhood-context check).
    """

    ids: np.ndarray
    expr: Any
    std: Any | None
    proba: np.ndarray | None
    cell_type: np.ndarray | None
    composition: np.ndarray | None
    type_entropy: np.ndarray | None
    type_score: np.ndarray | None
    centroid: np.ndarray
    margin: np.ndarray
    folder: Path | None = field(default=None, repr=False)  # temporary store behind dask arrays, removed by close()

    def close(self) -> None:
        """Remove the temporary arrays (once the table has been written from them)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


_SMALL = ("proba", "cell_type", "composition", "type_entropy", "type_score")


class MemoryRows:
    """One preallocated row per wanted cell, overwritten when a strictly better tile comes.

    Parameters
    ----------
    ids
        Ascending ids of the cells to keep (others are ignored).
    n_genes
        Genes per row.
    with_std
        Keep the standard deviation too.

    """

    def __init__(self, ids: np.ndarray, n_genes: int, with_std: bool):
        self.ids = np.asarray(ids, dtype=np.int64)
        n = self.ids.size
        self.visible = np.full(n, -1, dtype=np.int64)
        self.margin = np.full(n, -np.inf)
        self.centroid = np.zeros((n, 2))
        self.expr = np.zeros((n, n_genes), dtype=np.float32)
        self.std = np.zeros((n, n_genes), dtype=np.float32) if with_std else None
        self.small: dict[str, np.ndarray] = {}

    def _rows(self, cell_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self.ids, cell_id)
        pos = np.minimum(pos, max(self.ids.size - 1, 0))
        wanted = (self.ids.size > 0) & (self.ids[pos] == cell_id) if self.ids.size else np.zeros(len(cell_id), bool)
        return np.flatnonzero(wanted), pos[wanted]

    def add(
        self, cell_id: np.ndarray, visible: np.ndarray, margin: np.ndarray, centroid: np.ndarray, pred: CellPrediction
    ) -> None:
        """Keep the rows of this batch that beat what each cell has so far."""
        where, rows = self._rows(cell_id)
        best = best_rows(rows, visible[where], margin[where])  # a cell twice in one batch: its best entry
        where, rows = where[best], rows[best]
        v, m = visible[where], margin[where]
        better = (v > self.visible[rows]) | ((v == self.visible[rows]) & (m > self.margin[rows]))
        where, rows = where[better], rows[better]
        self.visible[rows], self.margin[rows], self.centroid[rows] = visible[where], margin[where], centroid[where]
        self.expr[rows] = pred.expr[where]
        if self.std is not None:
            self.std[rows] = pred.std[where]
        for name in _SMALL:
            value = getattr(pred, name)
            if value is None:
                continue
            if name not in self.small:
                self.small[name] = np.zeros((self.ids.size, *value.shape[1:]), dtype=value.dtype)
            self.small[name][rows] = value[where]

    def finish(self) -> CellRows:
        """The cells some tile saw (``visible >= 0``), in id order."""
        seen = self.visible >= 0
        every = bool(seen.all())

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else (a if every else a[seen])

        return CellRows(
            ids=pick(self.ids),
            # the two (cells x genes) matrices are compacted where they lie: a[seen] would hold a second copy
            expr=self.expr if every else compact_rows(self.expr, seen),
            std=None if self.std is None else self.std if every else compact_rows(self.std, seen),
            **{name: pick(self.small.get(name)) for name in _SMALL},
            centroid=pick(self.centroid),
            margin=pick(self.margin),
        )


def compact_rows(array: np.ndarray, keep: np.ndarray, block: int = 4096) -> np.ndarray:
    """The rows of ``array`` where ``keep``, moved to its front in place: a view, with no second copy of ``array``.

    Rows are moved ``block`` at a time (one block's copy at most); ``array`` itself is overwritten.

    Examples
    --------
    >>> a = np.arange(10.0).reshape(5, 2)
    >>> compact_rows(a, np.array([True, False, True, False, True]), block=2)
    array([[0., 1.],
           [4., 5.],
           [8., 9.]])

    """
    done = 0
    for start in range(0, len(array), block):
        part = array[start : start + block][keep[start : start + block]]  # a copy: the rows it overwrites are read
        array[done : done + len(part)] = part
        done += len(part)
    return array[:done]


class StoreRows:
    """Every tile's rows appended to temporary zarr arrays on disk; the best row per cell chosen at the end.

    Parameters
    ----------
    ids
        Ascending ids of the cells to keep (others are ignored).
    n_genes
        Genes per row.
    with_std
        Keep the standard deviation too.
    folder
        Where to make the temporary store (best beside the SpatialData's own store: same disk).

    """

    def __init__(self, ids: np.ndarray, n_genes: int, with_std: bool, folder: str | Path | None = None):
        import zarr

        self.ids = np.asarray(ids, dtype=np.int64)
        self.folder = Path(tempfile.mkdtemp(prefix=".ghist_predict_", dir=folder))
        root = zarr.open_group(self.folder / "rows.zarr", mode="w")
        names = ["expr", *(["std"] if with_std else [])]
        self.arrays = {
            name: root.create_array(
                name, shape=(0, n_genes), chunks=(ROWS_PER_CHUNK, max(n_genes, 1)), dtype="float32", fill_value=0.0
            )
            for name in names
        }
        self.n_genes = n_genes
        self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in names}
        self.buffered = 0
        self.written = 0
        self.book: dict[str, list[np.ndarray]] = {"ids": [], "visible": [], "margin": [], "centroid": []}
        self.small: dict[str, list[np.ndarray]] = {}

    def add(
        self, cell_id: np.ndarray, visible: np.ndarray, margin: np.ndarray, centroid: np.ndarray, pred: CellPrediction
    ) -> None:
        """Append this batch's rows of the wanted cells."""
        wanted = np.isin(cell_id, self.ids, assume_unique=False)
        if not wanted.any():
            return
        for name, value in (("ids", cell_id), ("visible", visible), ("margin", margin), ("centroid", centroid)):
            self.book[name].append(np.asarray(value)[wanted])
        for name in _SMALL:
            value = getattr(pred, name)
            if value is not None:
                self.small.setdefault(name, []).append(value[wanted])
        self.buffer["expr"].append(pred.expr[wanted])
        if "std" in self.buffer:
            self.buffer["std"].append(pred.std[wanted])
        self.buffered += int(wanted.sum())
        if self.buffered >= ROWS_PER_CHUNK:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        if not self.buffered:
            return
        n = self.buffered - (self.buffered % ROWS_PER_CHUNK if whole_chunks else 0)
        for name, parts in self.buffer.items():
            rows = np.concatenate(parts)
            array = self.arrays[name]
            array.resize((self.written + n, self.n_genes))
            array[self.written : self.written + n] = rows[:n]
            self.buffer[name] = [rows[n:]] if n < len(rows) else []
        self.written += n
        self.buffered -= n

    def finish(self) -> CellRows:
        """The best row of every cell some tile saw, in id order; ``expr``/``std`` as dask arrays over the store."""
        import dask.array as da

        self._flush(whole_chunks=False)
        book = {k: np.concatenate(v) if v else np.zeros((0, 2) if k == "centroid" else 0) for k, v in self.book.items()}
        best = best_rows(book["ids"].astype(np.int64), book["visible"], book["margin"])

        def lazy(name: str) -> Any:
            array = da.from_zarr(self.arrays[name])[best]
            return array.rechunk((ROWS_PER_CHUNK, self.n_genes))

        small = {name: np.concatenate(parts)[best] for name, parts in self.small.items()}
        return CellRows(
            ids=book["ids"][best].astype(np.int64),
            expr=lazy("expr"),
            std=lazy("std") if "std" in self.arrays else None,
            **{name: small.get(name) for name in _SMALL},
            centroid=book["centroid"][best],
            margin=book["margin"][best],
            folder=self.folder,
        )

    def discard(self) -> None:
        """Remove the temporary store (after a failure)."""
        shutil.rmtree(self.folder, ignore_errors=True)
