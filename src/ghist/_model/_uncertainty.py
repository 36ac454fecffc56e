"""Per-cell predictive uncertainty: a variance head beside the network, its loss, its calibration and entropies.

The point prediction must not change, so the head lives *outside*
:class:`~ghist._model._network.GHISTNetwork` and sees only detached tensors:

- :class:`VarianceHead` maps a cell's detached embedding and its detached predicted mean (``log1p`` scale) to a
  per-gene log-variance on the ``log1p`` scale;
- :func:`uncertainty_loss` is the Gaussian negative log-likelihood of the measured ``log1p`` values given the
  detached mean and the head's variance. With spot supervision (no per-cell targets) it is the Gaussian NLL of each
  spot's ``log1p`` target given the ``log1p`` of its summed predicted counts, whose variance comes from the cells'
  variances by the delta method (cells independent): ``var[log1p S] ~= sum_i (1 + c_i)^2 var_i / (1 + S)^2``;
- the loss is added to what the optimiser minimises but never to the logged ``train_loss``, and no gradient reaches
  the network, so every existing weight gets exactly the gradients it got before;
- :func:`calibration_scale` fits a post-hoc factor per gene on the validation split (cells, or spots) so that
  ``mean +- 1.645 * scale * sigma`` covers 90% of the measured values there: the head learns the *training*
  residuals, of a network in training mode (dropout, batch statistics) that may fit its training tiles, and these
  differ from held-out residuals in evaluation mode (the raw head over-covers: ``docs/benchmarks.md``).

The head is created under a forked random state, so that building it consumes nothing of the global random stream
that initialises the network and draws dropout masks in training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .._constants import UNCERTAINTY_HEAD_PREFIX as HEAD_PREFIX
from ._losses import _MAX_LOG_COUNTS

__all__ = [
    "HEAD_HIDDEN_LR_FACTOR",
    "HEAD_LR_FACTOR",
    "HEAD_PREFIX",
    "Z90",
    "VarianceHead",
    "calibration_scale",
    "entropy",
    "head_param_groups",
    "make_variance_head",
    "spot_variance",
    "uncertainty_loss",
    "view_variance",
]

#: z of a two-sided 90% normal interval.
Z90 = 1.6448536269514722
# Bounds of the log-variance on the log1p scale: std between 0.0025 and 20 (keeps exp() and the NLL finite).
_LOG_VAR_MIN, _LOG_VAR_MAX = -12.0, 6.0
#: Learning rate of the head's per-gene levels (the last layer's bias) relative to the network's: the network's
#: budget (a few hundred steps on a CPU) is far too short for them to move from their start at the network's rate (a
#: 60-step fit at lr 3e-3 moved them by about 0.1).
HEAD_LR_FACTOR = 20.0
#: Learning rate of the rest of the head relative to the network's. Not the levels' rate: at 20 times the network's,
#: Adam's steps switched most ReLU units off for good, leaving a head that gives each gene one spread for every cell
#: (two of four HER2ST cross-validation folds lost every unit, a third most). 5 learnt a noisy gene's larger spread
#: best in a 60-step synthetic fit (raw ratio 2.2, against 1.5 at 2 and 1.4 at 20); on a toy head 10 already died.
HEAD_HIDDEN_LR_FACTOR = 5.0
#: Validation values that weigh as much as the global factor when a gene's own calibration factor is shrunk.
SHRINK_VALUES = 50
#: Smallest per-gene factor, relative to the factor of all genes.
MIN_GENE_FACTOR = 0.1
# Seed of the head's own initialisation (independent of the network's seed: see the module docstring).
_HEAD_SEED = 12


class VarianceHead(nn.Module):
    """Per-gene log-variance (``log1p`` scale) from a cell's embedding and predicted mean.

    Parameters
    ----------
    embed_dim
        Size of the cell embedding.
    n_genes
        Number of genes.
    hidden
        Hidden width.

    Examples
    --------
    >>> head = VarianceHead(16, 5)
    >>> head(torch.randn(3, 16), torch.rand(3, 5)).shape
    torch.Size([3, 5])

    """

    def __init__(self, embed_dim: int, n_genes: int, *, hidden: int = 64):
        super().__init__()
        # Normalised inputs: embeddings are on no fixed scale, and the head trains at a high learning rate.
        self.net = nn.Sequential(
            nn.LayerNorm(embed_dim + n_genes),
            nn.Linear(embed_dim + n_genes, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_genes),
        )

    def forward(self, embedding: torch.Tensor, mean_log1p: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` log-variance on the ``log1p`` scale; inputs are detached here, so no gradient leaves the head."""
        x = torch.cat([embedding.detach().float(), mean_log1p.detach().float()], dim=1)
        return self.net(x).clamp(_LOG_VAR_MIN, _LOG_VAR_MAX)


def head_param_groups(head: VarianceHead, lr: float) -> list[dict[str, Any]]:
    """Optimiser groups of the head: per-gene levels at ``HEAD_LR_FACTOR * lr``, the rest ``HEAD_HIDDEN_LR_FACTOR``."""
    levels = head.net[-1].bias
    rest = [p for p in head.parameters() if p is not levels]
    return [
        {"params": [levels], "lr": lr * HEAD_LR_FACTOR},
        {"params": rest, "lr": lr * HEAD_HIDDEN_LR_FACTOR},
    ]


def make_variance_head(embed_dim: int, n_genes: int) -> VarianceHead:
    """A new :class:`VarianceHead`, initialised without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_HEAD_SEED)
        return VarianceHead(embed_dim, n_genes)


def _gaussian_nll(target: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_var + (target - mean) ** 2 * torch.exp(-log_var) + math.log(2 * math.pi)).mean()


def spot_variance(
    mean_log1p: torch.Tensor, log_var: torch.Tensor, cell_spot: torch.Tensor, n_spots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log1p`` of each spot's summed predicted counts and its variance by the delta method, ``(S, G)`` each.

    A cell's counts are ``c = expm1(mean)`` (mean clamped to ``[0, 30]`` as in
    :func:`~ghist._model._losses.spot_sums`), with variance ``(1 + c)^2 var`` on the count scale; cells are taken as
    independent, so ``var[log1p S] = sum_i (1 + c_i)^2 var_i / (1 + S)^2``.
    """
    inside = (cell_spot >= 0) & (cell_spot < n_spots)
    idx = cell_spot[inside]
    mean = mean_log1p.float()[inside].clamp(0.0, _MAX_LOG_COUNTS)
    counts = torch.expm1(mean)
    sums = counts.new_zeros(n_spots, counts.shape[1]).index_add_(0, idx, counts)
    # (1 + c)^2 var in log space: 2 * log1p(c) + log var, summed with logsumexp-safe exponentials.
    var_counts = torch.exp(2 * mean + log_var.float()[inside])
    var_sums = counts.new_zeros(n_spots, counts.shape[1]).index_add_(0, idx, var_counts)
    return torch.log1p(sums), var_sums / (1 + sums) ** 2


def uncertainty_loss(
    head: VarianceHead, out: dict[str, Any], batch: dict[str, Any], expr_scale: float
) -> torch.Tensor | None:
    """Gaussian NLL training the variance head on one batch (see the module docstring); ``None`` without targets.

    Parameters
    ----------
    head
        The variance head.
    out
        The network's output (``embedding``, ``expr`` on the network's scale).
    batch
        The batch, ``expr`` on the network's scale (NaN rows unmeasured); with spots ``cell_spot`` and
        ``spot_expr`` (counts).
    expr_scale
        The network's scale factor.

    """
    mean = out["expr"].detach().float() / expr_scale
    log_var = head(out["embedding"], mean)
    if batch.get("cell_spot") is not None and batch.get("spot_expr") is not None:
        spot_expr = batch["spot_expr"]
        spot_mean, spot_var = spot_variance(mean, log_var, batch["cell_spot"], spot_expr.shape[0])
        has_cells = torch.bincount(batch["cell_spot"][batch["cell_spot"] >= 0], minlength=spot_expr.shape[0]) > 0
        keep = has_cells & torch.isfinite(spot_expr).all(dim=1)
        if not bool(keep.any()):
            return None
        target = torch.log1p(spot_expr[keep].float().clamp(min=0))
        return _gaussian_nll(target, spot_mean[keep], torch.log(spot_var[keep].clamp(min=1e-12)))
    expr_true = batch.get("expr")
    if expr_true is None:
        return None
    measured = torch.isfinite(expr_true).all(dim=1)
    if not bool(measured.any()):
        return None
    return _gaussian_nll(expr_true[measured].float() / expr_scale, mean[measured], log_var[measured])


@torch.inference_mode()
def calibration_scale(
    network: nn.Module, head: VarianceHead, loader: Any, expr_scale: float, device: torch.device
) -> dict[str, Any]:
    """Per-gene factors that make the head's 90% intervals cover 90% of the validation split's measured values.

    For gene ``g``, ``scale_g = q_0.9(|y - mean| / sigma) / 1.645`` over the measured cells of the loader's batches,
    on the ``log1p`` scale (for spot stores: over the spots, with each spot's delta-method sigma). The per-gene
    factors (at least ``MIN_GENE_FACTOR`` times the factor of all genes) are shrunk toward that factor, on the log
    scale, with the weight of ``SHRINK_VALUES`` values (genes with few values keep about the global factor). The
    network runs in evaluation mode without test-time augmentation, as :func:`ghist.tl.predict` does by default.

    Returns
    -------
    ``{"scale": [per-gene factor], "global": factor of all genes, "level": "cell" or "spot" (None: nothing
    measured), "n": values per gene}``; factors are 1 when nothing was measured.

    """
    network.eval()
    head = head.eval()
    zs: list[np.ndarray] = []
    level = "cell"
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
        mean = out["expr"].float() / expr_scale
        log_var = head(out["embedding"], mean)
        if batch.get("cell_spot") is not None and batch.get("spot_expr") is not None:
            level = "spot"
            spot_expr = batch["spot_expr"]
            spot_mean, spot_var = spot_variance(mean, log_var, batch["cell_spot"], spot_expr.shape[0])
            cells = batch["cell_spot"][batch["cell_spot"] >= 0]
            keep = (torch.bincount(cells, minlength=spot_expr.shape[0]) > 0) & torch.isfinite(spot_expr).all(dim=1)
            target = torch.log1p(spot_expr[keep].float().clamp(min=0))
            z = (target - spot_mean[keep]) / spot_var[keep].clamp(min=1e-12).sqrt()
        else:
            expr = batch["expr"]
            measured = torch.isfinite(expr).all(dim=1)
            # Loader batches hold log1p counts (the network's scale is applied in training only); predictions are
            # clamped at 0 on the log1p scale, as in prediction.
            z = (expr[measured].float() - mean[measured].clamp(min=0)) / torch.exp(0.5 * log_var[measured])
        zs.append(z.abs().cpu().numpy())
    n_genes = head.net[-1].out_features
    values = np.concatenate(zs) if zs else np.empty((0, n_genes))
    if values.shape[0] == 0:
        return {"scale": [1.0] * n_genes, "global": 1.0, "level": None, "n": 0}
    overall = float(np.quantile(values, 0.9) / Z90)
    # A gene measured and predicted 0 in >90% of cells has a quantile of 0: floored, or its spread would vanish.
    per_gene = np.maximum(np.quantile(values, 0.9, axis=0) / Z90, MIN_GENE_FACTOR * overall)
    n = values.shape[0]
    weight = n / (n + SHRINK_VALUES)
    shrunk = np.exp(weight * np.log(np.clip(per_gene, 1e-6, None)) + (1 - weight) * math.log(overall))
    return {"scale": [float(v) for v in shrunk], "global": overall, "level": level, "n": int(n)}


def entropy(proba: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``proba`` (rows renormalised; ``0 log 0 = 0``), in ``[0, log K]``.

    Examples
    --------
    >>> entropy(np.array([[1.0, 0.0], [0.5, 0.5]])).round(4)
    array([0.    , 0.6931])

    """
    p = np.asarray(proba, dtype=np.float64)
    p = p / np.clip(p.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return np.clip(terms.sum(axis=1), 0.0, math.log(max(p.shape[1], 1)))


def view_variance(head: VarianceHead, out: dict[str, Any], expr_scale: float) -> torch.Tensor:
    """The head's variance (``log1p`` scale) for one forward pass of the network: ``(N, G)``."""
    return torch.exp(head(out["embedding"], out["expr"].float() / expr_scale))
