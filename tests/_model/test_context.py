"""The neighbourhood context: which cells are a cell's neighbours, and that the network starts as without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghist._centroids import label_centroids
from ghist._model._context import NeighbourContext, cell_centroids, neighbour_mean
from ghist._model._network import GHISTNetwork


def _labels() -> torch.Tensor:
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 0:2, 0:2] = 1  # centroid (0.5, 0.5)
    labels[0, 10:13, 4:7] = 2  # (11, 5)
    labels[1, 7:9, 7:9] = 3  # (7.5, 7.5)
    labels[1, 0, 0] = -1  # ignored pixels are no cell
    return labels  # cell 4 has no visible pixel


def test_centroids_and_visibility():
    centroids, visible = cell_centroids(_labels(), 4)
    torch.testing.assert_close(centroids[:3], torch.tensor([[0.5, 0.5], [11.0, 5.0], [7.5, 7.5]]))
    assert visible.tolist() == [True, True, True, False]


def test_centroids_are_the_one_rule_of_the_visible_pixels():
    """The network's torch centroids are ``_centroids.label_centroids`` of each tile, as (y, x) less half a pixel.

    Only distances between them are used (the k nearest cells), which the constant half pixel does not change.
    """
    labels = _labels()
    centroids, _ = cell_centroids(labels, 4)
    for tile in labels.numpy():
        seen = label_centroids(np.where(tile > 0, tile, 0))
        np.testing.assert_allclose(centroids[seen.ids - 1].numpy(), seen.xy[:, ::-1] - 0.5, rtol=1e-6)


def _positions():
    # tile 0: cells on a line at x = 0, 1, 3, 7, 20; tile 1: two cells at the same places as tile 0's first two
    xy = torch.tensor([[0.0, 0], [0, 1], [0, 3], [0, 7], [0, 20], [0, 0], [0, 1]])
    cell_batch = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    embedding = torch.arange(7, dtype=torch.float32).unsqueeze(1) * torch.tensor([[1.0, 10.0]])
    return embedding, xy, cell_batch


def test_neighbours_are_the_k_nearest_of_the_same_tile():
    embedding, xy, cell_batch = _positions()
    visible = torch.ones(7, dtype=torch.bool)
    out = neighbour_mean(embedding, xy, visible, cell_batch, k=2)
    # cell 0's two nearest are cells 1 and 2 (not itself, not tile 1's cell at the same spot)
    torch.testing.assert_close(out[0], embedding[[1, 2]].mean(0))
    torch.testing.assert_close(out[3], embedding[[2, 1]].mean(0))  # distances 4 and 6
    torch.testing.assert_close(out[4], embedding[[3, 2]].mean(0))
    # tile 1 has two cells: each one's only neighbour is the other
    torch.testing.assert_close(out[5], embedding[6])
    torch.testing.assert_close(out[6], embedding[5])


def test_invisible_cells_are_no_neighbours_and_lone_cells_get_zeros():
    embedding, xy, cell_batch = _positions()
    visible = torch.ones(7, dtype=torch.bool)
    visible[1] = False
    visible[6] = False
    out = neighbour_mean(embedding, xy, visible, cell_batch, k=1)
    torch.testing.assert_close(out[0], embedding[2])  # cell 1 is skipped
    torch.testing.assert_close(out[5], torch.zeros(2))  # alone in its tile


def test_context_starts_as_the_identity_and_then_only_neighbours_matter():
    torch.manual_seed(0)
    embedding, xy, cell_batch = _positions()
    visible = torch.ones(7, dtype=torch.bool)
    context = NeighbourContext(2, k=2, hidden=8, dropout=0.0).eval()
    torch.testing.assert_close(context(embedding, xy, visible, cell_batch), embedding)
    torch.nn.init.normal_(context.mix[-1].weight)
    before = context(embedding, xy, visible, cell_batch)
    far = embedding.clone()
    far[4] += 100.0  # at x = 20: none of cells 0-3 has it among its 2 nearest
    far[5] += 100.0  # another tile's cell
    after = context(far, xy, visible, cell_batch)
    torch.testing.assert_close(after[:4], before[:4])
    near = embedding.clone()
    near[1] += 100.0
    assert not torch.allclose(context(near, xy, visible, cell_batch)[0], before[0])


def test_network_with_context_starts_as_the_network_without():
    image = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, 4:9, 4:9], labels[0, 20:25, 10:15], labels[0, 2:5, 20:25] = 1, 2, 3
    labels[1, 3:8, 3:8], labels[1, 10:14, 10:14] = 4, 5
    cell_batch = torch.tensor([0, 0, 0, 1, 1])
    kwargs = {"n_genes": 5, "n_types": 3, "width": 4, "embed_dim": 16, "hidden": 16, "n_heads": 2}
    torch.manual_seed(0)
    plain = GHISTNetwork(**kwargs).eval()
    torch.manual_seed(0)
    with_context = GHISTNetwork(**kwargs, context_neighbours=2).eval()
    assert with_context.context is not None
    a, b = plain(image, labels, cell_batch, 5), with_context(image, labels, cell_batch, 5)
    for key in ("expr", "cell_logits", "composition"):
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize("k", [-1, 0])
def test_bad_k(k):
    if k < 0:
        with pytest.raises(ValueError, match="context_neighbours"):
            GHISTNetwork(n_genes=2, n_types=0, width=4, embed_dim=8, hidden=8, n_heads=2, context_neighbours=k)
    else:
        assert GHISTNetwork(n_genes=2, n_types=0, width=4, embed_dim=8, hidden=8, n_heads=2).context is None
    with pytest.raises(ValueError, match="k"):
        NeighbourContext(4, k=0)
