"""GHIST training losses (``docs/method.md``, "What it learns from") and the spot-level supervision term.

Every term is computed only on what its labels allow and is *absent* from the returned dict when nothing can
feed it (cells without a type, tiles without a labelled cell, unmeasured cells, no groups, no types at all),
so it never contributes NaN or a gradient. Values in the dict are the unweighted terms; ``"total"`` is their
weighted sum (see :data:`DEFAULT_LOSS_WEIGHTS`).

Note for distributed training: a batch where a term drops out leaves its head without gradient; under DDP use
``find_unused_parameters=True`` (Lightning: ``strategy="ddp_find_unused_parameters_true"``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._constants import EXPR_SCALE
from .._validation import check_number

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "check_loss_weights",
    "gene_pearson_loss",
    "ghist_losses",
    "pixel_targets",
    "spot_loss",
    "spot_sums",
    "tile_composition",
]

# expm1(30) ~ 1e13 counts per cell: far above any real cell, far below float32 overflow (expm1(89)).
_MAX_LOG_COUNTS = 30.0

#: Weight of each term in ``"total"``. ``"specialist"`` ``None`` means ``1 / n_types``.
DEFAULT_LOSS_WEIGHTS: dict[str, float | None] = {
    "pixel": 1.0,  # per-pixel cross-entropy of the type map (nucleus/background without types)
    "cell_type": 1.0,  # cell-type cross-entropy
    "expr": 1.0,  # expression MSE
    "expr_pearson": 0.0,  # 1 - mean per-gene Pearson over the batch's measured cells (0: not computed)
    "specialist": None,  # sum over groups of each specialist head's MSE on its group's cells
    "expr_type": 1.0,  # cross-entropy of the expression-to-type head on predicted expression
    "expr_cosine": 100.0,  # 1 - cosine similarity of its hidden features, predicted vs measured expression
    "expr_logits": 1.0,  # MSE between its logits, predicted vs measured expression
    "composition": 1.0,  # KL(true tile composition || estimated composition)
    "type_composition": 1.0,  # KL(true tile composition || mean predicted type probabilities of the tile)
    "spot": 1.0,  # spot-level MSE, see `spot_loss`
}

_EPS = 1e-8


def pixel_targets(
    labels: torch.Tensor, cell_type: torch.Tensor | None, n_types: int, ignore_index: int = -100
) -> torch.Tensor:
    """Per-pixel class targets: 0 background, ``type + 1`` on each nucleus (1 without types).

    Pixels labelled ``-1`` and nuclei of unknown type (``cell_type == -1``) get ``ignore_index``.

    Examples
    --------
    >>> labels = torch.tensor([[[0, 1], [2, -1]]])
    >>> pixel_targets(labels, torch.tensor([2, -1]), n_types=3)
    tensor([[[   0,    3],
             [-100, -100]]])

    """
    max_label = int(labels.max()) if labels.numel() else 0
    if cell_type is None:
        cell_type = torch.full((max(max_label, 0),), -1, dtype=torch.long, device=labels.device)
    n_cells = cell_type.numel()
    if n_types:
        typed = torch.where((cell_type >= 0) & (cell_type < n_types), cell_type + 1, ignore_index).long()
    else:  # without types every nucleus is class 1
        typed = torch.ones(n_cells, dtype=torch.long, device=labels.device)
    if max_label > n_cells:
        raise ValueError(f"`labels` hold nucleus id {max_label} but the batch has only {n_cells} cells.")
    # Lookup indexed by label + 1: label -1 -> ignore, 0 -> background, k -> class of cell k.
    lut = torch.cat([torch.tensor([ignore_index, 0], dtype=torch.long, device=labels.device), typed])
    return lut[labels.clamp(min=-1) + 1]


def tile_composition(
    cell_type: torch.Tensor, cell_batch: torch.Tensor, n_tiles: int, n_types: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """True cell-type proportions of each tile from its typed cells: ``(B, T)`` and the ``(B,)`` typed counts."""
    known = (cell_type >= 0) & (cell_type < n_types)
    flat = cell_batch[known] * n_types + cell_type[known]
    counts = torch.bincount(flat, minlength=n_tiles * n_types).reshape(n_tiles, n_types).float()
    total = counts.sum(dim=1)
    return counts / total.clamp(min=1).unsqueeze(1), total


def _kl(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) given log q."""
    return F.kl_div(log_q, p, reduction="sum") / p.shape[0]


def spot_sums(
    expr_pred_scaled: torch.Tensor, cell_spot: torch.Tensor, spot_expr: torch.Tensor, expr_scale: float = EXPR_SCALE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each spot's summed predicted counts ``(S, G)``, and the ``(S,)`` mask of the spots that can be compared.

    A cell's predicted counts are ``expm1(pred / expr_scale)`` with ``pred / expr_scale`` clamped to ``[0, 30]``:
    below 0 a cell would subtract counts from its spot (and a sum below -1 would make ``log1p`` NaN), above 30 the
    exponential would overflow. The network's output is ReLU'd, so the lower clamp only guards other callers and
    never blocks a gradient in training. A spot is compared when it holds a cell and its target is finite (NaN
    rows of ``spot_expr`` are unmeasured). This is the one definition of the spot comparison: the spot loss
    (:func:`spot_loss`) and the spot validation score use it both.

    Examples
    --------
    >>> pred = 5 * torch.log1p(torch.tensor([[1.0, 0.0], [2.0, 4.0]]))
    >>> sums, keep = spot_sums(pred, torch.tensor([0, 0]), torch.tensor([[3.0, 4.0], [1.0, 1.0]]), 5.0)
    >>> sums, keep
    (tensor([[3., 4.],
            [0., 0.]]), tensor([ True, False]))

    """
    n_spots = spot_expr.shape[0]
    inside = (cell_spot >= 0) & (cell_spot < n_spots)
    counts = torch.expm1((expr_pred_scaled.float() / expr_scale).clamp(min=0.0, max=_MAX_LOG_COUNTS))
    idx = cell_spot[inside]
    sums = counts.new_zeros(n_spots, counts.shape[1]).index_add_(0, idx, counts[inside])
    has_cells = torch.bincount(idx, minlength=n_spots) > 0
    return sums, has_cells & torch.isfinite(spot_expr).all(dim=1)


def spot_loss(
    expr_pred_scaled: torch.Tensor,
    cell_spot: torch.Tensor,
    spot_expr: torch.Tensor,
    expr_scale: float = EXPR_SCALE,
) -> torch.Tensor | None:
    """Spot-level supervision (Visium / ST): summed cell predictions against the spot's expression.

    Each cell's prediction is brought back to counts with ``expm1(pred / expr_scale)``; the cells of each spot
    are summed (:func:`spot_sums`), and ``expr_scale * log1p(sum)`` is compared by MSE with
    ``expr_scale * log1p(spot_expr)``.
    Comparing on the same ``expr_scale * log1p`` scale as the cell-level expression MSE keeps the two losses
    commensurate (a spot loss on raw counts would be dominated by a few highly expressed genes), while summing
    in count space is what a spot actually measures.

    Parameters
    ----------
    expr_pred_scaled
        ``(N, G)`` predicted expression on the network's scale, ``expr_scale * log1p(counts)``.
    cell_spot
        ``(N,)`` int64 index of the spot containing each cell, ``-1`` for cells outside every spot.
    spot_expr
        ``(S, G)`` the spots' (library-size normalised) counts, on the same count scale as the cells. Rows
        with NaN are unmeasured and skipped.
    expr_scale
        The network's scale factor.

    Returns
    -------
    The loss, or ``None`` when no measured spot contains a cell.

    Examples
    --------
    >>> pred = 5 * torch.log1p(torch.tensor([[1.0, 0.0], [2.0, 4.0]]))
    >>> spot_loss(pred, torch.tensor([0, 0]), torch.tensor([[3.0, 4.0]]), 5.0)
    tensor(0.)

    """
    sums, keep = spot_sums(expr_pred_scaled, cell_spot, spot_expr, expr_scale)
    if not bool(keep.any()):
        return None
    pred = expr_scale * torch.log1p(sums[keep])
    target = expr_scale * torch.log1p(spot_expr[keep].float().clamp(min=0))
    return F.mse_loss(pred, target)


def check_loss_weights(loss_weights: Mapping[str, float] | None) -> dict[str, float]:
    """``loss_weights`` as a dict of known terms to finite, non-negative floats."""
    if loss_weights is None:
        return {}
    if not isinstance(loss_weights, Mapping):
        raise TypeError(f"`loss_weights` must be a dict of term -> weight; got {type(loss_weights).__name__}.")
    unknown = sorted(set(loss_weights) - set(DEFAULT_LOSS_WEIGHTS))
    if unknown:
        raise KeyError(
            f"Unknown loss terms {unknown} in `loss_weights`; expected some of {sorted(DEFAULT_LOSS_WEIGHTS)}"
        )
    for name, value in loss_weights.items():
        check_number(f"loss_weights[{name!r}]", value, positive=False)
    return {name: float(value) for name, value in loss_weights.items()}


def gene_pearson_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor | None:
    """``1 -`` the mean over genes of the Pearson correlation between predicted and measured values over cells.

    Unlike the MSE, every gene weighs the same whatever its variance, and a gene's level does not count, only how
    its cells rank against each other: the quantity the per-gene accuracy of :func:`ghist.tl.evaluate` scores.
    Genes constant over the cells are left out; ``None`` with fewer than 3 cells or no varying gene.
    """
    if pred.shape[0] < 3:
        return None
    true_c = true - true.mean(dim=0)
    true_ss = true_c.pow(2).sum(dim=0)
    varying = true_ss > _EPS
    if not bool(varying.any()):
        return None
    pred_c = (pred - pred.mean(dim=0))[:, varying]
    true_c, true_ss = true_c[:, varying], true_ss[varying]
    # the clamp keeps a gene predicted constant (as at initialisation) from giving an infinite gradient
    denom = (pred_c.pow(2).sum(dim=0) * true_ss).clamp(min=_EPS).sqrt()
    return 1.0 - ((pred_c * true_c).sum(dim=0) / denom).mean()


def ghist_losses(
    out: Mapping[str, Any],
    batch: Mapping[str, Any],
    network: torch.nn.Module,
    n_types: int | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    *,
    weights: Mapping[str, float | None] | None = None,
    expr_scale: float = EXPR_SCALE,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """All GHIST loss terms for one batch, and their weighted sum ``"total"``.

    Parameters
    ----------
    out
        Output of :meth:`GHISTNetwork.forward <ghist._model._network.GHISTNetwork.forward>`.
    batch
        The batch: ``labels`` (B, T, T), ``cell_batch`` (N,), and optionally ``cell_type`` (N,) int64
        (``-1`` unknown) and ``expr`` (N, G) measured expression on the network's scale (NaN rows unmeasured).
        With ``cell_spot`` (N,) and ``spot_expr`` (S, G) the spot term (:func:`spot_loss`) is added.
    network
        The network (for its expression-to-type head, and defaults of ``n_types`` and ``groups``).
    n_types
        Number of cell types (default ``network.n_types``).
    groups
        Specialist groups ``name -> type indices`` (default ``network.groups``).
    weights
        Overrides of :data:`DEFAULT_LOSS_WEIGHTS`.
    expr_scale
        The network's expression scale (for the spot term).
    ignore_index
        Class index ignored by the pixel loss.

    Returns
    -------
    ``{term: value}`` for the terms that could be computed (see :data:`DEFAULT_LOSS_WEIGHTS` for the names),
    plus ``"total"``.

    """
    n_types = int(getattr(network, "n_types", 0) if n_types is None else n_types)
    groups = dict(getattr(network, "groups", {}) if groups is None else groups)
    w = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
    if w["specialist"] is None:
        w["specialist"] = 1.0 / max(n_types, 1)
    unknown = set(w) - set(DEFAULT_LOSS_WEIGHTS)
    if unknown:
        raise KeyError(f"Unknown loss weights {sorted(unknown)}; expected some of {sorted(DEFAULT_LOSS_WEIGHTS)}.")

    labels = batch["labels"]
    cell_batch = batch["cell_batch"]
    n_cells = cell_batch.numel()
    n_tiles = labels.shape[0]
    device = labels.device
    cell_type = batch.get("cell_type")
    if cell_type is None or not n_types:
        cell_type = torch.full((n_cells,), -1, dtype=torch.long, device=device)
    known = (cell_type >= 0) & (cell_type < n_types)
    expr_true = batch.get("expr")
    measured = (
        torch.isfinite(expr_true).all(dim=1) if expr_true is not None else torch.zeros(n_cells, dtype=torch.bool)
    ).to(device)
    any_known, any_measured = bool(known.any()), bool(measured.any())
    terms: dict[str, torch.Tensor] = {}

    # Pixel map: nucleus mask painted with type + 1.
    target = pixel_targets(labels, cell_type, n_types, ignore_index)
    n_valid = int((target != ignore_index).sum())
    if n_valid:
        terms["pixel"] = F.cross_entropy(out["pixel_logits"].float(), target, ignore_index=ignore_index)

    cell_logits = out.get("cell_logits")
    if n_types and cell_logits is not None and any_known:
        cell_logits = cell_logits.float()
        terms["cell_type"] = F.cross_entropy(cell_logits[known], cell_type[known])

    expr_pred = out["expr"].float()
    if any_measured:
        expr_m = expr_true[measured].float()
        terms["expr"] = F.mse_loss(expr_pred[measured], expr_m)
        if w["expr_pearson"]:
            pearson = gene_pearson_loss(expr_pred[measured], expr_m)
            if pearson is not None:
                terms["expr_pearson"] = pearson

    # Specialist heads: each on the measured cells of its own group.
    if groups and any_measured and any_known:
        group_losses = []
        for name, members in groups.items():
            members_t = torch.as_tensor(list(members), dtype=torch.long, device=device)
            sel = measured & torch.isin(cell_type, members_t)
            if bool(sel.any()):
                group_losses.append(F.mse_loss(out["group_expr"][name].float()[sel], expr_true[sel].float()))
        if group_losses:
            terms["specialist"] = torch.stack(group_losses).sum()

    # Expression-to-type head on predicted (all cells) and measured (measured cells) expression, in one call.
    if n_types and getattr(network, "expr_type_head", None) is not None and (any_known or any_measured):
        inputs = torch.cat([expr_pred, expr_true[measured].float()]) if any_measured else expr_pred
        feats, logits = network.expr_to_type(inputs)
        feats, logits = feats.float(), logits.float()
        feats_pred, logits_pred = feats[:n_cells], logits[:n_cells]
        if any_known:
            terms["expr_type"] = F.cross_entropy(logits_pred[known], cell_type[known])
        if any_measured:
            feats_true, logits_true = feats[n_cells:], logits[n_cells:]
            cos = F.cosine_similarity(feats_pred[measured], feats_true, dim=1, eps=_EPS)
            terms["expr_cosine"] = (1.0 - cos).mean()
            terms["expr_logits"] = F.mse_loss(logits_pred[measured], logits_true)

    # Tile compositions, on tiles with at least one typed cell.
    if n_types and any_known:
        true_comp, typed = tile_composition(cell_type, cell_batch, n_tiles, n_types)
        valid = typed > 0
        comp_logits = out.get("composition_logits")
        if comp_logits is not None:
            terms["composition"] = _kl(torch.log_softmax(comp_logits.float()[valid], dim=1), true_comp[valid])
        if cell_logits is not None:
            probs = torch.softmax(cell_logits, dim=1)
            pred_comp = probs.new_zeros(n_tiles, n_types).index_add_(0, cell_batch, probs)
            pred_comp = pred_comp / pred_comp.sum(dim=1, keepdim=True).clamp(min=_EPS)
            terms["type_composition"] = _kl(torch.log(pred_comp[valid].clamp(min=_EPS)), true_comp[valid])

    if batch.get("cell_spot") is not None and batch.get("spot_expr") is not None:
        spot = spot_loss(out["expr"], batch["cell_spot"], batch["spot_expr"], expr_scale)
        if spot is not None:
            terms["spot"] = spot

    # With nothing to learn from, "total" is a zero that still backpropagates (to zero gradients).
    weighted = [w[name] * value for name, value in terms.items()]
    total = torch.stack(weighted).sum() if weighted else out["pixel_logits"].float().sum() * 0.0
    terms["total"] = total
    return terms
