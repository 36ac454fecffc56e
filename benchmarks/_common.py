"""Shared helpers for the network benchmarks: a synthetic tile batch and a naive per-cell pooling network."""

from __future__ import annotations

import numpy as np
import torch

from ghist._model._network import GHISTNetwork


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
