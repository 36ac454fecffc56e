"""Stain normalisation of the learned segmenter (`ghist.pp._stain_norm`): statistics, the colour map, images."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from spatialdata.models import Image2DModel

import ghist
from ghist.pp._stain_norm import SAMPLE_PIXELS, StainMap, StainStatistics, image_stain_statistics, match_stain


def he_rgb(seed: int = 0, side: int = 256) -> np.ndarray:
    """A synthetic H&E image, ``(y, x, 3)`` uint8."""
    sdata = ghist.datasets.synthetic(image_size=side, n_genes=4, seed=seed)
    return np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)


def test_statistics_leave_out_glass():
    tissue = he_rgb()
    on_glass = np.concatenate([tissue, np.full_like(tissue, 250)], axis=1)
    a, b = StainStatistics.of(tissue), StainStatistics.of(on_glass)
    np.testing.assert_allclose(a.mean, b.mean, atol=0.3)
    np.testing.assert_allclose(a.std, b.std, atol=0.3)


def test_pooled_statistics_are_those_of_all_pixels_together():
    x, y = he_rgb(0), he_rgb(1)[:, :128]
    together = StainStatistics.of(np.concatenate([x.reshape(-1, 3), y.reshape(-1, 3)])[:, None])
    pooled = StainStatistics.pooled([StainStatistics.of(x), StainStatistics.of(y)])
    np.testing.assert_allclose(pooled.mean, together.mean, atol=1e-6)
    np.testing.assert_allclose(pooled.std, together.std, atol=1e-6)
    assert pooled.n_pixels == together.n_pixels


def test_the_map_gives_an_image_the_target_statistics():
    rgb = he_rgb()
    source = StainStatistics.of(rgb)
    # a darker, bluer stain, as a slide from another lab
    target = StainStatistics(
        (source.mean[0] - 8, source.mean[1] - 4, source.mean[2] - 5), tuple(s * 1.15 for s in source.std), 1
    )
    mapped = match_stain(rgb, source, target)
    assert mapped.shape == rgb.shape
    assert mapped.dtype == np.uint8
    got = StainStatistics.of(mapped)
    np.testing.assert_allclose(got.mean, target.mean, atol=1.5)
    np.testing.assert_allclose(got.std, target.std, rtol=0.1)
    # and back: the round trip returns the image within the table's resolution
    back = StainMap(got, source)(mapped)
    assert np.abs(back.astype(int) - rgb).mean() < 3


def test_statistics_from_json_name_what_is_wrong():
    stats = StainStatistics.of(he_rgb())
    assert StainStatistics.from_json(stats.to_json()) == stats
    with pytest.raises(ValueError, match="lab_mean"):
        StainStatistics.from_json({"mean": [1, 2, 3]})
    with pytest.raises(ValueError, match="3 finite means"):
        StainStatistics.from_json({"lab_mean": [1, 2], "lab_std": [1, 1, 1], "n_pixels": 3})


def test_a_large_image_is_measured_from_windows_like_the_whole():
    tile = he_rgb(side=512)
    big = np.tile(tile, (5, 5, 1))  # 2560^2 = 6.5 Mpx > SAMPLE_PIXELS
    assert big.shape[0] * big.shape[1] > SAMPLE_PIXELS
    image = Image2DModel.parse(da.from_array(np.moveaxis(big, -1, 0), chunks=(3, 1024, 1024)), dims=("c", "y", "x"))
    sampled = image_stain_statistics(image, 0.5, 0.5)
    whole = StainStatistics.of(big)
    np.testing.assert_allclose(sampled.mean, whole.mean, atol=1.0)
    np.testing.assert_allclose(sampled.std, whole.std, rtol=0.05)
    assert sampled.n_pixels < whole.n_pixels  # windows, not the whole image


def test_statistics_are_read_at_the_level_nearest_the_working_size():
    rgb = he_rgb(side=512)
    pyramid = Image2DModel.parse(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), scale_factors=[2, 2])
    fine = image_stain_statistics(pyramid, 0.25, 0.25)
    coarse = image_stain_statistics(pyramid, 0.25, 1.0)  # the level of 1 µm/px: 4 times fewer pixels per side
    assert fine.n_pixels > 10 * coarse.n_pixels
