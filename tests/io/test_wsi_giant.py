"""Giant single-level slides: tissue detection in bounded time, segmentation refused with the way out."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import tifffile

import ghist


def _write_giant(path, side: int, tile: int = 4096) -> None:
    """A ``side`` x ``side`` RGB TIFF of one level whose tiles are all empty (byte count 0): a few hundred KB."""
    n_tiles = math.ceil(side / tile) ** 2
    tifffile.imwrite(
        path,
        (b"" for _ in range(n_tiles)),
        shape=(side, side, 3),
        dtype="uint8",
        photometric="rgb",
        tile=(tile, tile),
        compression="zlib",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )


@pytest.fixture(scope="module")
def giant(tmp_path_factory):
    path = tmp_path_factory.mktemp("giant") / "giant.tif"
    _write_giant(path, 500_000)
    assert path.stat().st_size < 1_000_000
    return ghist.io.read_wsi(path, chunk_size=8192)


def test_detect_tissue_on_a_giant_single_level_slide_is_bounded(giant, caplog, monkeypatch):
    from ghist.io import _backends

    reads = []
    original = _backends._GuardedLevel.__getitem__

    def counted(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(_backends._GuardedLevel, "__getitem__", counted)
    with caplog.at_level("WARNING", logger="ghist"):
        tissue = ghist.pp.detect_tissue(giant)
    # work bounded by count, not by the clock: a few strided reads (each decodes at most one 4096-px tile), where
    # averaging the level read all 3,721 chunks of 8192 px (750 GB)
    assert 0 < len(reads) <= 64
    assert tissue.empty  # the tiles are black: no stain
    assert "no pyramid level" in caplog.text
    assert "--pyramid" in caplog.text


def test_segment_nuclei_refuses_a_giant_image_with_the_way_out(giant):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"(?s)250 Gpx.*no pyramid level.*--pyramid.*roi_key='tissue'"):
        ghist.pp.segment_nuclei(giant, progress=False)
    assert time.perf_counter() - start < 30
    assert "nuclei" not in giant.labels


def test_detect_tissue_at_extreme_resolutions_names_the_problem(tmp_path):
    image = np.full((256, 256, 3), 240, np.uint8)
    image[64:192, 64:192] = (150, 60, 160)
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    sdata = ghist.io.read_wsi(path)
    with pytest.raises(ValueError, match=r"finer than image 'he' itself \(0\.5 µm/px\)"):
        ghist.pp.detect_tissue(sdata, resolution=0.1)
    tiny = tmp_path / "tiny.tif"  # 16 µm across: under one working pixel at 20 µm/px
    tifffile.imwrite(tiny, image[::8, ::8], photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(ValueError, match=r"under 4 working pixels across.*finer `resolution`"):
        ghist.pp.detect_tissue(ghist.io.read_wsi(tiny), resolution=20.0)
    tissue = ghist.pp.detect_tissue(sdata, resolution=4.0, min_area_um2=100.0, closing_um=0)
    assert len(tissue) == 1
    assert tissue.geometry.iloc[0].area == pytest.approx(128 * 128, rel=0.1)


def test_strided_tissue_mask_matches_the_averaged_one(tmp_path, monkeypatch):
    from ghist.pp import _detect_tissue

    image = np.full((1024, 1024, 3), 240, np.uint8)
    image[256:768, 128:640] = (150, 60, 160)  # a 256 x 256 µm square of stain
    path = tmp_path / "single_level.tif"
    res = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, image, photometric="rgb", tile=(64, 64), **res)
    averaged = ghist.pp.detect_tissue(ghist.io.read_wsi(path), closing_um=0, min_area_um2=100.0)
    monkeypatch.setattr(_detect_tissue, "_MAX_DENSE_PX", 1000)  # as if the level were giant
    monkeypatch.setattr(_detect_tissue, "_READ_BUDGET_PX", 64 * 64 * 32 * 32)  # 1024 tiles decoded at most
    sdata = ghist.io.read_wsi(path)
    strided = ghist.pp.detect_tissue(sdata, closing_um=0, min_area_um2=100.0)
    assert len(strided) == len(averaged) == 1
    assert strided.geometry.iloc[0].area == pytest.approx(512 * 512, rel=0.15)
    assert strided.geometry.iloc[0].symmetric_difference(averaged.geometry.iloc[0]).area < 0.15 * 512 * 512
