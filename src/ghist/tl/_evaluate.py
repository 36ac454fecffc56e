"""`ghist.tl.evaluate`: per-gene accuracy of predicted against measured expression, per cell or per spot."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import get_table_keys

from .._constants import PRED_CELL_TYPE_KEY, PRED_KEY, SPATIAL_KEY, TABLE_KEY, UNS_KEY
from .._deprecation import renamed_arguments
from .._stats import column_pearson, column_spearman, dense, macro_f1
from .._validation import _preview, check_genes, check_name, check_number, get_counts, get_table, table_of_region
from .._write import check_writable, write_element
from ._spots import pseudo_spots

logger = logging.getLogger(__name__)

_SQUIDPY_LOGGER = "spatialdata._logging"  # squidpy.gr logs through it (squidpy 1.8)
NORMALISED_LAYER = "log_normalised"  # layer of the pseudo-spot table written by `evaluate(..., key_added=...)`


@renamed_arguments(true_key="table_key")
def evaluate(
    sdata: SpatialData,
    *,
    pred_key: str = PRED_KEY,
    table_key: str = TABLE_KEY,
    spots_key: str | None = None,
    cell_type_key: str | None = None,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    n_svg: Sequence[int] = (20, 50),
    target_sum: float | None = 1e4,
    library: Literal["panel", "all"] = "panel",
    panel_share: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Compare predicted with measured expression, gene by gene: cell by cell, or spot by spot.

    **Cells** (default, ``spots_key=None``): ``table_key`` holds measured counts of the same nuclei as the
    predictions (e.g. Xenium). Cells are matched through the instance ids both tables use for the labels they
    annotate; measured counts are put on the predicted scale (``log1p``).

    **Spots** (``spots_key`` given): ``table_key`` holds measured spot counts annotating ``sdata.shapes[spots_key]``
    (Visium circles, Visium HD bins, legacy ST). The per-cell predictions are summed into pseudo-spots with the
    rule of :func:`ghist.tl.aggregate_to_spots` (a cell counts for the one spot holding its centroid). Both sides
    are then normalised per spot — scaled to ``target_sum`` counts per spot, ``log1p`` — and correlated over the
    spots of the spot table (spots without any predicted cell included, as zeros). Nothing is written to
    ``sdata`` unless ``key_added`` is given.

    Parameters
    ----------
    sdata
        SpatialData holding both tables (and, for spots, the spots).
    pred_key
        Table written by :func:`ghist.tl.predict` (``X`` = ``log1p`` counts, centroids in ``obsm["spatial"]``).
    table_key
        Table of measured raw counts: annotating the same labels as ``pred_key`` (cells), or annotating
        ``spots_key`` (spots).
    spots_key
        Key of the spots in ``sdata.shapes`` (circles with a ``radius`` column, or polygons): evaluate spot by spot.
    cell_type_key
        Cells only: column of ``sdata.tables[table_key].obs`` with the measured cell types; enables the cell-type
        scores.
    layer
        Layer of the measured table holding raw counts (default ``X``).
    genes
        Genes to score (default: every gene both tables hold). In spot mode the normalisation still uses every
        shared gene, so scoring a subset does not change the scores of the genes kept.
    n_svg
        Sizes of the sets of most spatially variable genes (Moran's I of the measured expression over the cells or
        spot centres, squidpy) over which mean correlations are also reported.
    target_sum
        Spots only: total of each spot after normalisation (``None``: ``log1p`` of the raw sums and counts, no
        per-spot normalisation).
    library
        Spots only: what a spot's total is. ``"panel"``: its counts over the shared genes, on both sides.
        ``"all"``: for the measurement, its counts over every gene of ``table_key`` (the usual library size); for
        the pseudo-spot, which only knows the panel, its panel total divided by ``panel_share``.
    panel_share
        Spots only, with ``library="all"``: the share of a spot's counts that falls on the panel. Default: the
        median share over the evaluated measured spots. Pass the share of the training spots to keep every
        statistic of the test section out of the predictions' normalisation.
    key_added
        Spots only: also write the pseudo-spots to ``sdata.tables[key_added]`` (as
        :func:`ghist.tl.aggregate_to_spots` does, plus ``layers["log_normalised"]``: the normalised values that were
        correlated).
    overwrite
        With ``key_added``: replace an existing ``sdata.tables[key_added]`` (in memory or in the Zarr store backing
        ``sdata``) instead of raising.

    Returns
    -------
    One row per scored gene: ``pearson``, ``spearman``, ``moran_i`` (of the measured expression) and ``svg_rank``;
    sorted by Pearson. A gene whose measured (or predicted) values are all equal gets NaN correlations (and, when
    measured constant, NaN ``moran_i`` and no rank). ``.attrs`` holds ``level`` (``"cell"`` or ``"spot"``), ``n_genes``,
    ``n_constant_genes`` (measured constant), ``n_constant_predictions`` (predicted constant though measured varying: a
    model that gives a gene one value everywhere; the means leave them out, so check this count when comparing models),
    ``mean_pearson``, ``median_pearson``, ``mean_spearman`` (NaN genes left out), ``mean_pearson_svg<k>`` and
    ``median_pearson_svg<k>`` for each ``k`` of ``n_svg``; for cells ``n_cells``, ``fraction_predicted`` and, with
    ``cell_type_key``, ``cell_type_accuracy``, ``cell_type_macro_f1`` and ``composition_error`` (total variation
    distance between predicted and measured cell-type proportions); for spots ``n_spots``, ``n_spots_without_cells``,
    ``n_cells`` (cells in an evaluated spot), ``target_sum``, ``library`` and ``panel_share``.

    Examples
    --------
    Cells, against a Xenium table of the same nuclei:

    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=1)
    >>> ghist.tl.predict(sdata, model)  # doctest: +SKIP
    >>> scores = ghist.tl.evaluate(sdata, cell_type_key="cell_type")  # doctest: +SKIP
    >>> scores.attrs["mean_pearson"]  # doctest: +SKIP

    Spots, against the measured counts of Visium spots (a table annotating the spot circles):

    >>> ghist.tl.predict(visium, model, roi_key="spots")  # doctest: +SKIP
    >>> scores = ghist.tl.evaluate(visium, table_key="spot_counts", spots_key="spots")  # doctest: +SKIP
    >>> scores.head(), scores.attrs["mean_pearson"], scores.attrs["n_spots"]  # doctest: +SKIP

    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    n_svg = _check_n_svg(n_svg)
    check_name(cell_type_key, "cell_type_key", "a column of both tables' `obs`", optional=True)
    if spots_key is None:
        for name, value, default in (
            ("key_added", key_added, None),
            ("overwrite", overwrite, False),
            ("library", library, "panel"),
            ("panel_share", panel_share, None),
        ):
            if value != default:
                raise ValueError(f"`{name}` applies to spots only; pass `spots_key` too.")
        return _evaluate_cells(sdata, pred_key, table_key, cell_type_key, layer, genes, n_svg)
    if cell_type_key is not None:
        raise ValueError("`cell_type_key` scores cell types cell by cell; spots carry none (`spots_key` is set).")
    if library not in ("panel", "all"):
        raise ValueError(f"`library` must be 'panel' or 'all'; got {library!r}.")
    check_number("target_sum", target_sum, optional=True)
    if panel_share is not None and (library != "all" or not (_is_real(panel_share) and 0 < panel_share <= 1)):
        raise ValueError(f"`panel_share` needs `library='all'` and a value in (0, 1]; got {panel_share!r}.")
    return _evaluate_spots(
        sdata,
        pred_key,
        table_key,
        spots_key,
        layer,
        genes,
        n_svg,
        target_sum,
        library,
        panel_share,
        key_added,
        overwrite=overwrite,
    )


def _is_real(value) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, never a meant count or share)."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _check_n_svg(n_svg: Sequence[int]) -> list[int]:
    if isinstance(n_svg, str) or not isinstance(n_svg, Sequence | np.ndarray):
        raise TypeError(f"`n_svg` must be a sequence of positive integers, e.g. (20, 50); got {n_svg!r}.")
    bad = [k for k in n_svg if not (_is_real(k) and float(k).is_integer() and k > 0)]
    if bad:
        raise ValueError(f"`n_svg` must hold positive integers; got {list(n_svg)!r} ({bad!r} not).")
    return [int(k) for k in n_svg]


def _evaluate_cells(
    sdata: SpatialData,
    pred_key: str,
    true_key: str,
    cell_type_key: str | None,
    layer: str | None,
    genes: Sequence[str] | None,
    n_svg: Sequence[int],
) -> pd.DataFrame:
    pred = get_table(sdata, pred_key)
    true = get_table(sdata, true_key)
    pred_region, pred_ids = _instances(pred, pred_key)
    true_region, true_ids = _instances(true, true_key)
    shared_regions = set(pred_region) & set(true_region)
    if not shared_regions:
        raise ValueError(
            f"Tables {pred_key!r} (annotating {sorted(set(pred_region))}) and {true_key!r} "
            f"(annotating {sorted(set(true_region))}) annotate no common element; "
            "expected both to annotate the same labels (or pass `spots_key` to evaluate on spots)."
        )
    genes = _scored_genes(pred, true, pred_key, true_key, genes)
    pred_index = pd.MultiIndex.from_arrays([pred_region, pred_ids])
    true_index = pd.MultiIndex.from_arrays([true_region, true_ids])
    common = true_index.intersection(pred_index)
    if len(common) < 3:
        raise ValueError(f"Only {len(common)} cells are in both {pred_key!r} and {true_key!r}; expected at least 3.")
    pi = pred_index.get_indexer(common)
    ti = true_index.get_indexer(common)

    counts = get_counts(true, layer=layer, where=f"`sdata.tables[{true_key!r}]`")
    measured = dense(counts[ti][:, true.var_names.get_indexer(genes)])
    measured = np.log1p(measured)
    predicted = dense(pred[pi, genes].X)
    coords = true.obsm[SPATIAL_KEY][ti] if SPATIAL_KEY in true.obsm else None
    result, attrs = _scores(predicted, measured, coords, genes, n_svg)
    attrs = {
        "level": "cell",
        "n_cells": len(common),
        "fraction_predicted": len(common) / len(true_index),
        **attrs,
    }
    if cell_type_key is not None:
        attrs.update(_cell_type_scores(pred, true, pi, ti, cell_type_key, true_key))
    result.attrs.update(attrs)
    logger.info(
        "Evaluated %d cells x %d genes: mean Pearson %.3f", attrs["n_cells"], attrs["n_genes"], attrs["mean_pearson"]
    )
    return result


def _evaluate_spots(
    sdata: SpatialData,
    pred_key: str,
    true_key: str,
    spots_key: str,
    layer: str | None,
    genes: Sequence[str] | None,
    n_svg: Sequence[int],
    target_sum: float | None,
    library: str,
    panel_share: float | None,
    key_added: str | None,
    overwrite: bool = False,
) -> pd.DataFrame:
    if key_added is not None:
        check_writable(sdata, key_added, "tables", overwrite=overwrite)  # memory and the backing store, before work
    pseudo, _ = pseudo_spots(sdata, pred_key=pred_key, spots_key=spots_key, spots_table_key=true_key)
    true, _, _ = table_of_region(sdata, true_key, spots_key, what="spots")
    if true.n_obs < 3:
        raise ValueError(f"Table {true_key!r} has {true.n_obs} spots annotating {spots_key!r}; expected at least 3.")
    pred = get_table(sdata, pred_key)
    panel = _scored_genes(pred, true, pred_key, true_key, None)
    genes = _scored_genes(pred, true, pred_key, true_key, genes)
    counts = get_counts(true, layer=layer, where=f"`sdata.tables[{true_key!r}]`")
    measured = dense(counts[:, true.var_names.get_indexer(panel)])
    summed = dense(pseudo[:, panel].X)

    measured_library = measured.sum(axis=1)
    predicted_library = summed.sum(axis=1)
    if library == "all":
        all_genes = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        if panel_share is None:
            with_counts = all_genes > 0
            if not with_counts.any():
                raise ValueError(f"Every spot of {true_key!r} has zero counts; expected raw counts.")
            panel_share = float(np.median(measured_library[with_counts] / all_genes[with_counts]))
            if panel_share <= 0:
                raise ValueError(f"The shared genes hold no counts in most spots of {true_key!r}; use library='panel'.")
        measured_library = all_genes
        predicted_library = predicted_library / panel_share
    measured_norm = _log_normalise(measured, measured_library, target_sum)
    predicted_norm = _log_normalise(summed, predicted_library, target_sum)

    scored = pd.Index(panel).get_indexer(genes)
    result, attrs = _scores(
        predicted_norm[:, scored], measured_norm[:, scored], np.asarray(pseudo.obsm[SPATIAL_KEY]), genes, n_svg
    )
    n_cells = pseudo.obs["n_cells"].to_numpy()
    attrs = {
        "level": "spot",
        "n_spots": int(true.n_obs),
        "n_spots_without_cells": int((n_cells == 0).sum()),
        "n_cells": int(n_cells.sum()),
        **attrs,
        "target_sum": target_sum,
        "library": library,
        "panel_share": panel_share,
    }
    result.attrs.update(attrs)
    if key_added is not None:
        pseudo = pseudo[:, panel].copy()
        pseudo.layers[NORMALISED_LAYER] = predicted_norm.astype(np.float32)
        params = pseudo.uns[UNS_KEY]["aggregate_to_spots"]["params"]
        params["key_added"] = key_added
        pseudo.uns[UNS_KEY]["evaluate"] = {
            "params": {"target_sum": target_sum, "library": library, "panel_share": panel_share}
        }
        write_element(sdata, key_added, pseudo, overwrite=overwrite)
    logger.info(
        "Evaluated %d spots (%d cells) x %d genes: mean Pearson %.3f",
        attrs["n_spots"],
        attrs["n_cells"],
        attrs["n_genes"],
        attrs["mean_pearson"],
    )
    return result


def _log_normalise(counts: np.ndarray, library: np.ndarray, target_sum: float | None) -> np.ndarray:
    """``log1p(counts / library * target_sum)`` per row; rows with an empty library stay 0."""
    if target_sum is None:
        return np.log1p(counts)
    library = np.asarray(library, dtype=np.float64)[:, None]
    scaled = np.divide(counts, library, out=np.zeros_like(counts, dtype=np.float64), where=library > 0)
    return np.log1p(scaled * float(target_sum))


def _scored_genes(pred: AnnData, true: AnnData, pred_key: str, true_key: str, genes: Sequence[str] | None) -> list[str]:
    shared = [g for g in pred.var_names if g in set(true.var_names)]
    if not shared:
        raise KeyError(f"Tables {pred_key!r} and {true_key!r} share no gene; expected the predicted panel in both.")
    return check_genes(shared, genes, where=f"the genes shared by {pred_key!r} and {true_key!r}")


def _scores(
    predicted: np.ndarray, measured: np.ndarray, coords: np.ndarray | None, genes: list[str], n_svg: Sequence[int]
) -> tuple[pd.DataFrame, dict]:
    """Per-gene correlations and spatial-variability ranks, and their summaries (shared by cells and spots)."""
    result = pd.DataFrame(
        {"pearson": column_pearson(predicted, measured), "spearman": column_spearman(predicted, measured)},
        index=pd.Index(genes, name="gene"),
    )
    constant = _constant_columns(measured)
    flat = _constant_columns(predicted) & ~constant
    moran = _moran(measured, coords, genes, constant)
    if moran is not None:
        result["moran_i"] = moran
        # nullable integers: a constant gene has no Moran's I and so no rank
        result["svg_rank"] = result["moran_i"].rank(ascending=False, method="first").astype("Int64")
    attrs: dict[str, float | int | str | None] = {
        "n_genes": len(genes),
        "n_constant_genes": int(constant.sum()),
        "n_constant_predictions": int(flat.sum()),
        "mean_pearson": _nan_stat(np.nanmean, result["pearson"]),
        "median_pearson": _nan_stat(np.nanmedian, result["pearson"]),
        "mean_spearman": _nan_stat(np.nanmean, result["spearman"]),
    }
    if moran is not None:
        for k in n_svg:
            top = result.dropna(subset=["svg_rank"]).nsmallest(int(k), "svg_rank")
            attrs[f"mean_pearson_svg{k}"] = _nan_stat(np.nanmean, top["pearson"])
            attrs[f"median_pearson_svg{k}"] = _nan_stat(np.nanmedian, top["pearson"])
    if constant.any():
        logger.warning(
            "%d of %d genes are constant in the measured data (no correlation): %s",
            int(constant.sum()),
            len(genes),
            ", ".join(np.asarray(genes)[constant][:5]),
        )
    if flat.any():
        logger.warning(
            "%d of %d genes are predicted constant though measured varying; their NaN correlations are left out of "
            "the means: %s",
            int(flat.sum()),
            len(genes),
            ", ".join(np.asarray(genes)[flat][:5]),
        )
    return result.sort_values("pearson", ascending=False), attrs


def _constant_columns(values: np.ndarray) -> np.ndarray:
    """Which columns hold one value in every row (all of them when there is no row)."""
    return np.ptp(values, axis=0) == 0 if len(values) else np.ones(values.shape[1], dtype=bool)


def _nan_stat(stat, values) -> float:
    """``stat`` over the finite values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(stat(values)) if values.size else float("nan")


def _instances(table: AnnData, key: str) -> tuple[np.ndarray, np.ndarray]:
    if "spatialdata_attrs" not in table.uns:
        raise ValueError(f"Table {key!r} is not a spatialdata TableModel (no `uns['spatialdata_attrs']`).")
    _, region_key, instance_key = get_table_keys(table)
    regions, ids = table.obs[region_key].astype(str).to_numpy(), table.obs[instance_key].to_numpy()
    pairs = pd.MultiIndex.from_arrays([regions, ids])
    if pairs.has_duplicates:
        # a cell with two rows cannot be paired with the other table's row: refuse rather than pick one
        dup = pairs[pairs.duplicated()].unique()
        raise ValueError(
            f"Table {key!r} has {int(pairs.duplicated().sum())} duplicate rows: cell ids "
            f"{_preview([i for _, i in dup])} of `obs[{instance_key!r}]` appear more than once for the same element "
            f"({sorted(set(dup.get_level_values(0)))}); expected one row per cell (e.g. drop the duplicates with "
            f"`table[~table.obs.duplicated([{region_key!r}, {instance_key!r}])]`)."
        )
    return regions, ids


def _moran(
    measured: np.ndarray, coords: np.ndarray | None, genes: list[str], constant: np.ndarray
) -> np.ndarray | None:
    """Moran's I of each measured gene (NaN for constant genes, which have none), or None without coordinates."""
    if coords is None:
        logger.warning("The measured table has no `obsm['spatial']`: spatially variable genes are not ranked.")
        return None
    moran = np.full(len(genes), np.nan)
    varying = [g for g, c in zip(genes, constant, strict=True) if not c]
    if not varying or len(measured) < 3:
        return moran
    import squidpy as sq  # heavy: loaded only when a score needs it, not by `import ghist`

    adata = AnnData(X=measured[:, ~constant].astype(np.float32), var=pd.DataFrame(index=varying))
    adata.obsm[SPATIAL_KEY] = np.asarray(coords, dtype=np.float64)[:, :2]
    # `spatial_neighbors_knn` is the same 6-nearest-neighbour graph as the former
    # `spatial_neighbors(coord_type="generic", n_neighs=6)`, which is deprecated in squidpy 1.8.2 (removed in 1.9).
    with _quiet_squidpy():
        sq.gr.spatial_neighbors_knn(adata, n_neighs=min(6, len(measured) - 1))
        sq.gr.spatial_autocorr(adata, mode="moran", genes=varying, n_perms=None, show_progress_bar=False)
    moran[~constant] = adata.uns["moranI"]["I"].reindex(varying).to_numpy()
    return moran


@contextmanager
def _quiet_squidpy() -> Iterator[None]:
    """Hold back squidpy's INFO lines ("Creating graph ..."), logged through spatialdata's console logger.

    They describe an internal step of ``evaluate`` the user did not ask for; warnings and errors still show.
    """
    squid_logger = logging.getLogger(_SQUIDPY_LOGGER)
    level = squid_logger.level
    squid_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        squid_logger.setLevel(level)


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
