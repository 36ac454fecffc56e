"""The forward pass for prediction: what a trained :class:`GHISTModel` gives each nucleus of a batch of tiles.

One batch (from :func:`~ghist._model._data.collate_tiles`) goes through the network (averaged over the 8 dihedral
views with test-time augmentation), the cell-type logits become probabilities, the neighbourhood refinement
nudges uncertain cells toward the tile's estimated composition, cells moved into a specialist group take that
group's expression, and the expression is brought back to the ``log1p(counts)`` scale.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._stats import best_correlated
from .._validation import check_number
from ._network import dihedral_view, neighbourhood_refine, specialist_expression
from ._uncertainty import entropy, view_variance

if TYPE_CHECKING:
    from ._model import GHISTModel

__all__ = ["CellPrediction", "Predictor", "forward_views", "refine_indices"]


@dataclass(frozen=True)
class CellPrediction:
    """What the model gives each cell of a batch, in batch order (``N`` cells, ``G`` genes, ``T`` cell types).

    ``expr`` (N, G) float32 on the ``log1p(counts)`` scale (clamped at 0); ``std`` (N, G) its calibrated predictive
    standard deviation (models with a variance head, else ``None``). Models with cell types: ``proba`` (N, T)
    refined probabilities, ``cell_type`` (N,) refined type codes, ``composition`` (N, T) the composition estimated
    for the cell's tile and ``type_entropy`` (N,) the entropy of ``proba``. Models without cell types but with
    reference profiles: ``cell_type`` the best-correlated profile's code and ``type_score`` that correlation.
    """

    expr: np.ndarray
    std: np.ndarray | None = None
    proba: np.ndarray | None = None
    cell_type: np.ndarray | None = None
    composition: np.ndarray | None = None
    type_entropy: np.ndarray | None = None
    type_score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.expr)


# The 8 flips and quarter turns of a tile, as (quarter turns, mirrored) for `dihedral_view`.
DIHEDRAL_VIEWS = tuple((k, flip) for flip in (False, True) for k in range(4))


def forward_views(
    network: torch.nn.Module,
    image: torch.Tensor,
    labels: torch.Tensor,
    cell_batch: torch.Tensor,
    n_cells: int,
    tta: bool,
    variance_head: torch.nn.Module | None = None,
    expr_scale: float = 1.0,
) -> dict[str, Any]:
    """Network outputs in float32 (cell-type logits as probabilities), averaged over the 8 views with ``tta``.

    Cells are pooled by their label ids, so every flipped or rotated view yields its cells in the same order.

    Parameters
    ----------
    network
        A :class:`~ghist._model.GHISTNetwork` (or its fused copy) in evaluation mode.
    image, labels, cell_batch, n_cells
        A batch as :func:`~ghist._model._data.collate_tiles` gives it.
    tta
        Average over the 8 flips and 90° rotations; otherwise one plain pass.
    variance_head, expr_scale
        With a :class:`~ghist._model._uncertainty.VarianceHead`, also ``"var"`` (N, G): the predictive variance on
        the ``log1p`` scale, the mean over views of the head's variance plus (with ``tta``) the variance of the
        views' means (law of total variance).

    Returns
    -------
    ``"expr"`` (N, G) on the network's scale, with cell types also ``"proba"`` (N, T) and ``"composition"``
    (B, T), and ``"group_expr"``: specialist group name -> (N, G).

    """
    views = DIHEDRAL_VIEWS if tta else ((0, False),)
    sums: dict[str, torch.Tensor] = {}
    group_sums: dict[str, torch.Tensor] = {}

    def add(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        store[key] = value.float() if key not in store else store[key] + value.float()

    for k, flip in views:
        img, lab = dihedral_view(image, k, flip), dihedral_view(labels, k, flip)
        out = network(img.contiguous(memory_format=torch.channels_last), lab.contiguous(), cell_batch, n_cells)
        add(sums, "expr", out["expr"])
        if variance_head is not None:
            add(sums, "var", view_variance(variance_head, out, expr_scale))
            add(sums, "mean_sq", (out["expr"].float() / expr_scale) ** 2)
        if out.get("cell_logits") is not None:
            add(sums, "proba", torch.softmax(out["cell_logits"].float(), dim=-1))
            add(sums, "composition", out["composition"])
        for name, value in (out.get("group_expr") or {}).items():
            add(group_sums, name, value)
    n = len(views)
    means = {key: value / n for key, value in sums.items()}
    if variance_head is not None:
        spread = (means.pop("mean_sq") - (means["expr"] / expr_scale) ** 2).clamp(min=0)
        means["var"] = means["var"] + spread
    return {
        **means,
        "group_expr": {name: value / n for name, value in group_sums.items()},
    }


def refine_indices(model: GHISTModel, refine_types: Sequence[str] | None) -> list[int] | None:
    """Indices of the cell types the refinement may move cells between (``None``: all).

    Raises
    ------
    ValueError
        Types were named but the model has none.
    KeyError
        A named type is not one of the model's.

    """
    if refine_types is None:
        return None
    if isinstance(refine_types, str):
        refine_types = [refine_types]
    if not model.cell_types:
        raise ValueError("`refine_types` was given but the model has no cell types.")
    unknown = [t for t in refine_types if t not in model.cell_types]
    if unknown:
        raise KeyError(f"`refine_types` names {unknown}, not among the model's cell types {model.cell_types}.")
    return [model.cell_types.index(t) for t in refine_types]


class Predictor:
    """Applies a trained :class:`GHISTModel` to batches of tiles.

    Works on a fused copy of the network (batch norm folded into the convolutions, channels-last: the same
    outputs up to float rounding, faster) on ``device``; the model itself is left untouched. The refinement's
    random factors come from one CPU generator seeded with ``seed`` and drawn batch after batch, so a run is
    reproducible on any device as long as the batches come in the same order.

    Parameters
    ----------
    model
        The model.
    device
        Where the network runs.
    alpha
        Strength of the neighbourhood refinement; 0 turns it off.
    refine_types
        Cell types the refinement may move cells into or out of (default: all).
    tta
        Average the network's outputs over the 8 flips and 90° rotations of each tile.
    seed
        Seed of the refinement's random factors.

    Examples
    --------
    >>> predictor = Predictor(model, device=torch.device("cpu"), alpha=2.0)
    >>> out = predictor(collate_tiles([dataset[0], dataset[1]]))
    >>> out.expr.shape

    """

    def __init__(
        self,
        model: GHISTModel,
        *,
        device: torch.device | str = "cpu",
        alpha: float = 2.0,
        refine_types: Sequence[str] | None = None,
        tta: bool = False,
        seed: int = 0,
    ):
        check_number("alpha", alpha, positive=False)
        self.device = torch.device(device)
        self.alpha = float(alpha)
        self.refine_idx = refine_indices(model, refine_types)
        self.tta = bool(tta)
        self.n_types = model.n_types
        self.expr_scale = float(model.expr_scale)
        self.groups = {
            name: [model.cell_types.index(t) for t in members] for name, members in model.cell_type_groups.items()
        }
        self.network = model.network.fuse_for_inference(channels_last=True).to(self.device)
        head = getattr(model, "uncertainty_head", None)
        self.variance_head = None if head is None else copy.deepcopy(head).eval().to(self.device)
        scale = getattr(model, "uncertainty_", {}).get("scale", 1.0)
        self.std_scale = torch.as_tensor(scale, dtype=torch.float32, device=self.device)
        self.generator = torch.Generator().manual_seed(int(seed))
        # A model trained without cell types (e.g. on spots) types each cell by its best-correlated reference profile,
        # by the rule of `ghist.pp.annotate_cell_types` (Pearson over the genes on the log1p scale).
        self.profiles = None
        if not self.n_types and getattr(model, "reference_names", None):
            reference = model.network.reference.detach().cpu().numpy().astype(np.float64)
            self.profiles = reference / float(model.expr_scale)
        self.type_names = list(model.cell_types or []) or list(getattr(model, "reference_names", None) or [])

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> CellPrediction:
        """Predict the cells of one batch.

        Parameters
        ----------
        batch
            A batch from :func:`~ghist._model._data.collate_tiles`.

        Returns
        -------
        The :class:`CellPrediction` of every cell of the batch, in batch order.

        """
        cell_batch = batch["cell_batch"].to(self.device)
        out = forward_views(
            self.network,
            batch["image"].to(self.device),
            batch["labels"].to(self.device),
            cell_batch,
            int(batch["n_cells"]),
            self.tta,
            self.variance_head,
            self.expr_scale,
        )
        expr = out["expr"]
        proba = cell_type = composition = type_entropy = type_score = None
        if self.n_types:
            refined, comp = out["proba"], out["composition"]
            before = refined.argmax(-1)
            refined, after = neighbourhood_refine(
                refined, comp, cell_batch, alpha=self.alpha, types=self.refine_idx, generator=self.generator
            )
            if self.groups:
                expr = specialist_expression(expr, out["group_expr"], before, after, self.groups)
            proba = refined.cpu().numpy()
            cell_type = after.cpu().numpy()
            composition = comp[cell_batch].cpu().numpy()
            type_entropy = entropy(proba)
        expr_np = torch.clamp(expr / self.expr_scale, min=0).cpu().numpy()
        if self.profiles is not None:
            cell_type, type_score = best_correlated(expr_np.astype(np.float64), self.profiles)
        std = None if self.variance_head is None else (out["var"].sqrt() * self.std_scale).cpu().numpy()
        return CellPrediction(
            expr=expr_np,
            std=std,
            proba=proba,
            cell_type=cell_type,
            composition=composition,
            type_entropy=type_entropy,
            type_score=type_score,
        )
