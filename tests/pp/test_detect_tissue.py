from __future__ import annotations

import re

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale

import ghist


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    return np.asarray(ghist.datasets.synthetic(image_size=384, n_genes=8, seed=0).images["he"])


def _slide(he: np.ndarray, *, multiscale: bool = True, pixel_size: float | None = 0.5) -> sd.SpatialData:
    """The tissue in the top-left of a glass slide about 3x its area (70% background), with a second piece."""
    canvas = np.full((3, 768, 640), 244, np.uint8)
    canvas[:, 32:416, 48:432] = he
    canvas[:, 560:680, 460:600] = he[:, :120, :140]
    transformations = {"global": Identity()}
    if pixel_size is not None:
        transformations["microns"] = Scale([pixel_size, pixel_size], axes=("y", "x"))
    image = Image2DModel.parse(
        canvas, dims=("c", "y", "x"), transformations=transformations, scale_factors=[2, 2] if multiscale else None
    )
    return sd.SpatialData(images={"he": image})


def test_tissue_polygons_cover_the_tissue(he):
    sdata = _slide(he)
    shapes = ghist.pp.detect_tissue(sdata, resolution=4.0, min_area_um2=500.0)
    assert sdata.shapes["tissue"] is shapes
    assert len(shapes) == 2
    big, small = shapes.geometry.iloc[np.argsort(-shapes.geometry.area.to_numpy())]
    assert big.area == pytest.approx(384 * 384, rel=0.05)
    assert small.area == pytest.approx(120 * 140, rel=0.1)
    x0, y0, x1, y1 = big.bounds
    np.testing.assert_allclose([x0, y0, x1, y1], [48, 32, 432, 416], atol=8)
    np.testing.assert_allclose(shapes["area_um2"].sum(), shapes.geometry.area.sum() * 0.25)
    # the polygons live in the image's coordinate systems
    assert set(sd.transformations.get_transformation(shapes, get_all=True)) == {"global", "microns"}


def test_small_pieces_are_dropped_and_single_scale_works(he):
    sdata = _slide(he, multiscale=False)
    shapes = ghist.pp.detect_tissue(sdata, resolution=4.0, min_area_um2=0.25 * 130 * 150)
    assert len(shapes) == 1


def test_without_microns_arguments_are_pixels(he):
    sdata = _slide(he, pixel_size=None)
    shapes = ghist.pp.detect_tissue(sdata, min_area_um2=20_000.0)
    assert "area_px" in shapes.columns
    assert len(shapes) == 1  # the 120 x 140 px piece is below 20,000 px


def test_blank_slide_gives_no_tissue(caplog):
    image = Image2DModel.parse(np.full((3, 256, 256), 245, np.uint8), dims=("c", "y", "x"))
    sdata = sd.SpatialData(images={"he": image})
    with caplog.at_level("WARNING", logger="ghist"):
        shapes = ghist.pp.detect_tissue(sdata, threshold=0.05)
    assert len(shapes) == 0
    assert "No tissue" in caplog.text
    assert "tissue" not in sdata.shapes


def test_bad_inputs(he):
    sdata = _slide(he)
    with pytest.raises(KeyError, match="nope"):
        ghist.pp.detect_tissue(sdata, image_key="nope")
    for bad in ({"resolution": 0}, {"resolution": float("nan")}, {"min_area_um2": -1}, {"threshold": "mean"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ghist.pp.detect_tissue(sdata, **bad)
    ghist.pp.detect_tissue(sdata)
    with pytest.raises(ValueError, match="already exists"):
        ghist.pp.detect_tissue(sdata)
    ghist.pp.detect_tissue(sdata, overwrite=True)


def test_segmentation_skips_blocks_outside_the_tissue(he, caplog):
    sdata = _slide(he, multiscale=False)
    ghist.pp.detect_tissue(sdata, resolution=4.0, min_area_um2=500.0)
    ghist.pp.segment_nuclei(sdata, key_added="all", chunk_size=128, progress=False)
    with caplog.at_level("INFO", logger="ghist"):
        ghist.pp.segment_nuclei(sdata, key_added="in_tissue", roi_key="tissue", chunk_size=128, progress=False)
    n_read, n_all = (int(v) for v in re.search(r"Segmenting (\d+) of (\d+) blocks", caplog.text).groups())
    assert n_all == 30  # 768 x 640 px in 128-px blocks
    assert n_read < 0.75 * n_all
    everywhere, in_tissue = np.asarray(sdata.labels["all"]), np.asarray(sdata.labels["in_tissue"])
    # the glass has no nuclei anyway: the same nuclei, found from fewer blocks
    assert np.unique(in_tissue).size > 50
    assert np.unique(in_tissue).size == pytest.approx(np.unique(everywhere).size, rel=0.05)
    assert not in_tissue[700:, :400].any()  # a glass-only corner was never segmented
    with pytest.raises(KeyError, match="nope"):
        ghist.pp.segment_nuclei(sdata, key_added="x", roi_key="nope", progress=False)
