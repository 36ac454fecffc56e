"""Spot-level training end to end: spot tiles -> fit (no cell types) -> predict in spots -> aggregate_to_spots."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import get_transformation

import ghist
from ghist._stats import column_pearson


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("ghist").setLevel(logging.WARNING)
    yield
    logging.getLogger("ghist").setLevel(logging.INFO)


def _with_spots(sdata, radius: float = 25.0, step: float = 60.0) -> None:
    """Circles on a grid of labels pixels and a table of the summed true counts of the cells centred in each."""
    labels = np.asarray(sdata.labels["nuclei"].data)
    rows, cols = np.nonzero(labels)
    ids, inverse = np.unique(labels[rows, cols], return_inverse=True)
    n = np.bincount(inverse)
    xy = np.c_[np.bincount(inverse, weights=cols + 0.5) / n, np.bincount(inverse, weights=rows + 0.5) / n]
    gx, gy = np.meshgrid(np.arange(30.0, labels.shape[1], step), np.arange(30.0, labels.shape[0], step))
    centres = np.c_[gx.ravel(), gy.ravel()]
    d = np.linalg.norm(xy[:, None] - centres[None], axis=2)
    spot = np.where(d.min(axis=1) <= radius, d.argmin(axis=1), -1)
    cells = sdata.tables["table"]
    X = cells.X.toarray() if sp.issparse(cells.X) else np.asarray(cells.X)
    row = pd.Index(cells.obs["cell_id"].to_numpy()).get_indexer(ids)
    counts = np.zeros((len(centres), cells.n_vars))
    keep = (spot >= 0) & (row >= 0)
    np.add.at(counts, spot[keep], X[row[keep]])
    sdata.shapes["spots"] = ShapesModel.parse(
        centres,
        geometry=0,
        radius=np.full(len(centres), radius),
        transformations=get_transformation(sdata.labels["nuclei"], get_all=True),
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(centres)), "spot_id": np.arange(len(centres))},
        index=[f"spot{k}" for k in range(len(centres))],
    )
    table = ad.AnnData(counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=cells.var_names))
    sdata.tables["spot_counts"] = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")


def spot_sample_and_tiles(path):
    """A small synthetic slide with spots (``_with_spots``) and its spot-centred tiles written at ``path``."""
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=16, seed=0)
    _with_spots(sdata)
    tiles = ghist.pp.make_tiles(
        sdata,
        spots_key="spots",
        table_key="spot_counts",
        tiling="spots",
        tile_size=64,
        n_folds=4,
        progress=False,
        path=path,
    )
    return sdata, tiles


@pytest.fixture(scope="module")
def spot_model(tmp_path_factory):
    _, tiles = spot_sample_and_tiles(tmp_path_factory.mktemp("spot_tiles") / "t.zarr")
    model = ghist.tl.fit(
        tiles,
        width=4,
        embed_dim=16,
        max_epochs=8,
        batch_size=4,
        lr=1e-2,
        seed=0,
        progress=False,
        checkpoint_dir=tmp_path_factory.mktemp("spot_ckpt"),
    )
    return tiles, model


@pytest.mark.slow
def test_fit_on_spots_without_cell_types(spot_model):
    tiles, model = spot_model
    assert tiles.cell_types is None
    assert model.n_types == 0
    assert model.is_trained_
    # the default for spot supervision (softplus scored lower on HER2ST's cross-validation)
    assert model.init_params_["output_activation"] == "relu"
    # no cell is measured: no residual readout (it is fitted on cells' residuals)
    assert model.init_params_["readout"] is False
    assert model.network.readout is None
    assert model.readout_ is None
    history = model.history_
    spot = history["train/spot"].to_numpy()
    assert np.isfinite(spot).all()
    assert spot[-1] < 0.5 * spot[0]  # the spot loss falls
    assert "train/expr" not in history.columns  # no cell is measured: no cell-level expression term
    # the validation score is the spots' mean gene Pearson (summed predictions vs measured spots)
    assert np.isfinite(history["val_pearson"].to_numpy()).any()


@pytest.mark.slow
def test_predicted_spots_follow_the_measured_spots(spot_model):
    _, model = spot_model
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=16, seed=1)  # another tissue, never trained on
    _with_spots(sdata)
    table = ghist.tl.predict(sdata, model, roi_key="spots", progress=False)
    assert table.n_obs > 0
    pseudo = ghist.tl.aggregate_to_spots(sdata, pred_key="ghist", spots_key="spots", spots_table_key="spot_counts")
    truth = sdata.tables["spot_counts"]
    assert list(pseudo.obs_names) == list(truth.obs_names)
    has_cells = pseudo.obs["n_cells"].to_numpy() > 0
    pred = np.log1p(np.asarray(pseudo.X)[has_cells])
    true = np.log1p(np.asarray(truth[:, pseudo.var_names].X)[has_cells])
    r = column_pearson(pred, true)
    assert np.nanmean(r) > 0.2
