"""make_tiles(pixel_size=): tiles cut on another pixel grid, made as predict reads slides for such a model."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.transformations import Identity, set_transformation

import ghist
from ghist._model._data import SlideTileDataset


@pytest.fixture(scope="module")
def sdata():
    return ghist.datasets.synthetic(image_size=256, n_genes=8, seed=0)  # 0.5 µm/px


def test_tiles_are_block_means_of_the_image_and_keep_cell_ids(sdata, tmp_path):
    tiles = ghist.pp.make_tiles(
        sdata, cell_type_key="cell_type", tile_size=32, pixel_size=1.0, path=tmp_path / "t.zarr", progress=False
    )
    assert tiles.pixel_size == pytest.approx(1.0)
    image = np.asarray(sdata.images["he"]).astype(np.float64)
    labels = np.asarray(sdata.labels["nuclei"])
    for t in range(len(tiles)):
        item = tiles.read(t, standardise=False)
        y0, x0 = int(tiles.tile_table()["y0"][t]), int(tiles.tile_table()["x0"][t])
        full = image[:, 2 * y0 : 2 * y0 + 64, 2 * x0 : 2 * x0 + 64]
        expected = np.round(full.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4)))
        np.testing.assert_array_equal(item["image"], expected)
        # labels: the nucleus under each coarse pixel's centre (full-res pixel (2i + 1, 2j + 1))
        ids = labels[2 * y0 + 1 : 2 * y0 + 64 : 2, 2 * x0 + 1 : 2 * x0 + 64 : 2]
        restored = np.where(item["labels"] > 0, item["cell_id"][np.maximum(item["labels"], 1) - 1], 0)
        keep = item["labels"] >= 0
        np.testing.assert_array_equal(restored[keep], ids[keep])


def test_a_size_near_a_whole_factor_is_cut_in_whole_blocks(sdata, tmp_path):
    # 1.02 µm/px from a 0.5 µm/px image: a factor of 2.04, within the 5% "same pixel size" of 2, is cut as exact 2x2
    # block means (as pyramid levels and hand downsampling), not as 2.04-pixel areas whose phase drifts.
    from ghist._spatial import working_scale

    assert working_scale(0.688, 2.75) == 0.25
    assert working_scale(0.5, 1.02) == 0.5
    assert working_scale(0.5, 0.51) == 1.0  # the image's own grid
    assert working_scale(0.5, 1.25) == pytest.approx(0.4)  # 2.5: no whole factor near
    kwargs = {"cell_type_key": "cell_type", "tile_size": 32, "progress": False}
    exact = ghist.pp.make_tiles(sdata, pixel_size=1.0, path=tmp_path / "a.zarr", **kwargs)
    near = ghist.pp.make_tiles(sdata, pixel_size=1.02, path=tmp_path / "b.zarr", **kwargs)
    assert len(near) == len(exact)
    for t in range(len(exact)):
        a, b = exact.read(t, standardise=False), near.read(t, standardise=False)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_training_and_prediction_tiles_agree(sdata, tmp_path):
    tiles = ghist.pp.make_tiles(
        sdata, tile_size=32, pixel_size=1.25, fold=None, path=tmp_path / "t.zarr", progress=False
    )
    table = tiles.tile_table()
    from ghist._validation import raster_levels

    scale = 0.5 / 1.25
    ds = SlideTileDataset(
        sdata.images["he"],
        sdata.labels["nuclei"],
        table[["y0", "x0"]].to_numpy(),
        scale=scale,
        to_labels=np.diag([1 / scale, 1 / scale, 1.0]),
        tile_size=32,
        mean=[0, 0, 0],
        std=[1, 1, 1],
        levels=raster_levels(sdata.images["he"]),
    )
    inner = np.flatnonzero((table["y0"] + 32 <= 102) & (table["x0"] + 32 <= 102))  # the grid is 102 px wide
    assert inner.size >= 9
    for t in inner:
        np.testing.assert_array_equal(tiles.read(t, standardise=False)["image"], ds.read(t)["image"])
        np.testing.assert_array_equal(tiles.read(t)["cell_id"], ds.read(t)["cell_id"])


def test_pixel_size_needs_microns_and_a_positive_number(sdata, tmp_path):
    with pytest.raises(ValueError, match="pixel_size"):
        ghist.pp.make_tiles(sdata, pixel_size=0, path=tmp_path / "a.zarr")
    bare = sd.SpatialData(
        images={"he": sdata.images["he"]}, labels={"nuclei": sdata.labels["nuclei"]}, tables={"table": sdata["table"]}
    )
    for element in (bare.images["he"], bare.labels["nuclei"]):
        set_transformation(element, {"global": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="no 'microns' coordinate system"):
        ghist.pp.make_tiles(bare, pixel_size=1.0, path=tmp_path / "b.zarr")
