from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale

import ghist

# Cells (x, y) in the labels' pixel coordinates and their integer counts over 3 genes.
CENTROIDS = np.array([[2.0, 2.0], [3.0, 2.5], [10.0, 10.0], [11.0, 11.5], [30.0, 30.0]])
COUNTS = np.array([[1, 0, 3], [2, 5, 0], [0, 1, 1], [4, 4, 4], [7, 7, 7]], dtype=np.float64)
# Spots in labels pixels: A holds cells 0 and 1, B cells 2 and 3, C none; cell 4 is in no spot.
SPOTS_LABELS_PX = {"A": ((2.5, 2.0), 2.0), "B": ((10.5, 10.5), 2.0), "C": ((20.0, 2.0), 2.0)}
EXPECTED = {"A": COUNTS[0] + COUNTS[1], "B": COUNTS[2] + COUNTS[3], "C": np.zeros(3)}
N_CELLS = {"A": 2, "B": 2, "C": 0}
SPOT_INDEX = {"A": 10, "B": 20, "C": 30}


def _labels_to_global(kind: str) -> np.ndarray:
    if kind == "scale":
        return np.diag([2.0, 2.0, 1.0])
    if kind == "affine":  # rotation, scale and translation
        s, a = 1.5, 0.3
        return np.array([[s * np.cos(a), -s * np.sin(a), 5.0], [s * np.sin(a), s * np.cos(a), -3.0], [0, 0, 1]])
    return np.eye(3)


def _make(kind: str = "scale", spots_scale: float = 4.0, polygons: bool = False) -> SpatialData:
    """Labels with a transformation to "global"; spots whose intrinsic unit is `spots_scale` global units."""
    L = _labels_to_global(kind)
    labels_t = Identity() if kind == "identity" else Affine(L, input_axes=("x", "y"), output_axes=("x", "y"))
    labels = Labels2DModel.parse(
        np.zeros((40, 40), dtype=np.int32), dims=("y", "x"), transformations={"global": labels_t}
    )
    # Spot geometry in the spots' intrinsic space: labels px -> global (L) -> spots (1 / spots_scale).
    to_spots = np.diag([1 / spots_scale, 1 / spots_scale, 1.0]) @ L
    names = list(SPOTS_LABELS_PX)
    centres = np.array([(to_spots @ [*SPOTS_LABELS_PX[n][0], 1.0])[:2] for n in names])
    # Radii only map exactly under similarity transforms: the scale of L is uniform here.
    unit = np.sqrt(abs(np.linalg.det(to_spots[:2, :2])))
    radii = np.array([SPOTS_LABELS_PX[n][1] * unit for n in names])
    spots_t = {"global": Scale([spots_scale, spots_scale], axes=("x", "y"))}
    index = pd.Index([SPOT_INDEX[n] for n in names])
    if polygons:
        geoms = shapely.buffer(shapely.points(centres), radii, quad_segs=64)
        spots = ShapesModel.parse(gpd.GeoDataFrame(geometry=geoms, index=index), transformations=spots_t)
    else:
        spots = ShapesModel.parse(centres, geometry=0, radius=radii, index=index, transformations=spots_t)

    obs = pd.DataFrame(
        {"region": pd.Categorical(["nuclei"] * 5), "cell_id": np.arange(1, 6)}, index=[f"c{i}" for i in range(1, 6)]
    )
    pred = ad.AnnData(X=np.log1p(COUNTS).astype(np.float32), obs=obs, var=pd.DataFrame(index=["G0", "G1", "G2"]))
    pred.obsm["spatial"] = CENTROIDS.copy()
    pred = TableModel.parse(pred, region="nuclei", region_key="region", instance_key="cell_id")
    return SpatialData(labels={"nuclei": labels}, shapes={"spots": spots}, tables={"ghist": pred})


@pytest.mark.parametrize("kind", ["identity", "scale", "affine"])
@pytest.mark.parametrize("polygons", [False, True])
def test_sums_without_spot_table(kind, polygons):
    sdata = _make(kind, polygons=polygons)
    out = ghist.tl.aggregate_to_spots(sdata)
    assert sdata.tables["ghist_spots"] is out
    assert list(out.obs_names) == ["10", "20", "30"]
    assert list(out.obs["spot_id"]) == [10, 20, 30]
    assert list(out.var_names) == ["G0", "G1", "G2"]
    np.testing.assert_allclose(out.X, np.stack([EXPECTED[n] for n in "ABC"]), rtol=1e-5, atol=1e-5)
    assert out.obs["n_cells"].tolist() == [2, 2, 0]
    attrs = out.uns["spatialdata_attrs"]
    assert attrs["region"] == "spots"
    assert attrs["instance_key"] == "spot_id"
    assert out.obsm["spatial"].shape == (3, 2)


def test_spot_table_order_and_ids():
    sdata = _make("scale", spots_scale=0.25)  # spots finer than the labels
    order = ["C", "A", "B"]
    obs = pd.DataFrame(
        {"library": pd.Categorical(["spots"] * 3), "barcode": [SPOT_INDEX[n] for n in order]},
        index=[f"bc_{n}" for n in order],
    )
    spot_counts = ad.AnnData(X=np.ones((3, 2)), obs=obs)
    sdata.tables["visium"] = TableModel.parse(spot_counts, region="spots", region_key="library", instance_key="barcode")
    out = ghist.tl.aggregate_to_spots(sdata, spots_table_key="visium", key_added="pseudo")
    assert "pseudo" in sdata.tables
    assert list(out.obs_names) == ["bc_C", "bc_A", "bc_B"]
    assert list(out.obs["barcode"]) == [30, 10, 20]
    np.testing.assert_allclose(out.X, np.stack([EXPECTED[n] for n in order]), rtol=1e-5, atol=1e-5)
    assert out.obs["n_cells"].tolist() == [N_CELLS[n] for n in order]
    attrs = out.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("spots", "library", "barcode")
    assert out.uns["ghist"]["aggregate_to_spots"]["params"]["coordinate_systems"] == {"nuclei": "global"}


def test_spot_table_with_unknown_spot():
    sdata = _make()
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * 2), "spot": [10, 99]}, index=["a", "b"])
    sdata.tables["visium"] = TableModel.parse(
        ad.AnnData(X=np.ones((2, 1)), obs=obs), region="spots", region_key="region", instance_key="spot"
    )
    with pytest.raises(KeyError, match="99"):
        ghist.tl.aggregate_to_spots(sdata, spots_table_key="visium")


def test_overwrite_protection_and_inputs_untouched():
    sdata = _make()
    before = sdata.tables["ghist"].X.copy()
    ghist.tl.aggregate_to_spots(sdata)
    np.testing.assert_array_equal(sdata.tables["ghist"].X, before)
    with pytest.raises(ValueError, match="already exists"):
        ghist.tl.aggregate_to_spots(sdata)
    again = ghist.tl.aggregate_to_spots(sdata, overwrite=True)
    assert sdata.tables["ghist_spots"] is again
    with pytest.raises(ValueError, match="unique"):
        ghist.tl.aggregate_to_spots(sdata, key_added="spots")


def test_errors():
    sdata = _make()
    with pytest.raises(KeyError, match="nope"):
        ghist.tl.aggregate_to_spots(sdata, spots_key="nope")
    with pytest.raises(KeyError, match="nope"):
        ghist.tl.aggregate_to_spots(sdata, pred_key="nope")
    del sdata.tables["ghist"].obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        ghist.tl.aggregate_to_spots(sdata)
    sdata = _make()
    sdata.shapes["spots"].attrs["transform"] = {"other": Identity()}
    with pytest.raises(ValueError, match="share no coordinate system"):
        ghist.tl.aggregate_to_spots(sdata)


def test_spot_std_by_the_delta_method():
    sdata = _make("identity")
    table = sdata.tables["ghist"]
    std = np.array([[0.1, 0.2, 0.3], [0.4, 0.0, 0.5], [0.2, 0.2, 0.2], [0.05, 0.3, 0.1], [9.0, 9.0, 9.0]])
    table.layers["ghist_std"] = std.astype(np.float32)
    out = ghist.tl.aggregate_to_spots(sdata)
    # var[log1p S] = sum_i (1 + c_i)^2 sigma_i^2 / (1 + S)^2 over the spot's cells; cell 4 is in no spot
    for row, cells in [(0, [0, 1]), (1, [2, 3])]:
        total = COUNTS[cells].sum(0)
        var = ((1 + COUNTS[cells]) ** 2 * std[cells] ** 2).sum(0) / (1 + total) ** 2
        np.testing.assert_allclose(out.layers["ghist_std"][row], np.sqrt(var), rtol=1e-4)
    np.testing.assert_array_equal(out.layers["ghist_std"][2], 0)  # no cells: a sum of nothing


def test_spot_std_absent_without_cell_std_and_refused_when_invalid():
    sdata = _make("identity")
    assert "ghist_std" not in ghist.tl.aggregate_to_spots(sdata).layers
    sdata.tables["ghist"].layers["ghist_std"] = np.full((5, 3), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="ghist_std"):
        ghist.tl.aggregate_to_spots(sdata, overwrite=True)
