"""HED stain augmentation: each tile's stain concentrations rescaled and shifted, nothing else changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed_from_rgb

from ghist._model._module import augment_batch
from ghist._model._stain import hed_jitter

MEAN, STD = [190.0, 140.0, 180.0], [45.0, 55.0, 40.0]


def _he_tiles(n: int = 4, size: int = 24) -> tuple[np.ndarray, torch.Tensor]:
    """RGB tiles (0-255, no fully dark pixel) with pink stroma and purple nuclei, and their standardised tensor."""
    rng = np.random.default_rng(0)
    rgb = np.empty((n, size, size, 3))
    rgb[:] = np.add([215, 160, 200], rng.normal(0, 8, (n, size, size, 3)))
    rgb[:, 6:14, 6:14] = np.add([110, 60, 150], rng.normal(0, 8, (n, 8, 8, 3)))
    rgb = np.clip(rgb, 5, 230)  # away from 0 and 255, so that a stain's jitter is never clipped
    images = (torch.as_tensor(rgb, dtype=torch.float32).permute(0, 3, 1, 2) - torch.tensor(MEAN)[:, None, None]) / (
        torch.tensor(STD)[:, None, None]
    )
    return rgb, images


def _to_rgb(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * STD + MEAN).astype(np.float64)


def _stains(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin, eosin and DAB concentrations by scikit-image's deconvolution matrix (without its clipping)."""
    return -np.log(np.clip(rgb / 255.0, 1e-6, 1.0)) @ hed_from_rgb


def test_no_jitter_gives_the_tiles_back():
    rgb, images = _he_tiles()
    out = hed_jitter(images, MEAN, STD, 0.0, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(_to_rgb(out), rgb, atol=1e-2)


def test_each_tile_gets_one_gain_and_shift_per_stain():
    rgb, images = _he_tiles()
    strength = 0.1
    out = hed_jitter(images, MEAN, STD, strength, torch.Generator().manual_seed(1))
    before, after = _stains(rgb), _stains(_to_rgb(out))
    gains = []
    for tile in range(rgb.shape[0]):
        for stain in range(3):
            x, y = before[tile, ..., stain].ravel(), after[tile, ..., stain].ravel()
            slope, intercept = np.polyfit(x, y, 1)
            assert np.abs(y - (slope * x + intercept)).max() < 1e-3  # an affine map of the stain, per tile
            assert 1 - strength - 1e-3 <= slope <= 1 + strength + 1e-3
            gains.append(slope)
    assert np.std(gains) > 0.01  # tiles and stains got their own draws
    assert not np.allclose(_to_rgb(out), rgb, atol=1.0)
    again = hed_jitter(images, MEAN, STD, strength, torch.Generator().manual_seed(1))
    assert torch.equal(again, out)


def test_augment_batch_applies_stain_jitter_and_needs_the_standardisation():
    _, images = _he_tiles()
    batch = {"image": images, "labels": torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long)}
    plain = augment_batch(batch, torch.Generator().manual_seed(3))
    jittered = augment_batch(batch, torch.Generator().manual_seed(3), stain_jitter=0.05, standardisation=(MEAN, STD))
    assert not torch.allclose(plain["image"], jittered["image"])
    assert torch.equal(plain["labels"], jittered["labels"])
    with pytest.raises(ValueError, match="standardisation"):
        augment_batch(batch, torch.Generator().manual_seed(3), stain_jitter=0.05)
