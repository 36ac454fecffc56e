"""The learned nucleus segmenter's network, targets and loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ghist._model._nucleus_net import NucleusNet, fuse_batchnorm, nucleus_loss, nucleus_targets


def _randomise_batchnorm(net: NucleusNet) -> None:
    """Non-trivial running statistics and affine parameters, so fusing them is really tested."""
    gen = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def test_shapes_and_size_check():
    net = NucleusNet((8, 12, 16), unshuffle=2)
    assert net.multiple == 8
    assert net(torch.zeros(2, 3, 24, 40)).shape == (2, 2, 24, 40)
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(1, 3, 20, 24))
    with pytest.raises(ValueError, match="widths"):
        NucleusNet((8,))


def test_fused_batchnorm_gives_the_same_outputs():
    torch.manual_seed(0)
    net = NucleusNet((8, 12, 16), unshuffle=2)
    _randomise_batchnorm(net)
    net.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
        fused = fuse_batchnorm(copy.deepcopy(net))
        got = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("unshuffle", [1, 2])
def test_receptive_radius_bounds_the_context(unshuffle):
    torch.manual_seed(0)
    net = NucleusNet((4, 6, 8), unshuffle=unshuffle).eval()
    _randomise_batchnorm(net)
    radius = net.receptive_radius()
    side = 2 * radius + 2 * net.multiple * 4
    side += (-side) % net.multiple
    x = torch.randn(1, 3, side, side)
    far = x.clone()
    centre = side // 2
    # change every pixel farther than `radius` from the centre pixel (Chebyshev distance)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    outside = torch.maximum((yy - centre).abs(), (xx - centre).abs()) > radius
    far[:, :, outside] = torch.randn(int(outside.sum()))
    near = x.clone()
    near[:, :, centre, centre] += 5.0
    with torch.no_grad():
        base = net(x)[0, :, centre, centre]
        assert torch.equal(net(far)[0, :, centre, centre], base)
        assert not torch.equal(net(near)[0, :, centre, centre], base)


def test_targets_separate_touching_nuclei():
    labels = np.zeros((20, 30), dtype=np.int32)
    labels[4:14, 3:13] = 1
    labels[4:14, 13:25] = 2  # touches nucleus 1 along a column
    fg, dist = nucleus_targets(labels)
    assert np.array_equal(fg, (labels > 0).astype(np.float32))
    assert dist[labels == 0].max() == 0
    for i in (1, 2):
        assert dist[labels == i].max() == pytest.approx(1.0)
    # the shared border is a valley between the two peaks
    assert dist[9, 12] < 0.3
    assert dist[9, 13] < 0.3
    assert dist[9, 8] == pytest.approx(1.0, abs=0.05)
    assert nucleus_targets(np.zeros((5, 5), np.int32)).sum() == 0


def test_loss_is_lower_for_the_right_answer():
    labels = np.zeros((16, 16), dtype=np.int32)
    labels[3:9, 3:9] = 1
    targets = torch.from_numpy(nucleus_targets(labels))[None]
    right = torch.logit(targets.clamp(0.02, 0.98))
    wrong = -right
    assert nucleus_loss(right, targets)[0] < nucleus_loss(wrong, targets)[0]
    total, parts = nucleus_loss(right, targets)
    assert set(parts) == {"bce", "dice", "dist"}
    assert torch.isfinite(total)


@pytest.mark.slow
def test_loss_drops_when_training_on_a_toy_image():
    torch.manual_seed(0)
    labels = np.zeros((32, 32), dtype=np.int32)
    for i, (y, x) in enumerate([(4, 4), (4, 18), (18, 8), (20, 22)], start=1):
        labels[y : y + 8, x : x + 8] = i
    targets = torch.from_numpy(nucleus_targets(labels))[None]
    image = torch.where(torch.from_numpy(labels > 0), -1.0, 1.0).expand(1, 3, 32, 32).clone()
    net = NucleusNet((8, 12), unshuffle=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss, _ = nucleus_loss(net(image), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
