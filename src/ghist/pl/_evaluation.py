"""Plots of per-gene evaluation results (predicted vs measured expression)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._docs import doc_ax, doc_params, doc_save_show
from .._validation import check_int
from ._utils import _check_top, _get_ax, _save_or_show

if TYPE_CHECKING:  # matplotlib loads when a plot is drawn, not on ``import ghist``
    from matplotlib.axes import Axes
    from matplotlib.lines import Line2D

logger = logging.getLogger(__name__)

__all__ = ["gene_correlation"]

_SVG, _OTHER = "#d95f02", "#7570b3"
_MAX_LABELLED = 60  # above this many genes, gene names are not written under the bars


@doc_params(save_show=doc_save_show, ax=doc_ax)
def gene_correlation(
    eval_df: pd.DataFrame,
    *,
    metric: str = "pearson",
    svg: str | int | Sequence[str] | None = None,
    top: int | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    save: str | PathLike | None = None,
    show: bool | None = None,
) -> Axes:
    """Ranked per-gene correlation between predicted and measured expression, as a bar plot.

    Genes are sorted from the best to the worst predicted; spatially variable genes (SVGs) are drawn in a
    different colour, and a horizontal line marks the mean over all genes (and over the SVGs, when given).

    Parameters
    ----------
    eval_df
        Per-gene evaluation, indexed by gene, e.g. the output of :func:`ghist.tl.evaluate`, with a column per
        metric (``"pearson"``, ``"spearman"``, ...). Genes with a missing value are left out.
    metric
        Column of ``eval_df`` to plot.
    svg
        Which genes are spatially variable: a boolean column of ``eval_df`` (e.g. ``"is_svg"``), a list of
        genes, or an integer ``k`` for the ``k`` most spatially variable genes by the ``svg_rank`` column that
        :func:`ghist.tl.evaluate` writes (1 = highest Moran's I). ``None`` draws all genes in one colour.
    top
        Show only the ``top`` best genes (the mean lines still use all genes). ``None`` shows all.
    title
        Axes title.
    {ax}
    {save_show}

    Returns
    -------
    The Axes holding the bars.

    Examples
    --------
    >>> res = ghist.tl.evaluate(sdata, pred_key="ghist", table_key="table")
    >>> ghist.pl.gene_correlation(res, metric="pearson", svg="is_svg", top=40)

    """
    if not isinstance(eval_df, pd.DataFrame):
        raise TypeError(f"`eval_df` must be a DataFrame indexed by gene, got {type(eval_df).__name__}.")
    if metric not in eval_df.columns:
        raise KeyError(f"Metric {metric!r} not found in `eval_df` (have {list(eval_df.columns)}).")
    _check_top(top)
    values = pd.to_numeric(eval_df[metric], errors="coerce")
    values.index = values.index.astype(str)
    is_svg = _svg_mask(eval_df, svg, values.index)
    keep = values.notna().to_numpy()
    if not keep.any():
        raise ValueError(f"Column {metric!r} of `eval_df` has no finite value.")
    if (~keep).any():
        logger.info("Leaving out %d genes with a missing %s.", int((~keep).sum()), metric)
    values, is_svg = values[keep], is_svg[keep]
    order = np.argsort(-values.to_numpy(), kind="stable")
    values, is_svg = values.iloc[order], is_svg[order]
    mean_all = float(values.mean())
    mean_svg = float(values[is_svg].mean()) if svg is not None and is_svg.any() else None
    if top is not None:
        values, is_svg = values.iloc[:top], is_svg[:top]

    n = len(values)
    width = min(max(4.0, 0.18 * n + 1.5), 14.0) if n <= _MAX_LABELLED else 8.0
    fig, ax = _get_ax(ax, (width, 3.8))
    x = np.arange(n)
    colors = np.where(is_svg, _SVG, _OTHER)
    ax.bar(x, values.to_numpy(), color=colors, width=0.8 if n <= _MAX_LABELLED else 1.0, linewidth=0)
    ax.axhline(0, color="0.3", lw=0.8)
    handles = []
    ax.axhline(mean_all, color="0.15", ls="--", lw=1.2)
    handles.append(_line_handle("0.15", f"mean, all genes = {mean_all:.3f}"))
    if mean_svg is not None:
        ax.axhline(mean_svg, color=_SVG, ls=":", lw=1.5)
        handles.append(_line_handle(_SVG, f"mean, SVGs = {mean_svg:.3f}"))
    if svg is not None:
        from matplotlib.patches import Patch

        handles = [Patch(color=_SVG, label="SVG"), Patch(color=_OTHER, label="other genes"), *handles]

    if n <= _MAX_LABELLED:
        ax.set_xticks(x, values.index, rotation=90, fontsize="small")
        ax.set_xlim(-0.6, n - 0.4)
    else:
        ax.set_xticks([])
        ax.set_xlim(-1, n)
        ax.set_xlabel(f"{n} genes, ranked")
    ax.set_ylabel(f"{metric.capitalize()} r (predicted vs measured)")
    lo = min(0.0, float(values.min()))
    ax.set_ylim(lo - 0.05, max(1.0, float(values.max())) + 0.05)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles, loc="upper right", frameon=False, fontsize="small")
    if title is not None:
        ax.set_title(title)
    _save_or_show(fig, save, show)
    return ax


def _svg_mask(eval_df: pd.DataFrame, svg: str | int | Sequence[str] | None, genes: pd.Index) -> np.ndarray:
    if svg is None:
        return np.zeros(len(genes), dtype=bool)
    if isinstance(svg, int | np.integer) and not isinstance(svg, bool):
        if "svg_rank" not in eval_df.columns:
            raise KeyError(
                f"`svg={svg}` selects the top genes by the 'svg_rank' column, which `eval_df` lacks "
                f"(have {list(eval_df.columns)}); run `ghist.tl.evaluate` with spatial coordinates or pass a gene list."
            )
        check_int("svg", svg, 1)  # the number of top genes
        return (pd.to_numeric(eval_df["svg_rank"], errors="coerce") <= svg).to_numpy()
    if isinstance(svg, str):
        if svg not in eval_df.columns:
            raise KeyError(
                f"SVG column {svg!r} not found in `eval_df` (have {list(eval_df.columns)}); "
                "pass a boolean column name or a list of genes."
            )
        col = eval_df[svg]
        if not pd.api.types.is_bool_dtype(col) and (col.isna().any() or not set(pd.unique(col)) <= {0, 1}):
            raise ValueError(f"SVG column {svg!r} must be boolean, got dtype {col.dtype}.")
        return col.to_numpy(dtype=bool)
    wanted = {str(g) for g in svg}
    unknown = wanted - set(genes)
    if unknown:
        logger.warning("%d SVG(s) are not in `eval_df` and are ignored: %s", len(unknown), sorted(unknown)[:10])
    return genes.isin(wanted)


def _line_handle(color: str, label: str) -> Line2D:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, ls="--" if color == "0.15" else ":", lw=1.4, label=label)
