"""Per-cell predictions summed into spots (Visium / ST circles, Visium HD bins), to compare with spot measurements."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import TableModel, get_table_keys

from .._centroids import map_points
from .._constants import PRED_KEY, PRED_STD_LAYER, REGION_KEY, SPATIAL_KEY, SPOT_ID_KEY, SPOTS_KEY, UNS_KEY
from .._deprecation import renamed_arguments
from .._docs import doc_params, doc_sdata
from .._spatial import element_affine, shared_coordinate_system
from .._spot_membership import assign_to_spots, spot_geometry, spot_pairs
from .._stats import dense
from .._validation import (
    _preview,
    get_table,
    positions_of_ids,
    region_mask,
    require_key,
    table_of_region,
)
from .._write import check_writable, write_element

logger = logging.getLogger(__name__)


@renamed_arguments(table_key="pred_key")
@doc_params(sdata=doc_sdata)
def aggregate_to_spots(
    sdata: SpatialData,
    *,
    pred_key: str = PRED_KEY,
    spots_key: str = SPOTS_KEY,
    spots_table_key: str | None = None,
    key_added: str | None = None,
    overlap: Literal["nearest", "all"] = "nearest",
    overwrite: bool = False,
) -> AnnData:
    """Sum the predicted counts of the cells inside every spot.

    Turns single-cell predictions (:func:`ghist.tl.predict`) into pseudo-spots that can be compared with
    spot-level measurements (Visium, legacy ST). A cell belongs to a spot when its centroid
    (``obsm["spatial"]`` of the prediction table, in the intrinsic coordinates of the element the table annotates,
    e.g. the nuclei labels' pixels) lies inside the spot: within ``radius`` of the centre for circles (boundary
    included), inside the polygon for polygons. Centroids are carried into the spots' own coordinates through a
    coordinate system both elements share (``"global"`` when they both have it), so spots and labels may live in
    different pixel spaces. A cell inside two overlapping spots counts, by default, for the one whose centre is
    nearest (then the one listed first), the rule spot training and spot evaluation use; ``overlap="all"`` counts
    it for every spot that holds it. A spot without any cell gets zeros.

    The prediction table's ``X`` holds ``log1p(counts)``; the spot sums are of ``expm1(X)``.

    Parameters
    ----------
    {sdata}
    pred_key
        Key of the per-cell prediction table in ``sdata.tables`` (``X`` = ``log1p`` counts, centroids in
        ``obsm["spatial"]``), annotating labels or shapes.
    spots_key
        Key of the spots in ``sdata.shapes``: circles (points with a ``radius`` column) or polygons.
    spots_table_key
        Key of a table annotating ``spots_key`` (e.g. the measured spot counts). The result then has that table's
        rows that annotate the spots, in its order, with its ``obs_names``, region key and instance key. Default:
        one row per spot in the order of ``sdata.shapes[spots_key]``, named after its index, instance key
        ``obs["spot_id"]``.
    key_added
        Key of the new table in ``sdata.tables``; default ``f"{{pred_key}}_{{spots_key}}"``.
    overlap
        A cell under several overlapping spots counts for the ``"nearest"`` one (default) or for ``"all"`` of them.
    overwrite
        Replace an existing ``sdata.tables[key_added]`` instead of raising.

    Returns
    -------
    The spots x genes :class:`~anndata.AnnData`, also written to ``sdata.tables[key_added]``: ``X`` the summed
    predicted counts (``float32``), ``obs["n_cells"]`` the number of cells in each spot, ``layers["ghist_std"]``
    (when the prediction table has it) the predictive standard deviation of ``log1p`` of each sum, from the cells'
    ``layers["ghist_std"]`` by the delta method with cells independent (the rule spot-trained models are
    calibrated with in :func:`ghist.tl.fit`), ``obsm["spatial"]`` the
    spot centres in the spots' intrinsic coordinates, ``uns["ghist"]["aggregate_to_spots"]`` the settings. It is a
    :class:`~spatialdata.models.TableModel` annotating ``spots_key``.

    Examples
    --------
    >>> ghist.tl.predict(sdata, model)
    >>> pseudo = ghist.tl.aggregate_to_spots(sdata, spots_key="spots", spots_table_key="table")
    >>> pseudo.to_df().corrwith(sdata["table"].to_df().loc[pseudo.obs_names, pseudo.var_names])

    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    # only None means "the default name": "" or 0 is a mistake to report, not to replace silently
    key_added = f"{pred_key}_{spots_key}" if key_added is None else key_added
    check_writable(sdata, key_added, "tables", overwrite=overwrite)  # memory and the backing store, before any work
    out, _ = pseudo_spots(
        sdata, pred_key=pred_key, spots_key=spots_key, spots_table_key=spots_table_key, overlap=overlap
    )
    out.uns[UNS_KEY]["aggregate_to_spots"]["params"]["key_added"] = key_added
    out = write_element(sdata, key_added, out, overwrite=overwrite)
    logger.info(
        "Added `sdata.tables[%r]` (%d spots x %d genes): %d of %d cells in a spot, %d spots without cells.",
        key_added,
        out.n_obs,
        out.n_vars,
        int(out.obs["n_cells"].sum()),
        sdata.tables[pred_key].n_obs,
        int((out.obs["n_cells"] == 0).sum()),
    )
    return out


def pseudo_spots(
    sdata: SpatialData,
    *,
    pred_key: str,
    spots_key: str,
    spots_table_key: str | None,
    overlap: Literal["nearest", "all"] = "nearest",
) -> tuple[AnnData, np.ndarray]:
    """The pseudo-spot table of :func:`aggregate_to_spots`, not written to ``sdata``, and each cell's spot.

    The second value is, for every row of the prediction table, the row of the returned table holding the cell by
    the ``"nearest"`` rule, or -1 (outside every spot, or in a spot the spot table does not list). ``overlap``
    decides how the table's sums count cells under several spots.
    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    table = get_table(sdata, pred_key, "pred_key")
    if "spatialdata_attrs" not in table.uns:
        raise ValueError(
            f"Table {pred_key!r} is not a spatialdata TableModel (no `uns['spatialdata_attrs']`); expected the "
            "predictions of `ghist.tl.predict`."
        )
    if SPATIAL_KEY not in table.obsm:
        raise KeyError(
            f"Table {pred_key!r} has no `obsm[{SPATIAL_KEY!r}]` (cell centroids); expected the predictions of "
            f"`ghist.tl.predict` (have obsm {sorted(table.obsm)})."
        )
    shapes = require_key(sdata, "shapes", spots_key)
    geometry = spot_geometry(shapes, spots_key)
    order, obs, instance_key, region_key = _spot_rows(sdata, shapes, spots_key, spots_table_key)

    regions, _, _ = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    centroids = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    if centroids.ndim != 2 or centroids.shape[1] < 2:
        raise ValueError(f"`obsm[{SPATIAL_KEY!r}]` of table {pred_key!r} has shape {centroids.shape}; expected (n, 2).")
    in_spots = np.full((table.n_obs, 2), np.nan)
    systems: dict[str, str] = {}
    for region in regions:
        rows = region_mask(table, region)
        if not rows.any():
            continue
        matrix = element_affine(sdata, region, spots_key)
        systems[region] = shared_coordinate_system(sdata, region, spots_key)
        in_spots[rows] = map_points(centroids[rows, :2], matrix)
    if np.isnan(in_spots).any():
        raise ValueError(f"Table {pred_key!r} has cells with missing (NaN) centroids in `obsm[{SPATIAL_KEY!r}]`.")

    shape_pos = assign_to_spots(in_spots, geometry)
    row_of_shape = np.full(len(geometry), -1, dtype=np.int64)
    row_of_shape[order] = np.arange(len(order))
    cell_row = np.where(shape_pos >= 0, row_of_shape[np.maximum(shape_pos, 0)], -1)
    pair_cell, pair_spot = spot_pairs(in_spots, geometry, overlap=overlap)
    pair_row = row_of_shape[pair_spot]
    pair_cell, pair_row = pair_cell[pair_row >= 0], pair_row[pair_row >= 0]
    membership = sp.csr_matrix(
        (np.ones(len(pair_cell)), (pair_row, pair_cell)), shape=(len(order), table.n_obs), dtype=np.float64
    )
    counts = table.X
    values = counts.data if sp.issparse(counts) else np.asarray(counts)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"Table {pred_key!r} holds dtype {values.dtype}; expected the log1p predictions of ghist.")
    if values.size and not np.isfinite(values).all():
        raise ValueError(
            f"Table {pred_key!r} `X` holds {int((~np.isfinite(values)).sum())} NaN or infinite values; expected the "
            "finite log1p predictions of `ghist.tl.predict`."
        )
    counts = counts.expm1() if sp.issparse(counts) else np.expm1(np.asarray(counts, dtype=np.float64))
    summed = membership @ counts
    summed = summed.toarray() if sp.issparse(summed) else np.asarray(summed)

    obs["n_cells"] = np.asarray(membership.sum(axis=1)).ravel().astype(np.int64)
    out = AnnData(X=summed.astype(np.float32), obs=obs, var=pd.DataFrame(index=table.var_names.copy()))
    if PRED_STD_LAYER in table.layers:
        out.layers[PRED_STD_LAYER] = _spot_std(table, pair_cell, pair_row, len(order))
    out.obsm[SPATIAL_KEY] = geometry.centres[order]
    out.uns[UNS_KEY] = {
        "aggregate_to_spots": {
            "params": {
                "pred_key": pred_key,
                "spots_key": spots_key,
                "spots_table_key": spots_table_key,
                "key_added": None,
                "coordinate_systems": systems,
                "value": "sum of expm1(X)",
                "overlap": overlap,
                "membership": "one spot per cell: the nearest centre among the spots holding its centroid"
                if overlap == "nearest"
                else "every spot holding the cell's centroid",
            }
        }
    }
    out = TableModel.parse(out, region=spots_key, region_key=region_key, instance_key=instance_key)
    return out, cell_row


def _spot_std(table: AnnData, pair_cell: np.ndarray, pair_row: np.ndarray, n_spots: int) -> np.ndarray:
    """Predictive std of ``log1p`` of each spot's summed counts, from the cells' ``ghist_std`` (delta method).

    The rule :func:`ghist.tl.fit` calibrates spot-trained models with (cells independent), so that a spot model's
    pseudo-spots carry the spread its calibration was fitted for.
    """
    import torch

    from .._model._uncertainty import spot_variance

    std = dense(table.layers[PRED_STD_LAYER], np.float32)
    if not np.isfinite(std).all() or (std < 0).any():
        raise ValueError(
            f"`layers[{PRED_STD_LAYER!r}]` holds negative, NaN or infinite values; expected the standard deviations "
            "written by `ghist.tl.predict`."
        )
    with np.errstate(divide="ignore"):
        log_var = torch.from_numpy(2 * np.log(std))
    # A cell under several spots (overlap="all") enters each of their sums: one row per (cell, spot) pair.
    expr = torch.from_numpy(dense(table.X, np.float32)[pair_cell])
    _, var = spot_variance(expr, log_var[pair_cell], torch.from_numpy(pair_row), n_spots)
    return np.sqrt(var.numpy()).astype(np.float32)


def _spot_rows(
    sdata: SpatialData, spots: pd.DataFrame, spots_key: str, spots_table_key: str | None
) -> tuple[np.ndarray, pd.DataFrame, str, str]:
    """Position in ``spots`` of every output row, the output ``obs`` and its instance / region keys."""
    if spots_table_key is None:
        index = spots.index
        obs = pd.DataFrame(
            {REGION_KEY: pd.Categorical([spots_key] * len(index)), SPOT_ID_KEY: np.asarray(index)},
            index=pd.Index(index.astype(str), name=None),
        )
        return np.arange(len(index)), obs, SPOT_ID_KEY, REGION_KEY
    spot_table, region_key, instance_key = table_of_region(sdata, spots_table_key, spots_key, what="spots")
    ids = spot_table.obs[instance_key].to_numpy()
    order = positions_of_ids(ids, pd.Index(spots.index))
    if (order < 0).any():
        missing = ids[order < 0]
        raise KeyError(
            f"Table {spots_table_key!r} lists spots {_preview(missing.tolist())} (`obs[{instance_key!r}]`) that are "
            f"not in the index of `sdata.shapes[{spots_key!r}]`."
        )
    obs = pd.DataFrame(
        {region_key: pd.Categorical([spots_key] * len(ids)), instance_key: ids},
        index=spot_table.obs_names.copy(),
    )
    return order, obs, instance_key, region_key
