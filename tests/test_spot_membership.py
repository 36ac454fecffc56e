"""One cells-in-spots rule for training, aggregation and evaluation (``ghist._spot_membership``).

Every nucleus centroid belongs to exactly one spot (the one holding it; ties to the nearest centre, then the
spot listed first in the shapes element) or to none. The three paths that use spots — training targets
(``pp._tile_spots.cells_in_spots``), ``tl.aggregate_to_spots`` and ``tl.evaluate(..., spots_key=...)`` — must put
the same cells in the same spots, with overlapping circles and squares sharing edges, whatever the order of the
spot table.
"""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import ghist
from ghist._spot_membership import assign_to_spots, membership_matrix, spot_geometry
from ghist.pp._tile_spots import cells_in_spots, nucleus_centroids, prepare_spots

SIZE = 40
SPOT_UNITS = 0.5  # spots are stored in half labels pixels, with a Scale(2) back to "global"

# Nuclei as labels pixels (row, col); centroid of pixel (i, j) is (j + 0.5, i + 0.5).
CIRCLE_NUCLEI = {
    1: [(10, 10)],  # (10.5, 10.5): inside A only
    2: [(10, 13)],  # (13.5, 10.5): inside A and B, nearer A
    3: [(10, 14)],  # (14.5, 10.5): inside A and B, nearer B
    4: [(12, 13), (12, 14)],  # (14.0, 12.5): equidistant from A and B -> A (listed first)
    5: [(30, 30)],  # (30.5, 30.5): inside C
    6: [(35, 2)],  # (2.5, 35.5): in no spot
    7: [(9, 24), (10, 24)],  # (24.5, 10.0): on B's boundary (distance 6.5 = radius) -> B
}
# Circles in labels pixels: A and B overlap between x = 11.5 and x = 16.5.
CIRCLES = {"A": ((10.0, 10.0), 6.5), "B": ((18.0, 10.0), 6.5), "C": ((30.0, 30.0), 3.0)}
CIRCLE_EXPECTED = {1: "A", 2: "A", 3: "B", 4: "A", 5: "C", 6: None, 7: "B"}

SQUARE_NUCLEI = {
    1: [(5, 9), (5, 10)],  # (10.0, 5.5): on the edge shared by S0 and S1 -> S0 (first)
    2: [(9, 9), (9, 10), (10, 9), (10, 10)],  # (10.0, 10.0): corner of all four squares -> S0
    3: [(5, 15)],  # (15.5, 5.5): inside S1
    4: [(15, 5)],  # (5.5, 15.5): inside S2
    5: [(14, 19), (14, 20)],  # (20.0, 14.5): on S3's outer edge -> S3
    6: [(25, 25)],  # (25.5, 25.5): in no square
    7: [(15, 9), (15, 10)],  # (10.0, 15.5): on the edge shared by S2 and S3 -> S2 (listed first)
}
# Squares (x0, y0, x1, y1) in labels pixels: S0 | S1 on top, S2 | S3 below, sharing edges at x = 10 and y = 10.
SQUARES = {"S0": (0, 0, 10, 10), "S1": (10, 0, 20, 10), "S2": (0, 10, 10, 20), "S3": (10, 10, 20, 20)}
SQUARE_EXPECTED = {1: "S0", 2: "S0", 3: "S1", 4: "S2", 5: "S3", 6: None, 7: "S2"}


def _sdata(kind: str, table_order: list[str]) -> tuple[SpatialData, dict[int, str | None]]:
    nuclei, spots, expected = (
        (CIRCLE_NUCLEI, CIRCLES, CIRCLE_EXPECTED) if kind == "circles" else (SQUARE_NUCLEI, SQUARES, SQUARE_EXPECTED)
    )
    labels = np.zeros((SIZE, SIZE), dtype=np.int32)
    for cid, pixels in nuclei.items():
        for i, j in pixels:
            labels[i, j] = cid
    names = list(spots)
    to_global = {"global": Scale([1 / SPOT_UNITS, 1 / SPOT_UNITS], axes=("x", "y"))}
    if kind == "circles":
        centres = np.array([spots[n][0] for n in names]) * SPOT_UNITS
        radii = np.array([spots[n][1] for n in names]) * SPOT_UNITS
        shapes = ShapesModel.parse(centres, geometry=0, radius=radii, index=pd.Index(names), transformations=to_global)
    else:
        boxes = [shapely.box(*(np.array(spots[n]) * SPOT_UNITS)) for n in names]
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes, index=pd.Index(names)), transformations=to_global)

    ids, xy = nucleus_centroids(labels)
    genes = [f"cell{c}" for c in ids]  # one gene per cell: a pseudo-spot's counts show which cells it holds
    pred = ad.AnnData(
        X=np.log1p(np.eye(len(ids))).astype(np.float32),
        obs=pd.DataFrame(
            {"region": pd.Categorical(["nuclei"] * len(ids)), "cell_id": ids}, index=[f"c{c}" for c in ids]
        ),
        var=pd.DataFrame(index=genes),
    )
    pred.obsm["spatial"] = xy
    pred = TableModel.parse(pred, region="nuclei", region_key="region", instance_key="cell_id")
    rng = np.random.default_rng(0)
    measured = ad.AnnData(
        X=sp.csr_matrix(rng.integers(1, 20, size=(len(table_order), len(genes))).astype(np.float32)),
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * len(table_order)), "spot": table_order},
            index=[f"bc_{n}" for n in table_order],
        ),
        var=pd.DataFrame(index=genes),
    )
    measured = TableModel.parse(measured, region="spots", region_key="region", instance_key="spot")
    image = Image2DModel.parse(
        np.zeros((3, SIZE, SIZE), dtype=np.uint8), dims=("c", "y", "x"), transformations={"global": Identity()}
    )
    sdata = SpatialData(
        images={"he": image},
        labels={"nuclei": Labels2DModel.parse(labels, dims=("y", "x"), transformations={"global": Identity()})},
        shapes={"spots": shapes},
        tables={"ghist": pred, "spot_counts": measured},
    )
    return sdata, expected


def _training(sdata: SpatialData) -> dict[int, str | None]:
    spots = prepare_spots(
        sdata, spots_key="spots", table_key="spot_counts", image_key="he", labels_key="nuclei", layer=None
    )
    ids, xy = nucleus_centroids(sdata.labels["nuclei"])
    rows = cells_in_spots(xy, spots)
    return {int(c): (spots.names[r] if r >= 0 else None) for c, r in zip(ids, rows, strict=True)}


def _from_pseudo_spots(pseudo: ad.AnnData, sdata: SpatialData) -> dict[int, str | None]:
    """Read each cell's spot off the pseudo-spot sums (one gene per cell, one count each)."""
    X = np.asarray(pseudo[:, [f"cell{c}" for c in sdata["ghist"].obs["cell_id"]]].X)
    assert set(np.round(X, 4).ravel().tolist()) <= {0.0, 1.0}
    assert (X.sum(axis=0) <= 1 + 1e-5).all()  # no cell counted twice
    spots = pseudo.obs["spot"].astype(str).to_numpy()
    out = {}
    for j, cid in enumerate(sdata["ghist"].obs["cell_id"]):
        hit = np.flatnonzero(X[:, j] > 0.5)
        out[int(cid)] = spots[hit[0]] if len(hit) else None
    return out


@pytest.mark.parametrize("kind", ["circles", "squares"])
@pytest.mark.parametrize("reverse", [False, True])
def test_training_aggregation_and_evaluation_put_cells_in_the_same_spot(kind, reverse):
    names = list(CIRCLES if kind == "circles" else SQUARES)
    sdata, expected = _sdata(kind, names[::-1] if reverse else names)  # table order must not matter

    assert _training(sdata) == expected
    pseudo = ghist.tl.aggregate_to_spots(sdata, spots_key="spots", spots_table_key="spot_counts")
    assert _from_pseudo_spots(pseudo, sdata) == expected
    scores = ghist.tl.evaluate(sdata, table_key="spot_counts", spots_key="spots", key_added="evaluated")
    assert _from_pseudo_spots(sdata.tables["evaluated"], sdata) == expected
    np.testing.assert_allclose(sdata.tables["evaluated"].X, pseudo.X)

    n_in = sum(v is not None for v in expected.values())
    assert int(pseudo.obs["n_cells"].sum()) == n_in  # none counted twice, none lost
    assert scores.attrs["n_cells"] == n_in
    assert scores.attrs["n_spots"] == len(names)


def test_the_rule_itself():
    circles = gpd.GeoDataFrame({"radius": [2.0, 2.0, 1.0]}, geometry=shapely.points([[0, 0], [3, 0], [3, 0]]))
    spots = spot_geometry(circles, "spots")
    xy = np.array([[1.5, 0.0], [3.0, 0.5], [3.0, 1.5], [1.0, 0.0], [-2.0, 0.0], [9.0, 9.0]])
    # tie -> first; same centre (spots 1 and 2) -> first; boundary included; outside -> -1
    np.testing.assert_array_equal(assign_to_spots(xy, spots), [0, 1, 1, 0, 0, -1])
    assert assign_to_spots(np.zeros((0, 2)), spots).shape == (0,)
    m = membership_matrix(assign_to_spots(xy, spots), len(spots))
    assert m.shape == (3, 6)
    assert (np.asarray(m.sum(axis=0)).ravel() <= 1).all()
    # squares that should share an edge but leave a rounding gap between them lose no point on it
    gap = 1e-13
    squares = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1.0 - gap, 1), shapely.box(1.0, 0, 2, 1)])
    assert assign_to_spots(np.array([[1.0 - gap / 2, 0.5]]), spot_geometry(squares, "bins")).tolist() == [0]


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (gpd.GeoDataFrame(geometry=shapely.points([[0, 0]])), r"circles .* or polygons"),
        (gpd.GeoDataFrame({"radius": [0.0]}, geometry=shapely.points([[0, 0]])), "radii <= 0"),
        (gpd.GeoDataFrame({"radius": [1.0]}, geometry=[shapely.box(0, 0, 1, 1)]), "must all be points"),
        (gpd.GeoDataFrame(geometry=[]), "hold no spot"),
    ],
)
def test_bad_spots(frame, match):
    with pytest.raises(ValueError, match=match):
        spot_geometry(frame, "spots")


def test_overlapping_spots_count_a_cell_once_by_default_or_for_every_spot():
    """The docstring's rule, chosen by `overlap`: a nucleus under two spots counts for the nearest, or for both."""
    from ghist._spot_membership import spot_pairs

    circles = gpd.GeoDataFrame({"radius": [4.0, 4.0]}, geometry=shapely.points([[5.0, 5.0], [11.0, 5.0]]))
    xy = np.array([[7.0, 5.0], [8.5, 5.0], [1.5, 5.0], [30.0, 30.0]])  # both spots (nearer 0, nearer 1), spot 0, none
    spots = spot_geometry(circles, "s")
    assert [a.tolist() for a in spot_pairs(xy, spots)] == [[0, 1, 2], [0, 1, 0]]
    assert [a.tolist() for a in spot_pairs(xy, spots, overlap="all")] == [[0, 0, 1, 1, 2], [0, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="overlap"):
        spot_pairs(xy, spots, overlap="both")

    labels = np.zeros((40, 40), dtype=np.int32)
    table = ad.AnnData(
        np.log1p(np.array([[1.0], [2.0], [4.0], [8.0]], dtype=np.float32)),
        obs=pd.DataFrame({"region": pd.Categorical(["nuclei"] * 4), "cell_id": [1, 2, 3, 4]}, index=list("abcd")),
        var=pd.DataFrame(index=["g"]),
    )
    table.obsm["spatial"] = xy
    sdata = SpatialData(
        labels={"nuclei": Labels2DModel.parse(labels, dims=("y", "x"), transformations={"global": Identity()})},
        shapes={"spots": ShapesModel.parse(circles, transformations={"global": Identity()})},
        tables={"ghist": TableModel.parse(table, region="nuclei", region_key="region", instance_key="cell_id")},
    )
    nearest = ghist.tl.aggregate_to_spots(sdata, spots_key="spots")
    np.testing.assert_allclose(np.asarray(nearest.X).ravel(), [1 + 4, 2])
    assert nearest.obs["n_cells"].tolist() == [2, 1]
    every = ghist.tl.aggregate_to_spots(sdata, spots_key="spots", overlap="all", key_added="all")
    np.testing.assert_allclose(np.asarray(every.X).ravel(), [1 + 2 + 4, 1 + 2])
    assert every.obs["n_cells"].tolist() == [3, 2]
    assert every.uns["ghist"]["aggregate_to_spots"]["params"]["overlap"] == "all"
