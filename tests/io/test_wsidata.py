"""A LazySlide / wsidata ``WSIData`` (a SpatialData subclass) through detect_tissue, segment_nuclei and predict."""

from __future__ import annotations

import numpy as np
import pytest

import ghist
from ghist._spatial import image_pixel_size

from .test_wsi import _write_pyramid

wsidata = pytest.importorskip("wsidata")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    he = np.asarray(ghist.datasets.synthetic(image_size=192, n_genes=8, seed=0).images["he"]).transpose(1, 2, 0)
    canvas = np.full((224, 224, 3), 243, np.uint8)
    canvas[16:208, 16:208] = he
    path = tmp_path_factory.mktemp("wsidata") / "slide.tif"
    _write_pyramid(path, canvas, mpp=0.5, n_levels=2)
    return path


@pytest.mark.slow  # about 5 s: segmentation and prediction of a small slide
def test_wsidata_goes_through_ghist_and_gets_the_table(slide):
    wsi = wsidata.open_wsi(slide, store=None, reader="tiffslide", attach_images=True, image_key="he")
    # the slide's pixel size comes from the WSIData's properties (its image has no "microns" transformation)
    assert image_pixel_size(wsi, "he") == pytest.approx(0.5)
    tissue = ghist.pp.detect_tissue(wsi, key_added="ghist_tissue", min_area_um2=1000.0)
    assert "area_um2" in tissue.columns  # worked in µm, not pixels
    labels = ghist.pp.segment_nuclei(wsi, roi_key="ghist_tissue", progress=False, num_workers=1)
    assert labels is wsi.labels["nuclei"]
    n_nuclei = int(np.unique(np.asarray(labels)).size - 1)
    assert n_nuclei > 20
    genes = [f"G{i}" for i in range(5)]
    model = ghist.GHISTModel(genes, ["A", "B"], width=4, embed_dim=8, tile_size=64, pixel_size=0.5)
    table = ghist.tl.predict(wsi, model, progress=False, roi_key="ghist_tissue")
    assert isinstance(wsi, wsidata.WSIData)  # the user's object, with ghist's elements in it
    assert wsi.tables["ghist"] is table
    assert 0.8 * n_nuclei <= table.n_obs <= n_nuclei


def test_thumbnail_has_no_slide_pixel_size(slide):
    wsi = wsidata.open_wsi(slide, store=None, reader="tiffslide", attach_thumbnail=True, thumbnail_size=64)
    assert image_pixel_size(wsi, "wsi_thumbnail") is None  # mpp is the full-resolution image's, not a thumbnail's
