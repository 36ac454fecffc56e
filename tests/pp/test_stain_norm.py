"""Stain normalisation of the learned segmenter (`ghist.pp._stain_norm`): statistics, the colour map, images."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from spatialdata.models import Image2DModel

import ghist
from ghist.pp._stain_norm import SAMPLE_PIXELS, StainMap, StainStatistics, image_stain_statistics, match_stain

HAEMATOXYLIN = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def he_rgb(seed: int = 0, side: int = 256) -> np.ndarray:
    """A synthetic H&E image, ``(y, x, 3)`` uint8."""
    sdata = ghist.datasets.synthetic(image_size=side, n_genes=4, seed=seed)
    return np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)


def two_stain_image(nuclear_share: float, seed: int = 0, n: int = 200_000) -> np.ndarray:
    """``(n, 1, 3)`` pixels made of known stains: nuclei (much haematoxylin) in ``nuclear_share``, stroma, glass."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[nuclear_share, 0.9 - nuclear_share, 0.1])  # nucleus, stroma, glass
    h = np.where(kind == 0, rng.uniform(0.8, 1.5, n), rng.uniform(0.2, 0.35, n))  # stroma holds a little too
    e = np.where(kind == 1, rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.2, n))
    od = np.where(kind[:, None] == 2, 0.02, h[:, None] * HAEMATOXYLIN + e[:, None] * EOSIN)
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)[:, None]


def cosines(a: StainStatistics, b: StainStatistics) -> np.ndarray:
    return (np.array(a.stains) * np.array(b.stains)).sum(axis=1)


def test_statistics_find_the_stains_whatever_the_share_of_nuclei():
    sparse, dense = StainStatistics.of(two_stain_image(0.05)), StainStatistics.of(two_stain_image(0.4, seed=1))
    for stats in (sparse, dense):
        assert np.array(stats.stains[0]) @ HAEMATOXYLIN > 0.995
        assert np.array(stats.stains[1]) @ EOSIN > 0.99  # the palest stroma (red OD < 0.15) is not counted
    # the strongest haematoxylin is that of the darkest nuclei in both, not a mean that moves with their number
    np.testing.assert_allclose(sparse.max_concentration, dense.max_concentration, rtol=0.1)
    assert 1.35 < sparse.max_concentration[0] < 1.55


def test_statistics_leave_out_glass():
    tissue = he_rgb()
    on_glass = np.concatenate([tissue, np.full_like(tissue, 250)], axis=1)
    assert StainStatistics.of(tissue) == StainStatistics.of(on_glass)
    assert StainStatistics.of(np.full_like(tissue, 250)).n_pixels == 0


def test_pooled_statistics_weigh_each_image_by_its_tissue():
    x, y = StainStatistics.of(he_rgb(0)), StainStatistics.of(two_stain_image(0.2))
    np.testing.assert_allclose(StainStatistics.pooled([x, x]).stains, x.stains)
    pooled = StainStatistics.pooled([x, y, StainStatistics.of(np.full((4, 4, 3), 250, np.uint8))])
    assert pooled.n_pixels == x.n_pixels + y.n_pixels
    w = x.n_pixels / pooled.n_pixels
    expected = w * np.array(x.max_concentration) + (1 - w) * np.array(y.max_concentration)
    np.testing.assert_allclose(pooled.max_concentration, expected)
    np.testing.assert_allclose(np.linalg.norm(pooled.stains, axis=1), 1)
    assert min(cosines(pooled, x).min(), cosines(pooled, y).min()) >= min(cosines(x, y)) - 1e-9


def test_the_map_gives_an_image_the_target_stains():
    rgb = two_stain_image(0.2)
    source = StainStatistics.of(rgb)
    # a bluer haematoxylin and a darker stain, as a slide from another lab
    bluer = np.array(source.stains[0]) + np.array([0.15, -0.1, 0.0])
    target = StainStatistics(
        (tuple(bluer / np.linalg.norm(bluer)), source.stains[1]),
        (1.3 * source.max_concentration[0], 1.1 * source.max_concentration[1]),
        1,
    )
    mapped = match_stain(rgb, source, target)
    assert mapped.shape == rgb.shape
    assert mapped.dtype == np.uint8
    got = StainStatistics.of(mapped)
    assert cosines(got, target).min() > 0.995
    np.testing.assert_allclose(got.max_concentration, target.max_concentration, rtol=0.05)
    # and back: the round trip returns the image within the table's resolution (colours clipped aside)
    back = StainMap(target, source)(mapped)
    assert np.abs(back.astype(int) - rgb).mean() < 3


def test_statistics_from_json_name_what_is_wrong():
    stats = StainStatistics.of(he_rgb())
    assert StainStatistics.from_json(stats.to_json()) == stats
    with pytest.raises(ValueError, match="max_concentration"):
        StainStatistics.from_json({"lab_mean": [1, 2, 3], "lab_std": [1, 1, 1], "n_pixels": 3})
    with pytest.raises(ValueError, match="unit stain vectors"):
        StainStatistics.from_json({"stains": [[1, 1, 1], [0, 1, 0]], "max_concentration": [1, 1], "n_pixels": 3})


def test_a_large_image_is_measured_from_windows_like_the_whole():
    tile = he_rgb(side=512)
    big = np.tile(tile, (5, 5, 1))  # 2560^2 = 6.5 Mpx > SAMPLE_PIXELS
    assert big.shape[0] * big.shape[1] > SAMPLE_PIXELS
    image = Image2DModel.parse(da.from_array(np.moveaxis(big, -1, 0), chunks=(3, 1024, 1024)), dims=("c", "y", "x"))
    sampled = image_stain_statistics(image, 0.5, 0.5)
    whole = StainStatistics.of(big)
    assert cosines(sampled, whole).min() > 0.999
    np.testing.assert_allclose(sampled.max_concentration, whole.max_concentration, rtol=0.05)
    assert sampled.n_pixels < whole.n_pixels  # windows, not the whole image


def test_statistics_are_read_at_the_level_nearest_the_working_size():
    rgb = he_rgb(side=512)
    pyramid = Image2DModel.parse(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), scale_factors=[2, 2])
    fine = image_stain_statistics(pyramid, 0.25, 0.25)
    coarse = image_stain_statistics(pyramid, 0.25, 1.0)  # the level of 1 µm/px: 4 times fewer pixels per side
    assert fine.n_pixels > 10 * coarse.n_pixels
