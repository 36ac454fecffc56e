"""Pixel sizes of slide files: the plausible range, resolution tags in inch/cm, `pixel_size=` over any metadata."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile

import ghist
from ghist._spatial import PIXEL_SIZE_RANGE_UM, check_pixel_size, image_pixel_size, is_plausible_pixel_size


@pytest.mark.parametrize("value", [0.05, 0.25, 0.5, 8.0, 20.0])
def test_plausible_pixel_sizes_pass(value):
    assert check_pixel_size(value) == value
    assert is_plausible_pixel_size(value)


@pytest.mark.parametrize("value", [1e-6, 0.049, 20.1, 84.667, 352.78, 1e30, math.nan, math.inf, -0.5, 0, True, "0.5"])
def test_implausible_pixel_sizes_are_refused_with_the_range(value):
    assert not is_plausible_pixel_size(value)
    with pytest.raises(ValueError, match=rf"`pixel_size` must be .*between {PIXEL_SIZE_RANGE_UM[0]} and"):
        check_pixel_size(value)
    assert check_pixel_size(None, optional=True) is None


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (256, 192, 3), dtype=np.uint8)


@pytest.mark.parametrize(("dpi", "wrong"), [(300, 84.67), (72, 352.8)])
def test_print_resolution_tags_are_not_read_as_microns(tmp_path, rgb, caplog, dpi, wrong):
    path = tmp_path / f"photo_{dpi}dpi.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(dpi, dpi), resolutionunit="INCH")
    with caplog.at_level("WARNING", logger="ghist"), pytest.raises(ValueError, match=r"not a microscope pixel size"):
        ghist.io.read_wsi(path)
    assert f"{dpi} per inch" in caplog.text
    assert f"{wrong:.4g}" in caplog.text
    sdata = ghist.io.read_wsi(path, pixel_size=0.5)
    assert image_pixel_size(sdata, "he") == pytest.approx(0.5)
    # a real scanner's tags in inches (40x: 101,600 px per inch) are used
    scan = tmp_path / "scan_inch.tif"
    tifffile.imwrite(scan, rgb, photometric="rgb", resolution=(101_600, 101_600), resolutionunit="INCH")
    assert image_pixel_size(ghist.io.read_wsi(scan), "he") == pytest.approx(0.25)


def test_pixel_size_argument_overrides_unreadable_ome_metadata(tmp_path, rgb):
    path = tmp_path / "bad_ome.ome.tif"
    metadata = {"axes": "YXS", "PhysicalSizeX": "abc", "PhysicalSizeY": "abc"}
    tifffile.imwrite(path, rgb, photometric="rgb", metadata=metadata, ome=True)
    sdata = ghist.io.read_wsi(path, pixel_size=0.5)
    assert image_pixel_size(sdata, "he") == pytest.approx(0.5)
    assert sdata.attrs["ghist_wsi"]["pixel_size_source"] == "argument"
    with pytest.raises(ValueError, match=r"holds no pixel size.*pixel_size="):
        ghist.io.read_wsi(path)


@pytest.mark.parametrize("value", [1e-6, 1e30, 84.67])
def test_implausible_pixel_size_argument_is_refused_before_reading(tmp_path, value):
    path = tmp_path / "never_opened.tif"
    path.write_bytes(b"not a tiff")  # the argument is refused first, whatever the file holds
    with pytest.raises(ValueError, match=r"`pixel_size` must be a microscope pixel size"):
        ghist.io.read_wsi(path, pixel_size=value)


@pytest.mark.parametrize("tiled", [True, False])
def test_planar_configuration_tiff_reads_the_same_pixels(tmp_path, rgb, tiled):
    path = tmp_path / "planar.tif"
    tile = {"tile": (64, 64)} if tiled else {}
    res = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate", **tile, **res)
    sdata = ghist.io.read_wsi(path, chunk_size=64)
    np.testing.assert_array_equal(np.asarray(sdata.images["he"]["scale0"]["image"]), rgb.transpose(2, 0, 1))
    assert image_pixel_size(sdata, "he") == pytest.approx(0.5)


def test_truncated_file_names_file_level_and_tile_when_read(tmp_path, rgb):
    path = tmp_path / "cut.tif"
    res = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(64, 64), compression="zlib", **res)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    sdata = ghist.io.read_wsi(path, chunk_size=128)  # lazy: opening reads only the metadata
    image = sdata.images["he"]["scale0"]["image"]
    with pytest.raises(ghist.io.SlideReadError, match=r"cut\.tif.*level 0.*tile row \d+, column \d+ of 64x64"):
        np.asarray(image)
    # a corrupt tile in the middle of an intact file: the same named error, at the tile that fails
    bad = tmp_path / "garbled.tif"
    tifffile.imwrite(bad, rgb, photometric="rgb", tile=(64, 64), compression="zlib", **res)
    with tifffile.TiffFile(bad) as tif:
        offset = tif.pages[0].dataoffsets[4]  # tile row 1, column 1 of a 3-column grid
    raw = bytearray(bad.read_bytes())
    raw[offset : offset + 16] = b"\xff" * 16
    bad.write_bytes(bytes(raw))
    with pytest.raises(ghist.io.SlideReadError, match=r"garbled\.tif.*level 0.*tile row 1, column 1 of"):
        np.asarray(ghist.io.read_wsi(bad).images["he"]["scale0"]["image"])
