"""The forward pass for prediction: what a trained :class:`GHISTModel` gives each nucleus of a batch of tiles.

One batch (from :func:`~ghist._model._data.collate_tiles`) goes through the network (averaged over the 8 dihedral
views with test-time augmentation), the cell-type logits become probabilities, the neighbourhood refinement
nudges uncertain cells toward the tile's estimated composition, cells moved into a specialist group take that
group's expression, and the expression is brought back to the ``log1p(counts)`` scale (DESIGN section 3,
"Inference").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._memory import release_freed_memory
from ._network import dihedral_view, neighbourhood_refine, specialist_expression
from ._uncertainty import view_variance

if TYPE_CHECKING:
    from ._model import GHISTModel

__all__ = ["Predictor", "forward_views", "refine_indices"]

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
    >>> out["expr"].shape

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
        if alpha < 0:
            raise ValueError(f"`alpha` must be >= 0, got {alpha}.")
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

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Predict the cells of one batch.

        Parameters
        ----------
        batch
            A batch from :func:`~ghist._model._data.collate_tiles`.

        Returns
        -------
        Per cell, in batch order: ``"expr"`` (N, G) on the ``log1p(counts)`` scale (clamped at 0); with a variance
        head ``"std"`` (N, G) its calibrated predictive standard deviation on that scale; with cell types also
        ``"proba"`` (N, T) refined probabilities, ``"type"`` (N,) refined types and ``"comp"`` (N, T)
        the composition estimated for the cell's tile.

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
        result: dict[str, np.ndarray] = {}
        if self.n_types:
            proba, comp = out["proba"], out["composition"]
            before = proba.argmax(-1)
            proba, after = neighbourhood_refine(
                proba, comp, cell_batch, alpha=self.alpha, types=self.refine_idx, generator=self.generator
            )
            if self.groups:
                expr = specialist_expression(expr, out["group_expr"], before, after, self.groups)
            result["proba"] = proba.cpu().numpy()
            result["type"] = after.cpu().numpy()
            result["comp"] = comp[cell_batch].cpu().numpy()
        result["expr"] = torch.clamp(expr / self.expr_scale, min=0).cpu().numpy()
        if self.variance_head is not None:
            result["std"] = (out["var"].sqrt() * self.std_scale).cpu().numpy()
        return result

    def run(
        self,
        batches: Iterable[dict[str, Any] | None],
        *,
        keep: Sequence[str] = ("cell_id",),
        progress: bool = False,
        total: int | None = None,
        desc: str = "ghist.tl.predict",
        compact: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        compact_every: int = 64,
    ) -> dict[str, np.ndarray]:
        """Predict every batch (``None`` batches, tiles without nuclei, are skipped) and concatenate the cells.

        Parameters
        ----------
        batches
            Batches, e.g. a :class:`~torch.utils.data.DataLoader` with
            :func:`~ghist._model._data.collate_slide_tiles`.
        keep
            Per-cell entries of the batches to pass through into the result (e.g. ``"cell_id"``).
        progress, total, desc
            Progress bar over the batches.
        compact, compact_every
            Applied to the cells collected so far every ``compact_every`` batches and at the end (e.g. keeping one
            row per cell), so that memory does not grow with the number of tiles that saw a cell.

        Returns
        -------
        The outputs of :meth:`__call__` and the ``keep`` entries, each concatenated over all cells (an empty
        ``(0,)`` array where no batch had a cell).

        """
        from tqdm.auto import tqdm

        keys = ["expr", *(("proba", "type", "comp") if self.n_types else ()), *keep]
        keys += ["std"] * (self.variance_head is not None)
        collected: dict[str, list[np.ndarray]] = {key: [] for key in keys}

        def merged() -> dict[str, np.ndarray]:
            out = {key: (np.concatenate(parts) if parts else np.empty((0,))) for key, parts in collected.items()}
            return out if compact is None or not collected[keys[0]] else compact(out)

        for i, batch in enumerate(tqdm(batches, desc=desc, unit="batch", total=total, disable=not progress), 1):
            if batch is None:
                continue
            for key, value in self(batch).items():
                collected[key].append(value)
            for key in keep:
                value = batch[key]
                collected[key].append(value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
            if compact is not None and i % compact_every == 0:
                # Cells seen by several overlapping tiles: keep one row each, so memory follows cells, not tiles.
                collected = {key: [value] for key, value in merged().items()}
                release_freed_memory()
        return merged()
