"""`ghist.io.read_nuclei`: nucleus outlines of other tools as labels on an image's grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale, get_transformation

import ghist
from ghist.io._nuclei import rasterise

DATA = Path(__file__).resolve().parents[1] / "data"
HEIGHT, WIDTH = 60, 80


def _sdata(microns: float | None = 0.5) -> sd.SpatialData:
    transformations = {"global": Identity()}
    if microns is not None:
        transformations["microns"] = Scale([microns, microns], axes=("y", "x"))
    image = Image2DModel.parse(
        np.full((3, HEIGHT, WIDTH), 200, dtype=np.uint8), dims=("c", "y", "x"), transformations=transformations
    )
    return sd.SpatialData(images={"he": image})


def _labels(sdata: sd.SpatialData, key: str = "nuclei") -> np.ndarray:
    return np.asarray(sdata.labels[key].data)


def _areas(labels: np.ndarray) -> list[int]:
    return np.bincount(labels.ravel())[1:].tolist()


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_qupath_export_layout():
    sdata = _sdata()
    ghist.io.read_nuclei(DATA / "qupath_export.geojson", sdata, key_added_shapes="nuclei_shapes")
    labels = _labels(sdata)
    assert labels.shape == (HEIGHT, WIDTH)
    assert labels.dtype == np.int32
    # square 10x10 = 100 px; 20x20 with a 10x10 hole = 300; the cell's nucleus (not its outline) = 100; a
    # MultiPolygon of two 5x5 squares = one nucleus of 50; the annotation (a region) is skipped
    assert _areas(labels) == [100, 300, 100, 50]
    assert (labels[10:20, 10:20] == 1).all()
    assert labels[9, 10] == labels[20, 10] == 0
    assert labels[15, 40] == 0  # the hole
    assert (labels[35:45, 60:70] == 3).all()
    assert labels[32, 57] == 0  # the nucleusGeometry, not the cell outline
    assert get_transformation(sdata.labels["nuclei"], get_all=True) == get_transformation(
        sdata.images["he"], get_all=True
    )
    shapes = sdata.shapes["nuclei_shapes"]
    assert list(shapes.index) == [1, 2, 3, 4]
    assert shapes["name"].tolist()[:3] == ["Tumor", "Stroma", "Immune cells"]
    assert shapes["source_id"].iloc[0] == "5b8e6f2a-1c1d-4f0e-9a3b-0d6f2c1a7e01"
    assert shapes.geometry.area.tolist() == [100, 300, 100, 50]
    # only cells
    ghist.io.read_nuclei(DATA / "qupath_export.geojson", sdata, key_added="cells", object_types=("cell",))
    assert _areas(_labels(sdata, "cells")) == [100]


def test_plain_feature_list():
    sdata = _sdata()
    ghist.io.read_nuclei(DATA / "qupath_feature_list.geojson", sdata)
    labels = _labels(sdata)
    # (2..8) x (2..6): 6 x 4 px; a box on pixel centres (20.5..26.5) x (30.5..33.5): columns 20-25, rows 30-32
    assert _areas(labels) == [24, 18]
    assert (labels[30:33, 20:26] == 2).all()


def test_hovernet_and_cellvit(tmp_path):
    square = [[10, 10], [20, 10], [20, 20], [10, 20]]
    other = [[30, 30], [34, 30], [34, 35], [30, 35]]
    hovernet = {"mag": 40, "nuc": {"7": {"contour": square, "type": 2}, "9": {"contour": other, "type": 1}}}
    sdata = _sdata()
    ghist.io.read_nuclei(_write_json(tmp_path / "hovernet.json", hovernet), sdata, key_added_shapes="s")
    assert _areas(_labels(sdata)) == [100, 20]
    assert sdata.shapes["s"]["source_id"].tolist() == ["7", "9"]
    assert sdata.shapes["s"]["name"].tolist() == ["2", "1"]
    cells = {
        "wsi_metadata": {"base_mpp": 0.25},
        "type_map": {"0": "Background", "1": "Neoplastic", "2": "Inflammatory"},
        "cells": [{"contour": square, "type": 1, "centroid": [15, 15]}, {"contour": other, "type": 2}],
    }
    sdata = _sdata()
    ghist.io.read_nuclei(_write_json(tmp_path / "cells.json", cells), sdata, key_added_shapes="s")
    assert _areas(_labels(sdata)) == [100, 20]
    assert sdata.shapes["s"]["name"].tolist() == ["Neoplastic", "Inflammatory"]
    # CellViT's GeoJSON: every nucleus of a type in one MultiPolygon feature, marked as an annotation
    geojson = [
        {
            "type": "Feature",
            "id": "a",
            "geometry": {"type": "MultiPolygon", "coordinates": [[[*square, square[0]]], [[*other, other[0]]]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Neoplastic", "color": [255, 0, 0]}},
        }
    ]
    path = _write_json(tmp_path / "cells.geojson", geojson)
    sdata = _sdata()
    ghist.io.read_nuclei(path, sdata, format="cellvit")
    assert _areas(_labels(sdata)) == [100, 20]
    # read as generic QuPath GeoJSON, the annotation is skipped: nothing left
    with pytest.raises(ValueError, match="no nuclei"):
        ghist.io.read_nuclei(path, _sdata())


def test_xenium_boundaries_in_microns(tmp_path):
    # two nuclei in microns; the image has 0.5 µm per pixel
    rows = [("c-1", x, y) for x, y in [(5, 5), (10, 5), (10, 10), (5, 10), (5, 5)]]
    rows += [("c-2", x, y) for x, y in [(20, 20), (25, 20), (25, 22.5), (20, 22.5), (20, 20)]]
    frame = pd.DataFrame(rows, columns=["cell_id", "vertex_x", "vertex_y"])
    frame.to_parquet(tmp_path / "nucleus_boundaries.parquet")
    frame.to_csv(tmp_path / "nucleus_boundaries.csv.gz", index=False)
    # through the image's "microns" coordinate system: 5 µm -> 10 px
    sdata = _sdata(microns=0.5)
    ghist.io.read_nuclei(tmp_path / "nucleus_boundaries.parquet", sdata, key_added_shapes="s")
    labels = _labels(sdata)
    assert _areas(labels) == [100, 50]
    assert (labels[10:20, 10:20] == 1).all()
    assert sdata.shapes["s"]["source_id"].tolist() == ["c-1", "c-2"]
    # an explicit pixel size wins; the same from the csv
    sdata = _sdata(microns=None)
    ghist.io.read_nuclei(tmp_path / "nucleus_boundaries.csv.gz", sdata, pixel_size=0.5)
    assert _areas(_labels(sdata)) == [100, 50]
    with pytest.raises(ValueError, match="pixel_size"):
        ghist.io.read_nuclei(tmp_path / "nucleus_boundaries.parquet", _sdata(microns=None))


def test_geoparquet(tmp_path):
    import geopandas as gpd

    frame = gpd.GeoDataFrame(
        {"name": ["a", "b"]}, geometry=[shapely.box(10, 10, 20, 20), shapely.box(30, 30, 34, 35)], index=[11, 12]
    )
    frame.to_parquet(tmp_path / "boundaries.parquet")
    sdata = _sdata()
    ghist.io.read_nuclei(tmp_path / "boundaries.parquet", sdata, key_added_shapes="s")
    assert _areas(_labels(sdata)) == [100, 20]
    assert sdata.shapes["s"]["source_id"].tolist() == ["11", "12"]


def test_rasterise_matches_pixel_centres():
    # random star-shaped polygons against shapely's point-in-polygon at every pixel centre
    rng = np.random.default_rng(0)
    height, width = 70, 90
    geoms = []
    for _ in range(40):
        cx, cy = rng.uniform(8, width - 8), rng.uniform(8, height - 8)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
        radii = rng.uniform(2, 7, 12)
        geoms.append(shapely.Polygon(np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]))
    geoms.append(shapely.box(0, 0, 5, 5).difference(shapely.box(1, 1, 3, 3)))  # a hole
    geoms = np.array(geoms, dtype=object)
    labels = rasterise(geoms, height, width, band_rows=16)[:]
    yy, xx = np.mgrid[:height, :width] + 0.5
    expected = np.zeros((height, width), dtype=np.int32)
    for i, g in enumerate(geoms, start=1):
        expected[shapely.contains_xy(g, xx, yy)] = i
    assert (labels == expected).all()
    assert labels[1, 1] == 0
    assert labels[0, 0] == len(geoms)


def test_bad_input(tmp_path):
    sdata = _sdata()
    square = [[[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]]
    points = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}, "properties": {}},
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}, "properties": {}},
        ],
    }
    with pytest.raises(ValueError, match=r"not polygons \(\{'Point': 1\}\)"):
        ghist.io.read_nuclei(_write_json(tmp_path / "points.geojson", points), sdata)
    far = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[x * 50, y * 50] for x, y in square[0]]]},
    }
    with pytest.raises(ValueError, match=r"1 of 1 nuclei .* lie outside image 'he' \(80 x 60 px\)"):
        ghist.io.read_nuclei(_write_json(tmp_path / "far.geojson", far), sdata)
    with pytest.raises(ValueError, match="Unknown nuclei `format='stardist'`"):
        ghist.io.read_nuclei(DATA / "qupath_export.geojson", sdata, format="stardist")
    (tmp_path / "empty.geojson").write_text("")
    with pytest.raises(ValueError, match="empty"):
        ghist.io.read_nuclei(tmp_path / "empty.geojson", sdata)
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        ghist.io.read_nuclei(tmp_path / "broken.geojson", sdata)
    with pytest.raises(ValueError, match="no nuclei"):
        ghist.io.read_nuclei(
            _write_json(tmp_path / "none.geojson", {"type": "FeatureCollection", "features": []}), sdata
        )
    with pytest.raises(ValueError, match="not GeoJSON features"):
        ghist.io.read_nuclei(_write_json(tmp_path / "other.json", {"cells_list": []}), sdata)
    (tmp_path / "nuclei.txt").write_text("x")
    with pytest.raises(ValueError, match="from its suffix"):
        ghist.io.read_nuclei(tmp_path / "nuclei.txt", sdata)
    with pytest.raises(FileNotFoundError):
        ghist.io.read_nuclei(tmp_path / "missing.geojson", sdata)
    with pytest.raises(KeyError, match=r"'missing' not found in `sdata\.images`"):
        ghist.io.read_nuclei(DATA / "qupath_export.geojson", sdata, image_key="missing")
    with pytest.raises(ValueError, match="contour"):
        ghist.io.read_nuclei(_write_json(tmp_path / "h.json", {"nuc": {"1": {"contour": [[1, 2]]}}}), sdata)
    # nothing was written by the failed calls; an existing key is kept unless overwrite=True
    assert not sdata.labels
    ghist.io.read_nuclei(DATA / "qupath_export.geojson", sdata)
    with pytest.raises(ValueError, match="already exists"):
        ghist.io.read_nuclei(DATA / "qupath_feature_list.geojson", sdata)
    assert _areas(_labels(sdata)) == [100, 300, 100, 50]
    ghist.io.read_nuclei(DATA / "qupath_feature_list.geojson", sdata, overwrite=True)
    assert _areas(_labels(sdata)) == [24, 18]


def test_returns_what_it_added_and_writes_to_the_store(tmp_path):
    sdata = _sdata()
    labels = ghist.io.read_nuclei(DATA / "qupath_feature_list.geojson", sdata)
    assert labels is sdata.labels["nuclei"]
    sdata.write(tmp_path / "s.zarr")
    added = ghist.io.read_nuclei(DATA / "qupath_export.geojson", sdata, key_added="qp", key_added_shapes="qp_shapes")
    assert set(added.labels) == {"qp"}
    assert set(added.shapes) == {"qp_shapes"}
    on_disk = sd.read_zarr(tmp_path / "s.zarr")
    assert _areas(_labels(on_disk, "qp")) == [100, 300, 100, 50]
    assert len(on_disk.shapes["qp_shapes"]) == 4
    with pytest.raises(ValueError, match="already exists"):
        ghist.io.read_nuclei(DATA / "qupath_export.geojson", sdata, key_added="qp")


def test_vectorised_geojson_matches_shapely():
    from ghist.io._nuclei import _from_geojson

    features = json.loads((DATA / "qupath_export.geojson").read_text())["features"]
    geoms = [f["geometry"] for f in features] + [features[2]["nucleusGeometry"]]
    fast = _from_geojson(geoms)
    slow = [shapely.geometry.shape(g) for g in geoms]
    assert [g.geom_type for g in fast] == [g.geom_type for g in slow]
    assert all(shapely.equals(a, b) for a, b in zip(fast, slow, strict=True))
    assert fast[1].interiors[0].length == 40  # the hole kept
