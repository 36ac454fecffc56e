"""Shared helpers of the benchmarks: the demo's training tiles, a synthetic tile batch, a naive pooling network, a
model without its residual readout."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import ghist
from ghist._model._network import GHISTNetwork


def synthetic_training_tiles(sdata, path: Path, *, tile_size: int = 128, progress: bool = True) -> ghist.pp.TileSet:
    """Tiles of a whole synthetic training slide, cut like ``ghist demo`` does, through the public API only.

    The slide's test set is another slide, so only a validation band is needed: the last row of tiles is the
    (unused) test band, the first row validates, the rest trains. Same as the demo's private helper in
    ``ghist._cli``, repeated here so that the benchmarks do not depend on private names.
    """
    n_rows = -(-sdata.images["he"].sizes["y"] // tile_size)
    shutil.rmtree(path, ignore_errors=True)  # an earlier run's tiles
    return ghist.pp.make_tiles(
        sdata,
        cell_type_key="cell_type",
        tile_size=tile_size,
        n_folds=max(2, n_rows),
        fold=max(2, n_rows),
        path=path,
        progress=progress,
    )


def disk_batch(
    batch: int, tile: int, cells_per_tile: int, *, radius: int = 6, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Random standardised image and non-overlapping nuclei drawn as disks; ids are batch-unique."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.standard_normal((batch, 3, tile, tile), dtype=np.float32))
    labels = np.zeros((batch, tile, tile), dtype=np.int64)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = yy**2 + xx**2 <= radius**2
    cell_batch = []
    next_id = 1
    for b in range(batch):
        placed = 0
        for _ in range(100 * cells_per_tile):
            if placed == cells_per_tile:
                break
            cy, cx = rng.integers(radius, tile - radius, size=2)
            window = labels[b, cy - radius : cy + radius + 1, cx - radius : cx + radius + 1]
            if (window[disk] != 0).any():
                continue
            window[disk] = next_id
            next_id += 1
            placed += 1
            cell_batch.append(b)
    n_cells = next_id - 1
    return image, torch.from_numpy(labels), torch.tensor(cell_batch, dtype=torch.long), n_cells


class LoopPoolingNetwork(GHISTNetwork):
    """The same network, pooling nuclei with a naive Python loop over cells (the reference code's approach)."""

    def pool_cells(self, maps, labels, n_cells):
        rows, areas = [], []
        for k in range(n_cells):
            mask = labels == k + 1
            feats = [m.permute(0, 2, 3, 1)[mask].float() for m in maps]
            area = int(mask.sum())
            areas.append(area)
            if area:
                rows.append(torch.cat([f.mean(0) for f in feats]))
            else:
                rows.append(torch.zeros(sum(m.shape[1] for m in maps), device=labels.device))
        means = torch.stack(rows) if rows else maps[0].new_zeros(0, sum(m.shape[1] for m in maps)).float()
        return means, torch.tensor(areas, dtype=torch.long, device=labels.device)


def amp_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The autocast dtype: ``name`` if given, else bfloat16 on the CPU and float16 on CUDA."""
    if name is not None:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cpu" else torch.float16


@contextmanager
def without_readout(model: ghist.GHISTModel) -> Iterator[ghist.GHISTModel]:
    """The same trained model with its residual readout (``fit``'s ``readout``) switched off, restored on exit."""
    readout = model.network.readout
    model.network.readout = None
    try:
        yield model
    finally:
        model.network.readout = readout
