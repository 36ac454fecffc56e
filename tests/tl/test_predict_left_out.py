"""Nothing left out silently, nothing wrong written, and argument errors before the prediction."""

from __future__ import annotations

import logging

import geopandas as gpd
import numpy as np
import pytest
import torch
from shapely.geometry import Point
from spatialdata.models import Labels2DModel, ShapesModel
from spatialdata.transformations import Identity, get_transformation

import ghist
import ghist.tl._predict as predict_module


@pytest.fixture
def sdata():
    return ghist.datasets.synthetic(image_size=128, n_genes=6, seed=0)


def _model(sdata, **kwargs):
    torch.manual_seed(0)
    genes = list(sdata["table"].var_names)
    return ghist.GHISTModel(genes, ["A", "B"], width=4, embed_dim=8, tile_size=64, **kwargs)


def test_nuclei_too_small_at_the_models_pixel_size_are_counted_and_named(sdata, caplog):
    labels = np.asarray(sdata.labels["nuclei"]).copy()
    # At 2 um/px a 0.5 um/px slide is read every 4th labels pixel (centres 2, 6, 10, ...): pixel (4k+1, 4k+1) never is
    free = [(y, x) for y in range(1, 128, 4) for x in range(1, 128, 4) if labels[y, x] == 0][:3]
    new_ids = labels.max() + 1 + np.arange(len(free))
    for (y, x), i in zip(free, new_ids, strict=True):
        labels[y, x] = i
    element = sdata.labels["nuclei"]
    sdata.labels["nuclei"] = Labels2DModel.parse(
        labels, dims=("y", "x"), transformations=get_transformation(element, get_all=True)
    )
    model = _model(sdata, pixel_size=2.0)
    with caplog.at_level(logging.WARNING, logger="ghist"):
        table = ghist.tl.predict(sdata, model, progress=False)
    left_out = table.uns["ghist"]["cells_left_out"]
    n_labels = np.unique(labels[labels > 0]).size
    assert left_out["n_labels"] == n_labels
    assert left_out["not_seen"] == n_labels - table.n_obs >= len(free)
    assert set(new_ids.tolist()).isdisjoint(table.obs["cell_id"].tolist())
    assert "not in the table" in caplog.text
    assert str(int(new_ids[0])) in caplog.text


def test_cells_outside_the_roi_are_counted(sdata):
    sdata.shapes["roi"] = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": [30.0]}, geometry=[Point(64, 64)]), transformations={"global": Identity()}
    )
    table = ghist.tl.predict(sdata, _model(sdata), roi_key="roi", progress=False)
    left_out = table.uns["ghist"]["cells_left_out"]
    assert left_out["outside_roi"] == left_out["n_labels"] - table.n_obs - left_out["not_seen"] > 0


def test_argument_errors_come_before_the_prediction(sdata, monkeypatch):
    def no_prediction(*args, **kwargs):
        raise AssertionError("the prediction started")

    monkeypatch.setattr(predict_module, "_run", no_prediction)
    model = _model(sdata)
    with pytest.raises(ValueError, match="a/b"):
        ghist.tl.predict(sdata, model, key_added="a/b", progress=False)
    sdata.shapes["far"] = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": [5.0]}, geometry=[Point(5000, 5000)]), transformations={"global": Identity()}
    )
    with pytest.raises(ValueError, match=r"No nucleus centroid.*roi_key='far'"):
        ghist.tl.predict(sdata, model, roi_key="far", progress=False)
    for bad in (1.5, "30"):
        with pytest.raises(ValueError, match="tile_overlap"):
            ghist.tl.predict(sdata, model, tile_overlap=bad, progress=False)
    with pytest.raises(ValueError, match="seed"):
        ghist.tl.predict(sdata, model, seed=2**70, progress=False)
    assert "ghist" not in sdata.tables


def test_non_finite_predictions_are_refused_and_nothing_is_written(sdata):
    model = _model(sdata)
    with torch.no_grad():
        for parameter in model.network.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"non-finite.*lr"):
        ghist.tl.predict(sdata, model, progress=False)
    assert "ghist" not in sdata.tables
