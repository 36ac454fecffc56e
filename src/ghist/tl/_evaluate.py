"""`ghist.tl.evaluate`: per-gene accuracy of predicted against measured expression."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import get_table_keys

from .._constants import PRED_CELL_TYPE_KEY, PRED_KEY, SPATIAL_KEY, TABLE_KEY
from .._stats import column_pearson, column_spearman, macro_f1
from .._validation import get_counts, get_table

logger = logging.getLogger(__name__)


def evaluate(
    sdata: SpatialData,
    *,
    pred_key: str = PRED_KEY,
    true_key: str = TABLE_KEY,
    cell_type_key: str | None = None,
    layer: str | None = None,
    n_svg: Sequence[int] = (20, 50),
) -> pd.DataFrame:
    """Compare predicted with measured expression, cell by cell.

    Cells are matched through the instance ids both tables use for the nuclei labels they annotate. Measured
    counts are put on the predicted scale (``log1p``).

    Parameters
    ----------
    sdata
        SpatialData holding both tables.
    pred_key
        Table written by :func:`ghist.tl.predict`.
    true_key
        Table of measured raw counts annotating the same labels.
    cell_type_key
        Column of ``sdata.tables[true_key].obs`` with the measured cell types; enables the cell-type scores.
    layer
        Layer of the measured table holding raw counts (default ``X``).
    n_svg
        Sizes of the sets of most spatially variable genes (Moran's I of the measured expression, squidpy)
        over which mean correlations are also reported.

    Returns
    -------
    One row per gene shared by both tables: ``pearson``, ``spearman``, ``moran_i`` (of the measured
    expression) and ``svg_rank``; sorted by Pearson. ``.attrs`` holds ``n_cells``, ``mean_pearson``,
    ``median_pearson``, ``mean_spearman``, ``mean_pearson_svg<k>`` for each ``k`` of ``n_svg`` and, with
    ``cell_type_key``, ``cell_type_accuracy``, ``cell_type_macro_f1`` and ``composition_error`` (total
    variation distance between predicted and measured cell-type proportions).

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=1)
    >>> ghist.tl.predict(sdata, model)  # doctest: +SKIP
    >>> scores = ghist.tl.evaluate(sdata, cell_type_key="cell_type")  # doctest: +SKIP
    >>> scores.attrs["mean_pearson"]  # doctest: +SKIP

    """
    pred = get_table(sdata, pred_key)
    true = get_table(sdata, true_key)
    pred_region, pred_ids = _instances(pred, pred_key)
    true_region, true_ids = _instances(true, true_key)
    shared_regions = set(pred_region) & set(true_region)
    if not shared_regions:
        raise ValueError(
            f"Tables {pred_key!r} (annotating {sorted(set(pred_region))}) and {true_key!r} "
            f"(annotating {sorted(set(true_region))}) annotate no common element; "
            "expected both to annotate the same labels."
        )
    genes = [g for g in pred.var_names if g in true.var_names]
    if not genes:
        raise KeyError(f"Tables {pred_key!r} and {true_key!r} share no gene; expected the predicted panel in both.")
    pred_index = pd.MultiIndex.from_arrays([pred_region, pred_ids])
    true_index = pd.MultiIndex.from_arrays([true_region, true_ids])
    common = true_index.intersection(pred_index)
    if len(common) < 3:
        raise ValueError(f"Only {len(common)} cells are in both {pred_key!r} and {true_key!r}; expected at least 3.")
    pi = pred_index.get_indexer(common)
    ti = true_index.get_indexer(common)

    counts = get_counts(true, layer=layer, where=f"`sdata.tables[{true_key!r}]`")
    gene_idx = true.var_names.get_indexer(genes)
    measured = counts[ti][:, gene_idx]
    measured = np.log1p(measured.toarray() if sp.issparse(measured) else np.asarray(measured, dtype=np.float64))
    predicted = pred[pi, genes].X
    predicted = np.asarray(predicted.toarray() if sp.issparse(predicted) else predicted, dtype=np.float64)

    result = pd.DataFrame(
        {"pearson": column_pearson(predicted, measured), "spearman": column_spearman(predicted, measured)},
        index=pd.Index(genes, name="gene"),
    )
    moran = _moran(measured, true.obsm[SPATIAL_KEY][ti] if SPATIAL_KEY in true.obsm else None, genes)
    if moran is not None:
        result["moran_i"] = moran
        result["svg_rank"] = result["moran_i"].rank(ascending=False, method="first").astype(int)
    attrs: dict[str, float | int] = {
        "n_cells": len(common),
        "n_genes": len(genes),
        "fraction_predicted": len(common) / len(true_index),
        "mean_pearson": float(np.nanmean(result["pearson"])),
        "median_pearson": float(np.nanmedian(result["pearson"])),
        "mean_spearman": float(np.nanmean(result["spearman"])),
    }
    if moran is not None:
        for k in n_svg:
            top = result.nsmallest(int(k), "svg_rank")
            attrs[f"mean_pearson_svg{k}"] = float(np.nanmean(top["pearson"]))
            attrs[f"median_pearson_svg{k}"] = float(np.nanmedian(top["pearson"]))
    if cell_type_key is not None:
        attrs.update(_cell_type_scores(pred, true, pi, ti, cell_type_key, true_key))
    result = result.sort_values("pearson", ascending=False)
    result.attrs.update(attrs)
    logger.info(
        "Evaluated %d cells x %d genes: mean Pearson %.3f", attrs["n_cells"], attrs["n_genes"], attrs["mean_pearson"]
    )
    return result


def _instances(table: AnnData, key: str) -> tuple[np.ndarray, np.ndarray]:
    if "spatialdata_attrs" not in table.uns:
        raise ValueError(f"Table {key!r} is not a spatialdata TableModel (no `uns['spatialdata_attrs']`).")
    _, region_key, instance_key = get_table_keys(table)
    return table.obs[region_key].astype(str).to_numpy(), table.obs[instance_key].to_numpy()


def _moran(measured: np.ndarray, coords: np.ndarray | None, genes: list[str]) -> np.ndarray | None:
    if coords is None:
        logger.warning("The measured table has no `obsm['spatial']`: spatially variable genes are not ranked.")
        return None
    import squidpy as sq

    adata = AnnData(X=measured.astype(np.float32), var=pd.DataFrame(index=genes))
    adata.obsm[SPATIAL_KEY] = np.asarray(coords, dtype=np.float64)
    sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
    sq.gr.spatial_autocorr(adata, mode="moran", genes=genes, n_perms=None, show_progress_bar=False)
    return adata.uns["moranI"]["I"].reindex(genes).to_numpy()


def _cell_type_scores(
    pred: AnnData, true: AnnData, pi: np.ndarray, ti: np.ndarray, cell_type_key: str, true_key: str
) -> dict[str, float]:
    if cell_type_key not in true.obs:
        raise KeyError(
            f"Cell type column {cell_type_key!r} not found in `sdata.tables[{true_key!r}].obs` "
            f"(have {list(true.obs.columns)})."
        )
    if PRED_CELL_TYPE_KEY not in pred.obs:
        raise KeyError(f"The prediction table has no `obs[{PRED_CELL_TYPE_KEY!r}]`: the model predicts no cell types.")
    true_types = true.obs[cell_type_key].astype(str).to_numpy()[ti]
    pred_types = pred.obs[PRED_CELL_TYPE_KEY].astype(str).to_numpy()[pi]
    categories = sorted(set(true_types) | set(pred_types))
    code = {c: i for i, c in enumerate(categories)}
    t = np.array([code[c] for c in true_types])
    p = np.array([code[c] for c in pred_types])
    true_prop = np.bincount(t, minlength=len(categories)) / t.size
    pred_prop = np.bincount(p, minlength=len(categories)) / p.size
    return {
        "cell_type_accuracy": float((t == p).mean()),
        "cell_type_macro_f1": macro_f1(p, t),
        "composition_error": float(0.5 * np.abs(true_prop - pred_prop).sum()),
    }
