"""Slide tiles at the model's pixel size: the nearest pyramid level that is not coarser, area-averaged."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from ghist._model._data import SlideTileDataset
from ghist._spatial import _area_resample


def _array(values: np.ndarray) -> xr.DataArray:
    return xr.DataArray(da.from_array(values, chunks=(3, 64, 64)), dims=("c", "y", "x"))


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 256, 256)).astype(np.uint8)


def _dataset(levels, scale: float, size: int = 32) -> SlideTileDataset:
    labels = xr.DataArray(np.ones((256, 256), dtype=np.int32), dims=("y", "x"))
    return SlideTileDataset(
        levels[0][2],
        labels,
        np.array([[0, 0], [8, 16]]),
        scale=scale,
        to_labels=np.diag([1 / scale, 1 / scale, 1.0]),
        tile_size=size,
        mean=[0, 0, 0],
        std=[1, 1, 1],
        levels=levels,
    )


def test_area_mean_equals_block_mean_for_integer_factors(image):
    tile = _area_resample(_array(image), 4, 2, 32, 32, 0.25, 0.25)
    block = image.reshape(3, 64, 4, 64, 4).mean(axis=(2, 4))[:, 4:36, 2:34]
    np.testing.assert_array_equal(tile, np.round(block).astype(np.uint8))


def test_area_mean_is_white_outside_the_image(image):
    tile = _area_resample(_array(image), 48, 48, 32, 32, 0.25, 0.25)  # covers image rows 192..320: half glass
    assert (tile[:, 16:, :] == 255).all()
    assert (tile[:, :16, :16] != 255).any()
    half = _area_resample(_array(image), 0, 0, 8, 8, 0.25, 0.25)
    np.testing.assert_array_equal(half, np.round(image[:, :32, :32].reshape(3, 8, 4, 8, 4).mean(axis=(2, 4))))


def test_non_integer_factors_keep_the_mean_and_do_not_alias(image):
    stripes = np.zeros((3, 256, 256), np.uint8)
    stripes[:, :, ::2] = 255  # the highest frequency there is
    tile = _area_resample(_array(stripes), 0, 0, 64, 64, 1 / 2.75, 1 / 2.75).astype(float)
    assert tile.mean() == pytest.approx(127.5, abs=3)
    assert tile.std() < 30  # point sampling would give stripes of 0 and 255 (aliasing)


def test_the_nearest_level_that_is_not_coarser_is_read(image):
    level1 = np.round(image.reshape(3, 128, 2, 128, 2).mean(axis=(2, 4))).astype(np.uint8)
    marker = np.full((3, 64, 64), 7, np.uint8)  # level 2 holds something else: it must not be read at scale 1/2
    levels = [(1.0, 1.0, _array(image)), (2.0, 2.0, _array(level1)), (4.0, 4.0, _array(marker))]
    tile = _dataset(levels, 0.5).read(1)["image"]
    np.testing.assert_array_equal(tile, level1[:, 8:40, 16:48].astype(np.float32))
    # a working grid between levels 1 and 2 reads level 1 and averages the rest
    coarse = _dataset(levels, 1 / 3).read(0)["image"]
    expected = _area_resample(_array(level1), 0, 0, 32, 32, 2 / 3, 2 / 3)
    np.testing.assert_array_equal(coarse, expected.astype(np.float32))
    # level 2 is read when the grid is exactly as coarse
    np.testing.assert_array_equal(_dataset(levels, 0.25, size=16).read(0)["image"], marker[:, :16, :16])
