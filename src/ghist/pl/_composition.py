"""Stacked bars of predicted (and measured) cell-type proportions per region, slide or sample."""

from __future__ import annotations

import logging
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import CELL_TYPE_KEY, COHORT_PROP_PREFIX, PRED_CELL_TYPE_KEY, PRED_KEY
from .._docs import doc_ax, doc_params, doc_save_show
from ._expression import _match_rows, _palette
from ._utils import _get_ax, _save_or_show

if TYPE_CHECKING:  # matplotlib loads when a plot is drawn, not on ``import ghist``
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

__all__ = ["composition"]

_WHOLE = "whole slide"


@doc_params(save_show=doc_save_show, ax=doc_ax)
def composition(
    data: SpatialData | AnnData,
    *,
    pred_key: str = PRED_KEY,
    true_key: str | None = None,
    cell_type_key: str | None = None,
    groupby: str | None = None,
    ax: Axes | None = None,
    save: str | PathLike | None = None,
    show: bool | None = None,
) -> Axes:
    """Predicted cell-type proportions as stacked bars, next to the measured ones.

    Two kinds of input are accepted.

    - A :class:`~spatialdata.SpatialData` with the prediction table of :func:`ghist.tl.predict`: one bar of the
      proportions of ``obs["ghist_cell_type"]`` per group of cells (``groupby``) or for the whole slide, and with
      ``true_key`` a hatched bar beside it of the measured types ``obs[cell_type_key]`` of that table.
    - A cohort :class:`~anndata.AnnData` of :func:`ghist.tl.predict_cohort`: one bar per sample (or per group of
      samples, averaged) of its ``prop:<type>`` features; with ``true_key`` the measured proportions are read from
      the ``obs`` columns ``"<true_key>:<type>"`` (e.g. ``true_key="true_prop"`` with the clinical table of
      :func:`ghist.datasets.synthetic_cohort` joined into ``obs``).

    With measurements, the title gives the Pearson correlation and the mean absolute difference between predicted
    and measured proportions over all bars and types.

    Parameters
    ----------
    data
        SpatialData with predictions, or a samples x features AnnData from :func:`ghist.tl.predict_cohort`.
    pred_key
        Prediction table in ``sdata.tables`` (SpatialData only).
    true_key
        The ground truth the predicted proportions are compared with. SpatialData: table of measured cells
        annotating the same labels. AnnData: prefix of the ``obs`` columns with measured proportions.
    cell_type_key
        Column of the measured table with its cell types (SpatialData only; default ``"cell_type"``).
    groupby
        SpatialData: a column of the prediction or the measured table (cells are matched between the tables by
        their label id) whose categories get one bar each, e.g. a region annotation; default the whole slide.
        AnnData: an ``obs`` column; samples are averaged within its categories; default one bar per sample.
    {ax}
    {save_show}

    Returns
    -------
    The Axes holding the bars.

    Examples
    --------
    >>> ghist.pl.composition(sdata, true_key="table", groupby="region_name", save="composition.png")  # doctest: +SKIP
    >>> cohort.obs = cohort.obs.join(clinical)  # doctest: +SKIP
    >>> ghist.pl.composition(cohort, true_key="true_prop")  # doctest: +SKIP

    """
    from spatialdata import SpatialData

    if isinstance(data, SpatialData):
        pred, true, title = _from_sdata(data, pred_key, true_key, cell_type_key, groupby)
    elif isinstance(data, AnnData):
        pred, true, title = _from_cohort(data, true_key, groupby)
    else:
        raise TypeError(f"`data` must be a SpatialData or a cohort AnnData, got {type(data).__name__}.")
    if pred.empty:
        raise ValueError("No cell (or sample) to show: every group is empty.")

    types = list(pred.columns)
    if true is not None:
        types += [t for t in true.columns if t not in types]
        groups = list(pred.index) + [g for g in true.index if g not in pred.index]
        pred = pred.reindex(columns=types, fill_value=0.0).reindex(index=groups)  # a group absent from one: NaN
        true = true.reindex(columns=types, fill_value=0.0).reindex(index=groups)
        both = np.isfinite(pred.to_numpy()) & np.isfinite(true.to_numpy())
        p, t = pred.to_numpy()[both], true.to_numpy()[both]
        r = np.corrcoef(p, t)[0, 1] if p.size > 1 and p.std() > 0 and t.std() > 0 else np.nan
        title = f"{title}\nPearson r = {r:.2f}, mean |difference| = {np.abs(p - t).mean():.3f}"
    colors = _palette(types)

    n = len(pred)
    fig, ax = _get_ax(ax, (min(max(4.5, 1.6 + (0.4 if true is None else 0.6) * n), 18.0), 4.2))
    x = np.arange(n, dtype=float)
    width = 0.8 if true is None else 0.4
    offsets = [(0.0, pred, None)] if true is None else [(-0.21, pred, None), (0.21, true, "////")]
    for dx, frame, hatch in offsets:
        bottom = np.zeros(n)
        values = frame.to_numpy(dtype=float)
        for j, t in enumerate(types):
            height = np.nan_to_num(values[:, j])
            ax.bar(x + dx, height, width, bottom=bottom, color=colors[t], hatch=hatch, edgecolor="white", linewidth=0.4)
            bottom += height
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in pred.index], rotation=90 if n > 6 else 0)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("proportion of cells")
    ax.set_title(title, fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colors[t], label=t) for t in types]
    if true is not None:
        handles += [
            Patch(facecolor="lightgrey", edgecolor="white", label="predicted"),
            Patch(facecolor="lightgrey", edgecolor="white", hatch="////", label="measured"),
        ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    _save_or_show(fig, save, show)
    return ax


def _proportions(types: pd.Series, groups: pd.Series) -> pd.DataFrame:
    """Groups x types fractions (rows sum to 1); cells without a type or group are left out."""
    frame = pd.DataFrame({"type": types.to_numpy(), "group": groups.to_numpy()}).dropna()
    if frame.empty:
        return pd.DataFrame()
    counts = pd.crosstab(frame["group"], frame["type"], dropna=False)
    order = [g for g in _categories(groups) if g in counts.index]
    columns = [c for c in _categories(types) if c in counts.columns]
    counts = counts.loc[order, columns]
    return counts.div(counts.sum(axis=1), axis=0)


def _categories(values: pd.Series) -> list:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return list(values.cat.categories)
    return list(pd.unique(values.dropna()))


def _from_sdata(
    sdata: SpatialData, pred_key: str, true_key: str | None, cell_type_key: str | None, groupby: str | None
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    if pred_key not in sdata.tables:
        raise KeyError(
            f"Prediction table {pred_key!r} not found in `sdata.tables` (have {sorted(sdata.tables)}); "
            "run `ghist.tl.predict` first."
        )
    pred = sdata.tables[pred_key]
    if PRED_CELL_TYPE_KEY not in pred.obs:
        raise KeyError(
            f"`sdata.tables[{pred_key!r}].obs` has no {PRED_CELL_TYPE_KEY!r}; the model was trained without cell types."
        )
    true = None
    if true_key is not None:
        if true_key not in sdata.tables:
            raise KeyError(f"Measured table {true_key!r} not found in `sdata.tables` (have {sorted(sdata.tables)}).")
        true = sdata.tables[true_key]
        cell_type_key = CELL_TYPE_KEY if cell_type_key is None else cell_type_key
        if cell_type_key not in true.obs:
            raise KeyError(
                f"Column {cell_type_key!r} not found in `sdata.tables[{true_key!r}].obs` "
                f"(have {list(true.obs.columns)})."
            )
    elif cell_type_key is not None:
        raise ValueError("`cell_type_key` names a column of the measured table; pass `true_key` too.")

    if groupby is None:
        pred_groups = pd.Series(_WHOLE, index=pred.obs_names)
        true_groups = None if true is None else pd.Series(_WHOLE, index=true.obs_names)
    else:
        in_pred, in_true = groupby in pred.obs, true is not None and groupby in true.obs
        if not in_pred and not in_true:
            where = f"`sdata.tables[{pred_key!r}].obs`" + (
                "" if true is None else f" or `sdata.tables[{true_key!r}].obs`"
            )
            raise KeyError(f"Column {groupby!r} not found in {where}.")
        pred_groups = pred.obs[groupby] if in_pred else _mapped(true.obs[groupby], _match_rows(true, pred))
        true_groups = None
        if true is not None:
            true_groups = true.obs[groupby] if in_true else _mapped(pred.obs[groupby], _match_rows(pred, true))
    pred_props = _proportions(pred.obs[PRED_CELL_TYPE_KEY], pred_groups)
    true_props = None if true is None else _proportions(true.obs[cell_type_key], true_groups)
    title = "Cell-type composition" + ("" if groupby is None else f" by {groupby}")
    return pred_props, true_props, title


def _mapped(values: pd.Series, rows: np.ndarray) -> pd.Series:
    """``values`` at ``rows`` (NaN where ``rows`` is -1), keeping categories."""
    out = values.iloc[np.maximum(rows, 0)].reset_index(drop=True)
    if isinstance(out.dtype, pd.CategoricalDtype):
        out = out.cat.set_categories(values.cat.categories)
    out[rows < 0] = np.nan
    return out


def _from_cohort(
    adata: AnnData, true_key: str | None, groupby: str | None
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    features = [v for v in adata.var_names if v.startswith(COHORT_PROP_PREFIX)]
    if not features:
        raise ValueError(
            "The AnnData has no `prop:<type>` features; expected the output of `ghist.tl.predict_cohort` with a "
            "model that has cell types."
        )
    types = [f[len(COHORT_PROP_PREFIX) :] for f in features]
    X = adata[:, features].X
    pred = pd.DataFrame(np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=float), index=adata.obs_names)
    pred.columns = types
    true = None
    if true_key is not None:
        prefix = f"{true_key}:"
        columns = [c for c in adata.obs.columns if str(c).startswith(prefix)]
        if not columns:
            raise KeyError(
                f"No `obs` column starts with {prefix!r}; expected measured proportions in columns "
                f"'{prefix}<type>' (have {list(adata.obs.columns)[:10]})."
            )
        true = adata.obs[columns].astype(float).set_axis([c[len(prefix) :] for c in columns], axis=1)
    title = "Cell-type composition per sample"
    if groupby is not None:
        if groupby not in adata.obs:
            raise KeyError(f"Column {groupby!r} not found in `adata.obs` (have {list(adata.obs.columns)}).")
        groups = adata.obs[groupby]
        order = [g for g in _categories(groups) if (groups == g).any()]
        pred = pred.groupby(groups.to_numpy()).mean().loc[order]
        if true is not None:
            true = true.groupby(groups.to_numpy()).mean().loc[order]
        title = f"Mean cell-type composition by {groupby}"
    return pred, true, title
