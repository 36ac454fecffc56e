from __future__ import annotations

import numpy as np
import pytest
import tifffile

import ghist
from ghist._spatial import image_pixel_size


def _write_pyramid(path, image: np.ndarray, mpp: float | None, n_levels: int = 3, tile: int = 64) -> None:
    """A pyramidal TIFF as scanners write them: full resolution with its levels in SubIFDs, tiled, with MPP."""
    opts = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    res = {} if mpp is None else {"resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level0 = {"resolution": (1e4 / mpp, 1e4 / mpp)} if mpp else {}
        tif.write(image, subifds=n_levels - 1, **level0, **res, **opts)
        for i in range(1, n_levels):
            f = 2**i
            level = {"resolution": (1e4 / (mpp * f), 1e4 / (mpp * f))} if mpp else {}
            tif.write(image[::f, ::f], subfiletype=1, **level, **res, **opts)


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=8, seed=0)
    return np.asarray(sdata.images["he"]).transpose(1, 2, 0).copy()


def test_pyramidal_tiff_opens_lazily_with_levels_and_microns(tmp_path, he):
    path = tmp_path / "slide.tif"
    _write_pyramid(path, he, mpp=0.5)
    sdata = ghist.io.read_wsi(path)
    image = sdata.images["he"]
    shapes = [tuple(image[name]["image"].shape) for name in sorted(image.children)]
    assert shapes == [(3, 256, 256), (3, 128, 128), (3, 64, 64)]
    assert hasattr(image["scale0"]["image"].data, "dask")  # lazy: nothing read yet
    np.testing.assert_array_equal(np.asarray(image["scale0"]["image"]), he.transpose(2, 0, 1))
    np.testing.assert_array_equal(np.asarray(image["scale1"]["image"]), he[::2, ::2].transpose(2, 0, 1))
    assert image_pixel_size(sdata, "he") == pytest.approx(0.5)
    info = sdata.attrs["ghist_wsi"]
    assert info["pixel_size_source"] == "file"
    assert info["level_downsamples"] == [1.0, 2.0, 4.0]


def test_ome_tiff_pixel_size(tmp_path, he):
    path = tmp_path / "slide.ome.tif"
    metadata = {"axes": "YXS", "PhysicalSizeX": 263.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 263.0}
    metadata["PhysicalSizeYUnit"] = "nm"
    tifffile.imwrite(path, he, photometric="rgb", metadata=metadata, ome=True)
    sdata = ghist.io.read_wsi(path)
    assert image_pixel_size(sdata, "he") == pytest.approx(0.263)


def test_pixel_size_needed_when_the_file_has_none(tmp_path, he, caplog):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, he, photometric="rgb")
    with pytest.raises(ValueError, match=r"holds no pixel size.*pixel_size="):
        ghist.io.read_wsi(path)
    sdata = ghist.io.read_wsi(path, pixel_size=0.25, image_key="slide")
    assert image_pixel_size(sdata, "slide") == pytest.approx(0.25)
    assert sdata.attrs["ghist_wsi"]["pixel_size_source"] == "argument"
    # an explicit size that disagrees with the file wins, with a warning
    pyramid = tmp_path / "pyramid.tif"
    _write_pyramid(pyramid, he, mpp=0.5, n_levels=2)
    with caplog.at_level("WARNING", logger="ghist"):
        sdata = ghist.io.read_wsi(pyramid, pixel_size=0.25)
    assert image_pixel_size(sdata, "he") == pytest.approx(0.25)
    assert "instead of the file's" in caplog.text


def test_rgba_keeps_rgb(tmp_path, he):
    path = tmp_path / "rgba.tif"
    rgba = np.concatenate([he, np.full((*he.shape[:2], 1), 255, np.uint8)], axis=-1)
    res = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[2], **res)
    sdata = ghist.io.read_wsi(path)
    np.testing.assert_array_equal(np.asarray(sdata.images["he"]["scale0"]["image"]), he.transpose(2, 0, 1))


def test_bad_files(tmp_path, he):
    with pytest.raises(FileNotFoundError, match=r"no_such\.svs"):
        ghist.io.read_wsi(tmp_path / "no_such.svs")
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.svs.*slide file"):
        ghist.io.read_wsi(garbage)
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, he[..., 0], resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(ValueError, match="greyscale"):
        ghist.io.read_wsi(grey)
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, he.astype(np.uint16) * 257, photometric="rgb", resolution=(2e4, 2e4))
    with pytest.raises(ValueError, match="uint16"):
        ghist.io.read_wsi(deep, pixel_size=0.5)
    with pytest.raises(ValueError, match="pixel_size"):
        ghist.io.read_wsi(deep, pixel_size=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        ghist.io.read_wsi(deep, pixel_size=0.5, chunk_size=0)


def test_slide_runs_through_tissue_segmentation_and_prediction(tmp_path, he):
    """A pyramidal TIFF written by tifffile opens with read_wsi and runs through segment + predict."""
    canvas = np.full((384, 320, 3), 243, np.uint8)  # glass around the tissue
    canvas[64:320, 32:288] = he
    path = tmp_path / "slide.tif"
    _write_pyramid(path, canvas, mpp=0.5)
    sdata = ghist.io.read_wsi(path)
    tissue = ghist.pp.detect_tissue(sdata, min_area_um2=1000.0)
    assert len(tissue) >= 1
    ghist.pp.segment_nuclei(sdata, progress=False)
    n_nuclei = int(np.unique(np.asarray(sdata.labels["nuclei"])).size - 1)
    assert n_nuclei > 20
    genes = [f"G{i}" for i in range(5)]
    model = ghist.GHISTModel(genes, ["A", "B"], width=4, embed_dim=8, tile_size=64, pixel_size=0.5)
    table = ghist.tl.predict(sdata, model, progress=False, roi_key="tissue")
    assert 0.8 * n_nuclei <= table.n_obs <= n_nuclei
    assert list(table.var_names) == genes
