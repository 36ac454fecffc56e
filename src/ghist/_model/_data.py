"""Batches for the network: torch datasets over tile stores and the collate function that batches them.

Both :func:`ghist.tl.fit` (tiles of a :class:`~ghist.pp.TileSet`) and :func:`ghist.tl.predict` (tiles cut from a
slide) hand the network batches in one format, built here by :func:`collate_tiles`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from ..pp import TileSet

__all__ = ["TileDataset", "as_tensors", "collate_tiles"]


def as_tensors(item: dict[str, Any]) -> dict[str, Any]:
    """The numpy arrays of a tile item as tensors (shared memory, no copy); other values unchanged."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in item.items()}


class TileDataset(Dataset):
    """A torch :class:`~torch.utils.data.Dataset` over some tiles of a :class:`TileSet` (read lazily).

    Parameters
    ----------
    tiles
        The :class:`TileSet`.
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
        self, tiles: TileSet, indices: Sequence[int] | np.ndarray, *, transform: Callable[[dict], dict] | None = None
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
