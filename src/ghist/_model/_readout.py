"""Residual readout: a closed-form linear correction of the predicted expression from each cell's embedding.

Why: on ``synthetic(signals="all")`` a ridge regression on a trained network's cell embeddings predicts the genes
driven by within-type signals (nucleus size, depth into a tumour nest, immune neighbours) far better than the
network's own expression heads, which stay at the type-mean oracle's level within a CPU budget
(``docs/benchmarks.md``). The embedding carries the signal; the heads, a mixture of reference profiles refined by the
tile's composition, do not read it within the budget. So the last layer is solved exactly instead of by SGD.

How (:func:`fit_readout`): with the trained network in evaluation mode, the residual ``r = measured - predicted``
(network scale) of every measured cell of the training tiles is regressed on the standardised embedding by ridge
regression, for each penalty of :data:`READOUT_PENALTIES` (one eigendecomposition serves them all); each gene takes
the penalty with the lowest mean squared error on the validation tiles' cells, or no correction where none beats the
network alone. Only sums are accumulated (``d x d`` and ``d x G``), so memory does not grow with the cells. The
network adds the fitted :class:`ResidualReadout` to its expression and clips at 0
(:class:`~ghist._model._network.GHISTNetwork`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["READOUT_PENALTIES", "ResidualReadout", "fit_readout"]

logger = logging.getLogger(__name__)

#: Ridge penalties tried per gene, per cell on the standardised embedding (``1e-6`` to ``10``, half decades).
READOUT_PENALTIES: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(-6.0, 1.01, 0.5))


class ResidualReadout(nn.Module):
    """``((embedding - center) / scale) @ weight + bias``: the expression correction on the network's scale.

    All four tensors are buffers (fitted in closed form by :func:`fit_readout`, never by the optimiser); a fresh
    readout is zero, i.e. no correction.

    Parameters
    ----------
    embed_dim
        Size of the cell embedding ``d``.
    n_genes
        Number of genes ``G``.

    Examples
    --------
    >>> readout = ResidualReadout(4, 2)
    >>> readout(torch.ones(3, 4))
    tensor([[0., 0.],
            [0., 0.],
            [0., 0.]])

    """

    def __init__(self, embed_dim: int, n_genes: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(embed_dim))
        self.register_buffer("scale", torch.ones(embed_dim))
        self.register_buffer("weight", torch.zeros(embed_dim, n_genes))
        self.register_buffer("bias", torch.zeros(n_genes))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` correction for ``(N, d)`` embeddings (float32)."""
        return ((embedding.float() - self.center) / self.scale) @ self.weight + self.bias


class _Sums:
    """Running sums over cells of ``x`` (embeddings, ``d``) and ``y`` (residuals, ``G``) in float64."""

    def __init__(self):
        self.n = 0
        self.x = self.y = self.xx = self.xy = self.yy = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double().cpu(), y.double().cpu()
        parts = {"x": x.sum(0), "y": y.sum(0), "xx": x.T @ x, "xy": x.T @ y, "yy": (y * y).sum(0)}
        for name, value in parts.items():
            old = getattr(self, name)
            setattr(self, name, value.numpy() if old is None else old + value.numpy())
        self.n += x.shape[0]


@torch.inference_mode()
def _residual_sums(network: nn.Module, loader: Iterable[dict[str, Any]], expr_scale: float, device) -> _Sums:
    """Embeddings and residuals (measured minus predicted, network scale) of the measured cells of ``loader``."""
    sums = _Sums()
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        expr = batch.get("expr")
        if expr is None:
            continue
        measured = torch.isfinite(expr).all(dim=1)
        if not bool(measured.any()):
            continue
        out = network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
        # Loader batches hold log1p counts; the network predicts expr_scale * log1p.
        residual = expr[measured].float() * expr_scale - out["expr"][measured].float()
        sums.add(out["embedding"][measured], residual)
    return sums


def _validation_mse(sums: _Sums, weight: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Per-gene mean squared error of ``y - (x @ weight + offset)`` over the cells summed in ``sums``."""
    cross = (weight * sums.xy).sum(0) + offset * sums.y
    square = (weight * (sums.xx @ weight)).sum(0) + 2 * offset * (sums.x @ weight) + sums.n * offset**2
    return (sums.yy - 2 * cross + square) / sums.n


class ReadoutError(ValueError):
    """The residual readout could not be fitted (non-finite embeddings or an unsolvable system)."""


def fit_readout(
    network: nn.Module,
    train_loader: Iterable[dict[str, Any]],
    val_loader: Iterable[dict[str, Any]],
    expr_scale: float,
    device: torch.device | str = "cpu",
    *,
    penalties: Iterable[float] = READOUT_PENALTIES,
) -> tuple[ResidualReadout | None, dict[str, Any]]:
    """Fit a :class:`ResidualReadout` for ``network`` (see the module docstring).

    The network's own readout, if it has one, is switched off while its residuals are measured and left unchanged.

    Parameters
    ----------
    network
        A trained :class:`~ghist._model._network.GHISTNetwork` (put in evaluation mode).
    train_loader, val_loader
        Batches from :func:`~ghist._model._data.collate_tiles` of the training and the validation tiles (cells
        with NaN expression, e.g. under spot supervision, are left out).
    expr_scale
        The network's scale factor (batches hold ``log1p`` counts).
    device
        Where the network runs.
    penalties
        Ridge penalties tried for each gene (per cell, standardised embedding).

    Returns
    -------
    ``(readout, report)``. ``readout`` is ``None`` when either split has no measured cell, or no gene is better
    with a correction. ``report``: ``"n_train"`` and ``"n_val"`` measured cells (a cell in two tiles counts twice),
    ``"genes_corrected"``, ``"val_mse"`` before and after over all genes (``log1p`` scale), and ``"penalty"`` per
    gene (``None``: not corrected).

    """
    penalties = [float(p) for p in penalties]
    if not penalties or min(penalties) < 0 or not np.isfinite(penalties).all():
        raise ValueError(f"`penalties` must be finite and >= 0; got {penalties}.")
    was = getattr(network, "readout", None)
    network.readout = None
    network.eval()
    try:
        train = _residual_sums(network, train_loader, expr_scale, device)
        val = _residual_sums(network, val_loader, expr_scale, device)
    finally:
        network.readout = was
    report: dict[str, Any] = {"n_train": train.n, "n_val": val.n, "genes_corrected": 0, "penalty": None}
    if train.n < 2 or val.n == 0:
        return None, report

    for name, sums in (("training", train), ("validation", val)):
        if not all(np.isfinite(part).all() for part in (sums.x, sums.y, sums.xx, sums.xy, sums.yy)):
            raise ReadoutError(
                f"The residual readout cannot be fitted: the network's embeddings or predictions of the {name} cells "
                "are not finite (the training diverged: lower `lr`), or pass `readout=False`."
            )
    mean_x, mean_y = train.x / train.n, train.y / train.n
    cov_xx = train.xx / train.n - np.outer(mean_x, mean_x)
    cov_xy = train.xy / train.n - np.outer(mean_x, mean_y)
    std = np.sqrt(np.clip(np.diag(cov_xx), 0, None))
    scale = np.where(std > 1e-8, std, 1.0)  # a constant dimension gets no weight anyway
    corr = cov_xx / np.outer(scale, scale)
    try:
        eigval, eigvec = np.linalg.eigh((corr + corr.T) / 2)
    except np.linalg.LinAlgError as err:
        raise ReadoutError(
            f"The residual readout cannot be fitted: its {len(mean_x)}-dimensional ridge system did not solve ({err}); "
            "fit with `readout=False`."
        ) from err
    projected = eigvec.T @ (cov_xy / scale[:, None])

    baseline = val.yy / val.n  # no correction
    best_mse, best_weight = baseline.copy(), np.zeros_like(cov_xy)
    best_penalty = np.full(baseline.shape, np.nan)
    for penalty in penalties:
        beta = eigvec @ (projected / np.clip(eigval + penalty, 1e-12, None)[:, None])  # standardised-x coefficients
        weight = beta / scale[:, None]  # on the raw embedding
        mse = _validation_mse(val, weight, mean_y - mean_x @ weight)
        better = mse < best_mse
        best_mse[better], best_weight[:, better], best_penalty[better] = mse[better], beta[:, better], penalty

    corrected = np.isfinite(best_penalty)
    report.update(
        genes_corrected=int(corrected.sum()),
        val_mse={"before": float(baseline.mean() / expr_scale**2), "after": float(best_mse.mean() / expr_scale**2)},
        penalty=[None if not c else float(p) for c, p in zip(corrected, best_penalty, strict=True)],
    )
    if not corrected.any():
        return None, report
    readout = ResidualReadout(len(mean_x), len(mean_y))
    readout.center.copy_(torch.from_numpy(mean_x))
    readout.scale.copy_(torch.from_numpy(scale))
    readout.weight.copy_(torch.from_numpy(best_weight))
    readout.bias.copy_(torch.from_numpy(np.where(corrected, mean_y, 0.0)))
    return readout, report
