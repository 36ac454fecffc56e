"""Neighbourhood context: each cell's embedding mixed with the mean embedding of its k nearest cells.

Expression of many genes depends on a cell's surroundings (immune cells near tumour, hypoxia away
from vessels), which the per-nucleus embedding sees only through the pooled feature maps around the nucleus. Here a
cell's ``k`` nearest cells (nucleus centroids, in pixels at the model's resolution) are found *within its tile*, and
``embedding + mix([embedding, mean of the neighbours' embeddings])`` feeds every head. ``mix`` ends in a
zero-initialised layer, so a network with context starts out as the same network without it.

Why within the tile is the whole slide's neighbourhood: :func:`ghist.tl.predict` keeps each cell's prediction from
the tile where it lies farthest from the edges, and with the default overlap (just under half a tile) that is at
least about a quarter of a tile from every edge (44 µm for 64-px tiles at 2.75 µm/px), more than the distance to a
cell's 8 nearest neighbours in tissue (~15-25 µm). In training every cell of a tile (partly visible ones at the edge
included, a halo of sorts) serves as a neighbour; cells close to an edge simply have fewer neighbours in view.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NeighbourContext", "cell_centroids", "neighbour_mean"]


def cell_centroids(labels: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid ``(y, x)`` of each cell's visible pixels in its tile, ``(N, 2)`` float32, and whether it has any.

    ``labels`` is ``(B, H, W)`` with batch-unique ids ``1..n_cells`` (0 and negative values are not cells).
    """
    _, h, w = labels.shape
    flat = labels.reshape(-1)
    fg = torch.nonzero(flat > 0).squeeze(1)
    seg = flat.index_select(0, fg) - 1
    pixel = fg % (h * w)
    yx = torch.stack([pixel // w, pixel % w], dim=1).float()
    sums = yx.new_zeros(n_cells, 2).index_add_(0, seg, yx)
    count = torch.bincount(seg, minlength=n_cells)
    return sums / count.clamp(min=1).unsqueeze(1).float(), count > 0


def neighbour_mean(
    embedding: torch.Tensor, centroids: torch.Tensor, visible: torch.Tensor, cell_batch: torch.Tensor, k: int
) -> torch.Tensor:
    """Mean embedding of each cell's ``k`` nearest visible cells of the same tile (itself excluded), ``(N, D)``.

    A cell with fewer than ``k`` other visible cells in its tile averages those it has; one with none gets zeros.
    Ties in distance go to the cell that comes first (``torch.topk`` on a fixed order: deterministic).
    """
    out = torch.zeros_like(embedding)
    for tile in torch.unique(cell_batch):
        members = torch.nonzero((cell_batch == tile) & visible).squeeze(1)
        n = int(members.numel())
        if n < 2:
            continue
        xy = centroids.index_select(0, members)
        distance = torch.cdist(xy, xy)
        distance.fill_diagonal_(float("inf"))
        nearest = distance.topk(min(k, n - 1), dim=1, largest=False).indices
        neighbours = embedding.index_select(0, members)[nearest]  # (n, k', D)
        out[members] = neighbours.mean(dim=1)
    return out


class NeighbourContext(nn.Module):
    """``embedding + mix([embedding, mean of the k nearest cells' embeddings])``, starting as the identity.

    Parameters
    ----------
    embed_dim
        Size of the cell embedding.
    k
        Number of nearest cells averaged (within the tile).
    hidden
        Hidden width of ``mix``.
    dropout
        Dropout inside ``mix``.

    Examples
    --------
    >>> context = NeighbourContext(4, k=2)
    >>> embedding = torch.randn(3, 4)
    >>> centroids = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    >>> out = context(embedding, centroids, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    >>> torch.equal(out, embedding)  # zero-initialised: the identity until trained
    True

    """

    def __init__(self, embed_dim: int, k: int, *, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        if k < 1:
            raise ValueError(f"`k` must be >= 1 neighbours; got {k}.")
        self.k = int(k)
        self.mix = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, embed_dim)
        )
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)

    def forward(
        self, embedding: torch.Tensor, centroids: torch.Tensor, visible: torch.Tensor, cell_batch: torch.Tensor
    ) -> torch.Tensor:
        context = neighbour_mean(embedding, centroids, visible, cell_batch, self.k)
        return embedding + self.mix(torch.cat([embedding, context], dim=1))
