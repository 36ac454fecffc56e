"""Reading a tile store written by :func:`ghist.pp.make_tiles`: :class:`TileSet`, numpy items, lazy torch datasets.

Nothing here imports torch at module level: :meth:`TileSet.read` returns numpy, and the torch datasets and loaders
come from :mod:`ghist._model._data`, imported when first asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from .._validation import _preview
from ._folds import SPLIT_NAMES, TRAIN, _check_folds, _check_splits, _ignored_cells, _tile_splits
from ._tile_store import _ATTRS, _FORMAT, _FORMAT_VERSION, _maybe_in_memory, _TempFolder

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from .._model._data import TileDataset

__all__ = ["TileSet"]


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

    Batch them with ``tiles.loader("train")`` (a :class:`~torch.utils.data.DataLoader` with
    ``collate_fn=ghist._model._data.collate_tiles``, see :meth:`loader`).

    A store that :func:`make_tiles` wrote to a temporary folder (no ``path``) lives as long as a :class:`TileSet` of
    it does (this one, those of :meth:`with_fold` or reopened at its path, and their datasets and loaders); then
    the folder is removed. Copies pickled to DataLoader workers never remove it.

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
    >>> batch = next(iter(tiles.loader("train", batch_size=8)))

    """

    _UNSET: Any = object()

    def __init__(self, path: str | os.PathLike, *, fold: int | None = _UNSET, n_folds: int | None = None):
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"`path` must be the folder of a tile store (str or Path); got {type(path).__name__}.")
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
        # A store in a temporary folder of make_tiles lives as long as some TileSet of it: hold its owner.
        self._owner = _TempFolder.owning(self._path)
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
        per_sample = [root[f"samples/{i}"] for i in range(len(attrs["samples"]))]
        self._sample_types = [np.asarray(g["cell_type"][:], dtype=np.int64) for g in per_sample]
        self._has_spots = attrs.get("spots_key") is not None
        if self._has_spots:
            self._cell_spot = np.asarray(tiles["cell_spot"][:], dtype=np.int64)
            self._spot_n_cells = [np.asarray(g["spot_n_cells"][:], dtype=np.int64) for g in per_sample]
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
        _check_splits(attrs["samples"], attrs["n_rows"], self._n_folds, self._fold, attrs["tile_size"])
        self._split = _tile_splits(attrs["n_rows"], self._n_folds, self._fold, self._sample, self._row)
        self._ignore, self._n_cells = _ignored_cells(self._split, self._sample, self._offsets, self._cell_ids)
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

    def loader(
        self,
        split: str,
        *,
        batch_size: int = 8,
        shuffle: bool | None = None,
        num_workers: int = 0,
        seed: int = 0,
        transform: Callable[[dict], dict] | None = None,
    ) -> DataLoader:
        """Torch data loader over one split, batching tiles with :func:`ghist._model._data.collate_tiles`.

        Parameters
        ----------
        split
            ``"train"``, ``"val"`` or ``"test"``.
        batch_size
            Tiles per batch.
        shuffle
            Reshuffle the tiles every epoch. Default: ``True`` for ``"train"``, ``False`` otherwise.
        num_workers
            Worker processes reading tiles (0: read in the calling process).
        seed
            Seeds the loader's generator: the shuffled order and the workers' seeds repeat for the same seed.
        transform
            Applied to every item (dict of tensors) after it is read, before batching.

        Returns
        -------
        A :class:`torch.utils.data.DataLoader` whose batches are the dicts of
        :func:`~ghist._model._data.collate_tiles`.

        Examples
        --------
        >>> for batch in tiles.loader("train", batch_size=8):
        ...     batch["image"].shape, batch["expr"].shape

        """
        import torch
        from torch.utils.data import DataLoader

        from .._model._data import collate_tiles, worker_context
        from .._validation import check_seed

        check_seed(seed)
        return DataLoader(
            self.dataset(split, transform=transform),
            batch_size=batch_size,
            shuffle=split == "train" if shuffle is None else bool(shuffle),
            num_workers=num_workers,
            collate_fn=collate_tiles,
            generator=torch.Generator().manual_seed(int(seed)),
            multiprocessing_context=worker_context(num_workers),
        )

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
