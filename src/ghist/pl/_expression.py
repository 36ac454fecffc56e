"""Spatial plots of predicted cells: expression next to measurements, and cell-type maps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata.models import get_table_keys

from .._constants import PRED_CELL_TYPE_KEY, PRED_KEY, SPATIAL_KEY
from .._deprecation import renamed_arguments
from .._docs import doc_ax, doc_params, doc_save_show
from .._stats import dense
from .._validation import check_genes, check_number, get_image, get_table
from ._utils import _check_crop, _check_sdata, _get_ax, _save_or_show

if TYPE_CHECKING:  # matplotlib loads when a plot is drawn, not on ``import ghist``
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


@renamed_arguments(true_key="table_key")
@doc_params(save_show=doc_save_show, ax=doc_ax)
def expression(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    pred_key: str = PRED_KEY,
    table_key: str | None = None,
    image_key: str | None = None,
    layer: str | None = None,
    crop: tuple[float, float, float, float] | None = None,
    size: float | None = None,
    cmap: str = "viridis",
    panel_size: float = 3.2,
    save: str | PathLike | None = None,
    show: bool | None = None,
) -> Figure:
    """Predicted expression of each gene, next to the measured expression and the H&E.

    One column per gene; the first row shows the prediction, the second (with ``table_key``) the measurement
    on the same cells, sharing one colour scale per gene (``log1p`` counts, clipped at the 99th percentile);
    with ``image_key`` a first column shows the H&E of the same area.

    Parameters
    ----------
    sdata
        SpatialData with the prediction table of :func:`ghist.tl.predict`.
    genes
        Gene or genes to show.
    pred_key
        Prediction table in ``sdata.tables``.
    table_key
        Table of measured raw counts annotating the same labels, shown below the prediction.
    image_key
        H&E image to show beside; drawn in the cells' (labels) pixel coordinates, which must be related to
        the image by a scale/translation.
    layer
        Layer of the measured table with raw counts (default ``X``).
    crop
        ``(x_min, y_min, x_max, y_max)`` in the cells' coordinates to zoom into.
    size
        Marker size (default from the number of cells shown).
    cmap
        Colour map of expression.
    panel_size
        Side of each panel in inches.
    {save_show}

    Returns
    -------
    The figure.

    Examples
    --------
    >>> import ghist
    >>> ghist.pl.expression(sdata, ["EPCAM", "PTPRC"], table_key="table", image_key="he")  # doctest: +SKIP

    """
    import matplotlib.pyplot as plt

    _check_sdata(sdata)
    check_number("size", size, optional=True)
    check_number("panel_size", panel_size)
    _check_crop(crop)
    pred = get_table(sdata, pred_key)
    genes = check_genes(pred.var_names, genes, where=f"`sdata.tables[{pred_key!r}]`")
    xy = np.asarray(pred.obsm[SPATIAL_KEY], dtype=float) if SPATIAL_KEY in pred.obsm else None
    if xy is None:
        raise KeyError(
            f"`sdata.tables[{pred_key!r}]` has no `obsm['spatial']`; expected centroids from `ghist.tl.predict`."
        )
    keep = _in_crop(xy, crop)
    predicted = dense(pred[keep, genes].X)
    xy = xy[keep]
    measured = None
    if table_key is not None:
        measured = _measured_for(get_table(sdata, table_key), pred[keep], genes, layer, table_key)
    rows = 1 + (measured is not None)
    lead = int(image_key is not None)
    fig, axes = plt.subplots(
        rows, lead + len(genes), figsize=(panel_size * (lead + len(genes)) * 1.1, panel_size * rows), squeeze=False
    )
    size = size if size is not None else float(np.clip(12000 / max(len(xy), 1), 0.5, 40))
    if image_key is not None:
        _draw_image(axes[0, 0], sdata, image_key, xy)
        axes[0, 0].set_title("H&E", fontsize=10)
        for ax in axes[1:, 0]:
            ax.set_axis_off()
    for j, gene in enumerate(genes):
        values = [predicted[:, j]] + ([measured[:, j]] if measured is not None else [])
        finite = np.concatenate([v[np.isfinite(v)] for v in values])
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        for i, (value, name) in enumerate(zip(values, ("predicted", "measured"))):
            ax = axes[i, lead + j]
            art = ax.scatter(xy[:, 0], xy[:, 1], c=value, s=size, cmap=cmap, vmin=0, vmax=vmax, linewidths=0)
            ax.set_title(f"{gene} ({name})", fontsize=10)
            _spatial_axes(ax, xy)
        fig.colorbar(art, ax=axes[:, lead + j].tolist(), shrink=0.6, label="log1p counts")
    _save_or_show(fig, save, show)
    return fig


@renamed_arguments(true_key="table_key")
@doc_params(save_show=doc_save_show, ax=doc_ax)
def cell_types(
    sdata: SpatialData,
    *,
    pred_key: str = PRED_KEY,
    table_key: str | None = None,
    cell_type_key: str | None = None,
    crop: tuple[float, float, float, float] | None = None,
    size: float | None = None,
    palette: dict[str, str] | None = None,
    ax: Axes | None = None,
    save: str | PathLike | None = None,
    show: bool | None = None,
) -> Axes | np.ndarray:
    """Map of predicted cell types, optionally next to the measured ones.

    Parameters
    ----------
    sdata
        SpatialData with the prediction table of :func:`ghist.tl.predict`.
    pred_key
        Prediction table in ``sdata.tables``.
    table_key
        Table with measured cell types in ``obs[cell_type_key]``, annotating the same labels.
    cell_type_key
        Column of the measured table with cell types (needed with ``table_key``).
    crop
        ``(x_min, y_min, x_max, y_max)`` in the cells' coordinates.
    size
        Marker size.
    palette
        Cell type -> colour (default: tab10/tab20).
    ax
        Axes to draw the predicted map into (only without ``table_key``).
    {save_show}

    Returns
    -------
    The Axes, or an array of two Axes (predicted, measured) with ``table_key``.

    Examples
    --------
    >>> import ghist
    >>> ghist.pl.cell_types(sdata, table_key="table", cell_type_key="cell_type")  # doctest: +SKIP

    """
    _check_sdata(sdata)
    check_number("size", size, optional=True)
    _check_crop(crop)
    pred = get_table(sdata, pred_key)
    if PRED_CELL_TYPE_KEY not in pred.obs:
        raise KeyError(f"`sdata.tables[{pred_key!r}].obs` has no {PRED_CELL_TYPE_KEY!r}; the model predicts no types.")
    keep = _in_crop(np.asarray(pred.obsm[SPATIAL_KEY]), crop)
    pred = pred[keep]
    xy = np.asarray(pred.obsm[SPATIAL_KEY], dtype=float)
    types = pred.obs[PRED_CELL_TYPE_KEY].astype(str).to_numpy()
    panels = [("predicted", types)]
    if table_key is not None:
        if cell_type_key is None:
            raise ValueError("`cell_type_key` is needed with `table_key`: the column of measured cell types.")
        true = get_table(sdata, table_key)
        if cell_type_key not in true.obs:
            raise KeyError(
                f"{cell_type_key!r} not found in `sdata.tables[{table_key!r}].obs` (have {list(true.obs.columns)})."
            )
        rows = _match_rows(true, pred)
        measured = np.where(rows >= 0, true.obs[cell_type_key].astype(str).to_numpy()[np.maximum(rows, 0)], "n/a")
        panels.append(("measured", measured))
    categories = list(pred.obs[PRED_CELL_TYPE_KEY].cat.categories)
    categories += sorted({t for _, v in panels for t in v} - set(categories))
    palette = palette or _palette(categories)
    size = size if size is not None else float(np.clip(12000 / max(len(xy), 1), 0.5, 40))
    if len(panels) == 1:
        fig, ax = _get_ax(ax, (5.5, 5))
        axes = np.array([ax])
    else:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (name, values) in zip(axes, panels):
        for t in categories:
            sel = values == t
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=palette.get(t, "grey"), label=t, linewidths=0)
        ax.set_title(f"cell types ({name})")
        _spatial_axes(ax, xy)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    _save_or_show(fig, save, show)
    return axes[0] if len(axes) == 1 else axes


# ---------------------------------------------------------------------------------------------- helpers
def _in_crop(xy: np.ndarray, crop: tuple[float, float, float, float] | None) -> np.ndarray:
    if crop is None:
        return np.ones(len(xy), dtype=bool)
    x0, y0, x1, y1 = crop
    return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)


def _match_rows(true: AnnData, pred: AnnData) -> np.ndarray:
    """Row of ``true`` for each cell of ``pred`` (-1 where the cell was not measured)."""
    _, t_region, t_inst = get_table_keys(true)
    _, p_region, p_inst = get_table_keys(pred)
    true_index = pd.MultiIndex.from_arrays([true.obs[t_region].astype(str), true.obs[t_inst]])
    pred_index = pd.MultiIndex.from_arrays([pred.obs[p_region].astype(str), pred.obs[p_inst]])
    return true_index.get_indexer(pred_index)


def _measured_for(true: AnnData, pred: AnnData, genes: list[str], layer: str | None, table_key: str) -> np.ndarray:
    check_genes(true.var_names, genes, where=f"`sdata.tables[{table_key!r}]`")
    rows = _match_rows(true, pred)
    X = true.layers[layer] if layer is not None else true.X
    values = np.log1p(dense(X[np.maximum(rows, 0)][:, true.var_names.get_indexer(genes)]))
    values[rows < 0] = np.nan
    return values


def _spatial_axes(ax: Axes, xy: np.ndarray) -> None:
    ax.set_aspect("equal")
    ax.invert_yaxis() if not ax.yaxis_inverted() else None
    ax.set_xticks([])
    ax.set_yticks([])
    if len(xy):
        ax.set_xlim(xy[:, 0].min() - 5, xy[:, 0].max() + 5)
        ax.set_ylim(xy[:, 1].max() + 5, xy[:, 1].min() - 5)


def _draw_image(ax: Axes, sdata: SpatialData, image_key: str, xy: np.ndarray) -> None:
    """Draw the H&E in the labels' pixel coordinates (through the shared coordinate system)."""
    from .._spatial import element_affine

    image = get_image(sdata, image_key)
    labels_key = next(iter(sdata.labels)) if len(sdata.labels) == 1 else None
    matrix = np.eye(3) if labels_key is None else element_affine(sdata, image_key, labels_key)
    if abs(matrix[0, 1]) > 1e-6 or abs(matrix[1, 0]) > 1e-6:
        logger.warning("Image %r is rotated relative to the cells; drawn without the rotation.", image_key)
    sx, sy, tx, ty = matrix[0, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]
    x0, x1 = xy[:, 0].min() - 5, xy[:, 0].max() + 5
    y0, y1 = xy[:, 1].min() - 5, xy[:, 1].max() + 5
    # the image pixels that cover the shown area, read lazily
    c0, c1 = int(max(0, (x0 - tx) / sx)), int(min(image.sizes["x"], (x1 - tx) / sx + 1))
    r0, r1 = int(max(0, (y0 - ty) / sy)), int(min(image.sizes["y"], (y1 - ty) / sy + 1))
    step = max(1, int(max(r1 - r0, c1 - c0) / 1200))
    rgb = np.asarray(image.data[:, r0:r1:step, c0:c1:step]).transpose(1, 2, 0)
    extent = (c0 * sx + tx, c1 * sx + tx, r1 * sy + ty, r0 * sy + ty)
    ax.imshow(rgb, extent=extent, interpolation="nearest")
    _spatial_axes(ax, xy)


def _palette(categories: list[str]) -> dict[str, str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if len(categories) <= 10 else "tab20"]
    return {c: to_hex(cmap(i % cmap.N)) for i, c in enumerate(categories)}
