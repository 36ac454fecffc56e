"""read_wsi's backends: OpenSlide and tiffslide give the same levels, pixels and pixel size; the choice by file type."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import ghist
from ghist._spatial import image_pixel_size
from ghist.io import _backends

needs_openslide = pytest.mark.skipif(not _backends.openslide_available(), reason="needs ghist[openslide]")


def _write_generic_pyramid(path, image: np.ndarray, mpp: float, n_levels: int = 3) -> None:
    """A generic tiled TIFF with its levels in successive directories: the layout OpenSlide's generic-tiff reads."""
    with tifffile.TiffWriter(path) as tif:
        for i in range(n_levels):
            f = 2**i
            tif.write(
                image[::f, ::f],
                tile=(64, 64),
                photometric="rgb",
                compression="zlib",
                resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8)


@needs_openslide
def test_openslide_reads_the_same_slide_as_tiffslide(tmp_path, image):
    import openslide

    path = tmp_path / "generic.tif"
    _write_generic_pyramid(path, image, mpp=0.5)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"  # OpenSlide's own driver reads it
    by_tiffslide = ghist.io.read_wsi(path, backend="tiffslide", chunk_size=128)
    by_openslide = ghist.io.read_wsi(path, backend="openslide", chunk_size=128)
    assert by_openslide.attrs["ghist_wsi"]["backend"] == "openslide"
    assert by_tiffslide.attrs["ghist_wsi"]["backend"] == "tiffslide"
    for key in ("pixel_size_yx", "level_shapes", "level_downsamples"):
        assert by_openslide.attrs["ghist_wsi"][key] == by_tiffslide.attrs["ghist_wsi"][key]
    assert image_pixel_size(by_openslide, "he") == pytest.approx(0.5)
    a, b = by_tiffslide.images["he"], by_openslide.images["he"]
    assert sorted(a.children) == sorted(b.children) == ["scale0", "scale1", "scale2"]
    for scale in a.children:
        np.testing.assert_array_equal(np.asarray(b[scale]["image"]), np.asarray(a[scale]["image"]))
    np.testing.assert_array_equal(np.asarray(b["scale0"]["image"]), image.transpose(2, 0, 1))
    # strided windows (tissue detection of single-level slides) and odd windows read the same
    np.testing.assert_array_equal(
        b["scale0"]["image"].data[:, 7:250:37, 3:200:29].compute(), a["scale0"]["image"].data[:, 7:250:37, 3:200:29]
    )
    # the same rules apply whichever backend read the file: an implausible size is refused by both
    bad = tmp_path / "dpi.tif"
    tifffile.imwrite(bad, image, tile=(64, 64), photometric="rgb", resolution=(300, 300), resolutionunit="INCH")
    for backend in ("tiffslide", "openslide"):
        with pytest.raises(ValueError, match="not a microscope pixel size"):
            ghist.io.read_wsi(bad, backend=backend)


@needs_openslide
def test_openslide_levels_pickle_by_path(tmp_path, image):
    import pickle

    path = tmp_path / "generic.tif"
    _write_generic_pyramid(path, image, mpp=0.25, n_levels=2)
    level = _backends.open_slide(path, "openslide").levels[1]
    copy = pickle.loads(pickle.dumps(level))
    np.testing.assert_array_equal(copy[10:20, 5:9], image[::2, ::2][10:20, 5:9])


def test_auto_backend_by_file_type(tmp_path, monkeypatch):
    assert _backends.choose_backend(tmp_path / "a.svs", "auto") == "tiffslide"
    assert _backends.choose_backend(tmp_path / "a.ome.tiff", "auto") == "tiffslide"
    monkeypatch.setattr(_backends, "openslide_available", lambda: True)
    for suffix in (".mrxs", ".vms", ".vmu", ".scn", ".bif", ".MRXS"):
        assert _backends.choose_backend(tmp_path / f"a{suffix}", "auto") == "openslide"
    assert _backends.choose_backend(tmp_path / "a.ndpi", "auto") == "tiffslide"
    monkeypatch.setattr(_backends, "openslide_available", lambda: False)
    assert _backends.choose_backend(tmp_path / "a.scn", "auto") == "tiffslide"  # tiffslide reads Leica SCN too


def test_missing_openslide_is_named_with_its_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(_backends, "openslide_available", lambda: False)
    slide = tmp_path / "case.mrxs"
    slide.write_bytes(b"[GENERAL]\n")
    with pytest.raises(ImportError, match=r"MIRAX.*ghist\[openslide\]"):
        ghist.io.read_wsi(slide)
    tif = tmp_path / "plain.tif"
    tifffile.imwrite(tif, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(ImportError, match=r"backend='openslide'.*ghist\[openslide\]"):
        ghist.io.read_wsi(tif, backend="openslide", pixel_size=0.5)


def test_bioformats_formats_say_how_to_convert(tmp_path):
    czi = tmp_path / "scan.czi"
    czi.write_bytes(b"ZISRAWFILE")
    with pytest.raises(ValueError, match=r"Zeiss CZI.*Bio-Formats.*bfconvert"):
        ghist.io.read_wsi(czi)
    tif = tmp_path / "plain.tif"
    tifffile.imwrite(tif, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match=r"backend='bioformats'.*OME-TIFF"):
        ghist.io.read_wsi(tif, backend="bioformats", pixel_size=0.5)
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        ghist.io.read_wsi(tif, backend="cucim", pixel_size=0.5)
