"""`ghist.io.write_qupath`: predicted cells as QuPath GeoJSON, read back by `read_nuclei` to the same nuclei."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from anndata import AnnData
from spatialdata.models import TableModel

import ghist
from ghist._segmentation_scores import segmentation_scores
from ghist._spatial import element_affine, read_labels_window


def _sdata(he_transform: str = "identity") -> sd.SpatialData:
    sdata = ghist.datasets.synthetic(image_size=128, n_genes=6, image_transform=he_transform, seed=0)
    table = sdata.tables["table"]
    table.obs["ghist_cell_type"] = table.obs["cell_type"]  # stands in for a prediction's cell types
    return sdata


def _truth_on_image(sdata: sd.SpatialData) -> np.ndarray:
    image = sdata.images["he"]
    return read_labels_window(
        sdata.labels["nuclei"], element_affine(sdata, "he", "nuclei"), 0, 0, image.sizes["y"], image.sizes["x"]
    )


@pytest.mark.parametrize("he_transform", ["identity", "scale", "affine"])
def test_round_trip_gives_the_same_nuclei(tmp_path, he_transform):
    sdata = _sdata(he_transform)
    path = ghist.io.write_qupath(sdata, tmp_path / "cells.geojson", pred_key="table")
    ghist.io.read_nuclei(path, sdata, key_added="back")
    truth = _truth_on_image(sdata)
    back = np.asarray(sdata.labels["back"].data)
    assert back.shape == truth.shape
    # every nucleus comes back with IoU > 0.95, through a scale or a rotation too
    scores = segmentation_scores(truth, back, iou_threshold=0.95)
    assert scores["n_matched"] == scores["n_true"] == scores["n_pred"] > 40


def test_qupath_layout(tmp_path):
    sdata = _sdata()
    table = sdata.tables["table"]
    genes = list(table.var_names[:2])
    path = ghist.io.write_qupath(sdata, tmp_path / "cells.geojson", pred_key="table", genes=genes)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == table.n_obs
    first = features[0]
    assert first["type"] == "Feature"
    assert first["geometry"]["type"] in ("Polygon", "MultiPolygon")
    props = first["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] == str(table.obs["cell_type"].iloc[0])
    colour = props["classification"]["color"]
    assert len(colour) == 3
    assert all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
    assert list(props["measurements"]) == genes
    expected = np.asarray(table[0, genes].X.todense() if hasattr(table.X, "todense") else table[0, genes].X).ravel()
    assert [props["measurements"][g] for g in genes] == pytest.approx(expected.tolist())
    # the same class always has the same colour; features are unique QuPath ids (UUIDs)
    by_class = {}
    for f in features:
        c = f["properties"]["classification"]
        assert by_class.setdefault(c["name"], c["color"]) == c["color"]
    assert len({f["id"] for f in features}) == len(features)
    # "all" genes; no cell types when the column is absent
    del table.obs["ghist_cell_type"]
    path = ghist.io.write_qupath(sdata, tmp_path / "all.geojson", pred_key="table", genes="all")
    props = json.loads(path.read_text())["features"][0]["properties"]
    assert len(props["measurements"]) == table.n_vars
    assert "classification" not in props


def test_refuses_to_overwrite_and_writes_atomically(tmp_path, monkeypatch):
    sdata = _sdata()
    path = tmp_path / "cells.geojson"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ghist.io.write_qupath(sdata, path, pred_key="table")
    assert path.read_text() == "keep me"

    # a failure while writing leaves the old file and no temporary file
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ghist.io._qupath.json.dump", fail)
    with pytest.raises(OSError, match="disk full"):
        ghist.io.write_qupath(sdata, path, pred_key="table", overwrite=True)
    assert path.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.geojson"]
    monkeypatch.undo()
    ghist.io.write_qupath(sdata, path, pred_key="table", overwrite=True)
    assert json.loads(path.read_text())["type"] == "FeatureCollection"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.geojson"]


def test_bad_input(tmp_path):
    sdata = _sdata()
    with pytest.raises(KeyError, match="missing"):
        ghist.io.write_qupath(sdata, tmp_path / "a.geojson", pred_key="missing")
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        ghist.io.write_qupath(sdata, tmp_path / "a.geojson", pred_key="table", genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="'all' or None"):
        ghist.io.write_qupath(sdata, tmp_path / "a.geojson", pred_key="table", genes="some")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ghist.io.write_qupath(sdata, tmp_path / "no" / "a.geojson", pred_key="table")
    plain = AnnData(np.zeros((2, 1), dtype=np.float32))
    plain.obs["region"] = pd.Categorical(["nuclei"] * 2)
    plain.obs["cell_id"] = [1, 2]
    sdata.tables["other"] = TableModel.parse(plain, region="nuclei", region_key="region", instance_key="cell_id")
    with pytest.raises(ValueError, match="annotates"):
        ghist.io.write_qupath(sdata, tmp_path / "a.geojson", pred_key="other", labels_key="he")
    with pytest.raises(KeyError, match="image_key=None"):
        ghist.io.write_qupath(sdata, tmp_path / "a.geojson", pred_key="table", image_key="missing")
    assert not list(tmp_path.iterdir())
    # coordinates in the labels' own pixels; a NaN value is left out (JSON has no NaN)
    table = sdata.tables["table"]
    values = np.asarray(table.X.todense() if hasattr(table.X, "todense") else table.X, dtype=np.float32)
    values[0, 0] = np.nan
    table.X = values
    path = ghist.io.write_qupath(
        sdata, tmp_path / "b.geojson", pred_key="table", image_key=None, genes=list(table.var_names[:2])
    )
    text = path.read_text()
    assert "NaN" not in text
    assert list(json.loads(text)["features"][0]["properties"]["measurements"]) == [table.var_names[1]]
