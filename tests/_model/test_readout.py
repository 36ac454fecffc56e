from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch import nn

from ghist._model._network import GHISTNetwork
from ghist._model._readout import ResidualReadout, fit_readout

SCALE = 5.0  # the network's expr_scale in these tests


class _EmbeddingNetwork(nn.Module):
    """Stands in for a trained network: the batch's ``image`` rows are the embeddings, the prediction is fixed."""

    def __init__(self, n_genes: int, prediction: float = 1.0):
        super().__init__()
        self.n_genes, self.prediction = n_genes, prediction
        self.readout = None
        self.readout_seen: list = []

    def forward(self, image, labels, cell_batch, n_cells):
        self.readout_seen.append(self.readout)
        return {"embedding": image, "expr": torch.full((image.shape[0], self.n_genes), self.prediction)}


def _batches(x: np.ndarray, y: np.ndarray, size: int = 50) -> list[dict]:
    """Loader-like batches: embeddings as ``image``, ``log1p`` targets as ``expr``."""
    out = []
    for start in range(0, len(x), size):
        xs, ys = x[start : start + size], y[start : start + size]
        out.append(
            {
                "image": torch.tensor(xs, dtype=torch.float32),
                "labels": torch.zeros(1),
                "cell_batch": torch.zeros(len(xs), dtype=torch.long),
                "n_cells": len(xs),
                "expr": torch.tensor(ys, dtype=torch.float32),
            }
        )
    return out


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (8 dims, offset and scaled) and targets: genes 0-1 linear in them, genes 2-3 pure noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)) * np.arange(1, 9) + 3.0
    signal = np.column_stack([0.3 * x[:, 0] - 0.1 * x[:, 3], 0.05 * x[:, 7]])
    y = 0.2 + np.column_stack([signal + 0.05 * rng.normal(size=(n, 2)), 0.5 * rng.normal(size=(n, 2))])
    return x, y


def test_fit_readout_recovers_a_planted_signal_and_leaves_noise_alone():
    x, y = _planted(600, seed=0)
    xv, yv = _planted(300, seed=1)
    network = _EmbeddingNetwork(4, prediction=0.2 * SCALE)
    readout, report = fit_readout(network, _batches(x, y), _batches(xv, yv), SCALE)

    assert report["n_train"] == 600
    assert report["n_val"] == 300
    assert report["penalty"][0] is not None
    assert report["penalty"][1] is not None
    assert report["val_mse"]["after"] < 0.8 * report["val_mse"]["before"]
    xt, yt = _planted(400, seed=2)
    with torch.no_grad():
        pred = 0.2 + readout(torch.tensor(xt, dtype=torch.float32)).numpy() / SCALE
    for gene in (0, 1):
        assert np.corrcoef(pred[:, gene], yt[:, gene])[0, 1] > 0.95
    # a noise gene gets no correction, or one with a heavy penalty: its predictions barely move
    assert np.abs(pred[:, 2:] - 0.2).mean() < 0.1 * np.abs(yt[:, 2:] - 0.2).mean()
    # the network's own readout is off while residuals are measured, and restored after
    assert all(seen is None for seen in network.readout_seen)


def test_fit_readout_is_ridge_on_the_standardised_embedding():
    x, y = _planted(500, seed=3)
    xv, yv = _planted(200, seed=4)
    penalty = 1e-2
    readout, report = fit_readout(
        _EmbeddingNetwork(4, prediction=0.0), _batches(x, y), _batches(xv, yv), SCALE, penalties=[penalty]
    )
    z = (x - x.mean(0)) / x.std(0)
    # mean squared error + penalty * |beta|^2 is sklearn's ridge with alpha = penalty * n
    expected = Ridge(alpha=penalty * len(x)).fit(z, SCALE * y)
    corrected = [g for g, p in enumerate(report["penalty"]) if p is not None]
    assert 0 in corrected
    assert 1 in corrected
    got = readout.weight.numpy()
    np.testing.assert_allclose(got[:, corrected], expected.coef_.T[:, corrected], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(readout.bias.numpy()[corrected], expected.intercept_[corrected], rtol=1e-5)
    uncorrected = [g for g in range(4) if g not in corrected]
    assert not got[:, uncorrected].any()
    assert not readout.bias.numpy()[uncorrected].any()


def test_fit_readout_without_measured_cells_or_with_bad_penalties():
    x, y = _planted(100, seed=5)
    unmeasured = np.full_like(y, np.nan)
    readout, report = fit_readout(_EmbeddingNetwork(4), _batches(x, y), _batches(x, unmeasured), SCALE)
    assert readout is None
    assert report["n_val"] == 0
    assert report["genes_corrected"] == 0
    with pytest.raises(ValueError, match="penalties"):
        fit_readout(_EmbeddingNetwork(4), _batches(x, y), _batches(x, y), SCALE, penalties=[-1.0])


def test_network_adds_its_readout_and_clips_at_zero():
    torch.manual_seed(0)
    kwargs = {"n_genes": 3, "n_types": 2, "width": 4, "embed_dim": 8, "hidden": 8, "n_heads": 2}
    plain = GHISTNetwork(**kwargs).eval()
    torch.manual_seed(0)
    with_readout = GHISTNetwork(readout=True, **kwargs).eval()
    assert isinstance(with_readout.readout, ResidualReadout)
    assert plain.readout is None
    image = torch.randn(1, 3, 32, 32)
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 4:9, 4:9], labels[0, 20:25, 10:15] = 1, 2
    args = (image, labels, torch.zeros(2, dtype=torch.long), 2)
    with torch.no_grad():
        base = plain(*args)["expr"]
        assert torch.equal(with_readout(*args)["expr"], base)  # a fresh readout is no correction (same weights)
        with_readout.readout.bias.copy_(torch.tensor([1.0, -1e6, 0.0]))
        out = with_readout(*args)
    np.testing.assert_allclose(out["expr"][:, 0], base[:, 0] + 1.0, rtol=1e-6)
    assert torch.equal(out["expr"][:, 1], torch.zeros(2))
    assert "readout.weight" in with_readout.state_dict()


def test_fit_readout_names_non_finite_embeddings():
    # a diverged network's NaN embeddings made numpy raise a bare LinAlgError after the whole training
    from ghist._model._readout import ReadoutError

    x, y = _planted(200, 0)
    x[5, 0] = np.nan
    with pytest.raises(ReadoutError, match="lower `lr`"):
        fit_readout(_EmbeddingNetwork(y.shape[1]), _batches(x, y), _batches(x[:50], y[:50]), SCALE)
