"""One centroid rule (``ghist._centroids``), and the same spot for a nucleus in every function that places cells."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

import ghist
from ghist._centroids import label_centroids, map_points
from ghist._spatial import element_affine
from ghist._spot_membership import assign_to_spots, spot_geometry


def test_the_centroid_is_the_mean_of_pixel_centres():
    labels = np.array([[0, 1, 1], [2, 2, 0], [2, 0, 0]])
    cells = label_centroids(labels)
    assert cells.ids.tolist() == [1, 2]
    assert cells.area.tolist() == [2.0, 3.0]
    np.testing.assert_allclose(cells.xy, [[2.0, 0.5], [(0.5 + 1.5 + 0.5) / 3, (1.5 + 1.5 + 2.5) / 3]])
    np.testing.assert_allclose(label_centroids(labels, offset=(10, 20)).xy, cells.xy + np.array([20.0, 10.0]))


def test_chunked_and_sparse_ids_give_the_same_centroids():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 40, (90, 70))
    whole = label_centroids(labels)
    chunked = label_centroids(da.from_array(labels, chunks=(25, 30)))  # nuclei spread over chunks are merged
    np.testing.assert_array_equal(chunked.ids, whole.ids)
    np.testing.assert_allclose(chunked.xy, whole.xy)
    np.testing.assert_array_equal(chunked.area, whole.area)
    sparse = label_centroids(labels.astype(np.int64) * 10**12)  # ids far beyond a dense count
    np.testing.assert_array_equal(sparse.ids, whole.ids * 10**12)
    np.testing.assert_allclose(sparse.xy, whole.xy)
    assert len(label_centroids(np.zeros((4, 4), dtype=int))) == 0


def test_map_points():
    matrix = np.array([[2.0, 0, 1], [0, 2.0, -1], [0, 0, 1]])
    np.testing.assert_allclose(map_points([[1.0, 1.0], [0.0, 2.0]], matrix), [[3.0, 1.0], [1.0, 3.0]])


@pytest.fixture(scope="module")
def spotted():
    """An H&E image at another pixel size than its labels, and overlapping circular spots with measured counts."""
    sdata = ghist.datasets.synthetic(image_size=192, n_genes=8, seed=1, image_transform="scale")
    gx, gy = np.meshgrid(np.arange(30.0, 192, 45), np.arange(30.0, 192, 45))
    centres = np.c_[gx.ravel(), gy.ravel()]
    # radius 30 > half the spacing: neighbouring spots overlap
    sdata.shapes["spots"] = ShapesModel.parse(
        centres, geometry=0, radius=np.full(len(centres), 30.0), transformations={"global": Identity()}
    )
    genes = list(sdata.tables["table"].var_names)
    counts = np.random.default_rng(0).poisson(20, (len(centres), len(genes))).astype(np.float32)
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(centres)), "spot_id": np.arange(len(centres))},
        index=[f"s{k}" for k in range(len(centres))],
    )
    table = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=genes))
    sdata.tables["spot_counts"] = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    return sdata


def test_a_nucleus_is_under_the_same_spot_everywhere(spotted, tmp_path):
    sdata = spotted
    cells = label_centroids(sdata.labels["nuclei"])
    geometry = spot_geometry(sdata.shapes["spots"], "spots")
    expected = assign_to_spots(map_points(cells.xy, element_affine(sdata, "nuclei", "spots")), geometry)
    per_spot = np.bincount(expected[expected >= 0], minlength=len(geometry))
    assert (per_spot > 0).sum() > 5

    # training: make_tiles records the nuclei of every spot
    tiles = ghist.pp.make_tiles(
        sdata, table_key="spot_counts", spots_key="spots", tile_size=64, path=tmp_path / "t.zarr", progress=False
    )
    np.testing.assert_array_equal(zarr.open_group(tiles.path, mode="r")["samples/0/spot_n_cells"][:], per_spot)

    # prediction: the table's centroids are the labels' own, and aggregation and evaluation place cells by them
    torch.manual_seed(0)
    model = ghist.GHISTModel(list(sdata.tables["table"].var_names), None, width=4, embed_dim=8, tile_size=64)
    table = ghist.tl.predict(sdata, model, progress=False)
    assert table.obs["cell_id"].tolist() == cells.ids.tolist()
    np.testing.assert_allclose(table.obsm["spatial"], cells.xy)
    pseudo = ghist.tl.aggregate_to_spots(sdata, spots_key="spots")
    np.testing.assert_array_equal(pseudo.obs["n_cells"].to_numpy(), per_spot)
    _, cell_row = ghist.tl._spots.pseudo_spots(sdata, pred_key="ghist", spots_key="spots", spots_table_key=None)
    np.testing.assert_array_equal(cell_row, expected)
