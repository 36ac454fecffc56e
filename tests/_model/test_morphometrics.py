"""Nucleus morphometrics: equal to a per-nucleus loop, invariant where they should be, and wired into the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghist._model._morphometrics import morphometric_features, n_morphometric_features
from ghist._model._network import GHISTNetwork


def _naive(image: torch.Tensor, fmap: torch.Tensor, labels: torch.Tensor, n_cells: int) -> torch.Tensor:
    """The same features, one nucleus at a time with numpy (population variances, eigenvalues by eigvalsh)."""
    rows = []
    for cell in range(1, n_cells + 1):
        b, y, x = np.nonzero(labels.numpy() == cell)
        if not len(b):
            rows.append(np.zeros(n_morphometric_features(image.shape[1], fmap.shape[1])))
            continue
        cov = np.cov(np.stack([y, x]).astype(float), bias=True) + np.eye(2) / 12
        minor, major = np.linalg.eigvalsh(cov)
        img = image.numpy()[b, :, y, x]
        fm = fmap.numpy()[b, :, y, x]
        rows.append(
            np.concatenate(
                [
                    [np.log(len(b)) - 4.8, 0.5 * np.log(major), 0.5 * np.log(max(minor, 1 / 12))],
                    img.mean(0),
                    np.sqrt(img.var(0) + 1e-6),
                    np.sqrt(fm.var(0) + 1e-6),
                ]
            )
        )
    return torch.tensor(np.array(rows), dtype=torch.float32)


def _random_nuclei(seed: int, n_tiles: int = 3, size: int = 24, n_cells: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n_tiles, size, size, dtype=torch.long)
    for cell in range(1, n_cells + 1):
        b = int(torch.randint(n_tiles, (1,), generator=gen))
        y0, x0 = torch.randint(size - 6, (2,), generator=gen).tolist()
        h, w = torch.randint(1, 7, (2,), generator=gen).tolist()
        labels[b, y0 : y0 + h, x0 : x0 + w] = cell  # later cells overlap earlier ones: irregular shapes
    labels[0, 0, :4] = -1  # ignored pixels belong to no nucleus
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_a_loop_over_nuclei(seed):
    labels = _random_nuclei(seed)
    n_cells = 14  # the last ones may have no visible pixel at all
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 3, 24, 24, generator=gen)
    fmap = torch.rand(3, 5, 24, 24, generator=gen).to(memory_format=torch.channels_last)
    got = morphometric_features(image, fmap, labels, n_cells)
    assert got.shape == (n_cells, n_morphometric_features(3, 5)) == (n_cells, 14)
    torch.testing.assert_close(got, _naive(image, fmap, labels, n_cells), atol=1e-4, rtol=1e-4)
    assert got[-1].abs().sum() == 0  # cell 14 was never drawn


def test_size_shape_stain_and_texture_are_told_apart():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1  # small square
    labels[0, 10:18, 10:18] = 2  # big square
    labels[0, 22:24, 2:14] = 3  # bar along x
    labels[0, 2:14, 26:28] = 4  # the same bar along y
    image = torch.zeros(1, 3, 32, 32)
    image[0, :, 10:18, 10:18] = -1.0  # the big nucleus is darker ...
    image[0, 0, 10:18:2, 10:18] += 0.5  # ... and granular in the first channel
    feats = morphometric_features(image, torch.zeros(1, 2, 32, 32), labels, 4)
    log_area, major, minor = feats[:, 0], feats[:, 1], feats[:, 2]
    assert log_area[1] > log_area[0]
    assert major[1] > major[0]
    assert minor[1] > minor[0]
    assert major[2] > minor[2] + 1.0  # elongated
    torch.testing.assert_close(feats[2], feats[3])  # rotation does not change size, shape or stain
    assert (feats[1, 3:6] < feats[0, 3:6]).all()  # darker
    assert feats[1, 6] > 0.2 > feats[0, 6]  # chromatin spread, first channel only
    torch.testing.assert_close(feats[1, 7:], feats[0, 7:], atol=1e-3, rtol=0)


def test_gradient_reaches_the_feature_map_and_half_precision_works():
    labels = _random_nuclei(3)
    fmap = torch.rand(3, 4, 24, 24, requires_grad=True)
    morphometric_features(torch.randn(3, 3, 24, 24), fmap, labels, 12).sum().backward()
    assert torch.isfinite(fmap.grad).all()
    assert fmap.grad.abs().sum() > 0
    half = morphometric_features(torch.randn(3, 3, 24, 24).bfloat16(), fmap.detach().bfloat16(), labels, 12)
    assert half.dtype == torch.float32
    assert torch.isfinite(half).all()


def test_network_uses_them_only_when_asked():
    image = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, 4:9, 4:9], labels[0, 20:25, 10:15], labels[1, 3:8, 3:8] = 1, 2, 3
    cell_batch = torch.tensor([0, 0, 1])
    kwargs = {"n_genes": 5, "n_types": 3, "width": 4, "embed_dim": 16, "hidden": 16, "n_heads": 2, "dropout": 0.0}
    torch.manual_seed(0)
    plain = GHISTNetwork(**kwargs)
    torch.manual_seed(0)
    morpho = GHISTNetwork(**kwargs, morphometrics=True)
    extra = n_morphometric_features(3, morpho.backbone.encoder_channels[0])
    assert morpho.embed[0].in_features == plain.embed[0].in_features + extra
    out = morpho.eval()(image, labels, cell_batch, 3)
    assert out["expr"].shape == (3, 5)
    assert torch.isfinite(out["expr"]).all()
    seen = []
    morpho.embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    morpho(image, labels, cell_batch, 3)
    encoded = morpho.backbone(image)[2]
    torch.testing.assert_close(seen[0][:, -extra:], morphometric_features(image, encoded, labels, 3))
