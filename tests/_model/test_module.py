from __future__ import annotations

import torch

from ghist._model._module import GHISTModule, augment_batch


def _batch(n: int = 6, size: int = 16) -> dict:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (n, size, size), generator=gen)
    # every channel is the label map, so image and labels must stay aligned through any flip or rotation
    image = labels[:, None].repeat(1, 3, 1, 1).float()
    return {"image": image, "labels": labels, "n_cells": 4}


def test_flips_and_rotations_keep_image_and_labels_aligned():
    batch = _batch()
    out = augment_batch(batch, torch.Generator().manual_seed(1))
    assert torch.equal(out["image"], out["labels"][:, None].repeat(1, 3, 1, 1).float())
    assert not torch.equal(out["labels"], batch["labels"])  # 6 tiles: some were turned
    # the label histogram of each tile is unchanged: pixels moved, none invented
    for before, after in zip(batch["labels"], out["labels"], strict=True):
        assert torch.equal(torch.bincount(before.ravel(), minlength=5), torch.bincount(after.ravel(), minlength=5))


def test_color_jitter_scales_and_shifts_each_channel_within_bounds():
    batch = _batch()
    batch["image"] = torch.ones_like(batch["image"])  # flips and rotations leave a constant image unchanged
    out = augment_batch(batch, torch.Generator().manual_seed(2), color_jitter=0.2)
    image = out["image"]
    per_channel = image.flatten(2)
    # one gain and one shift per tile and channel: each channel stays constant, within 1 +- (0.2 + 0.2)
    assert torch.allclose(per_channel.max(-1).values, per_channel.min(-1).values)
    values = per_channel[..., 0]
    assert values.min() >= 0.6 - 1e-6
    assert values.max() <= 1.4 + 1e-6
    assert values.std() > 0.01  # tiles and channels got different draws
    again = augment_batch(batch, torch.Generator().manual_seed(2), color_jitter=0.2)
    assert torch.equal(again["image"], image)
    plain = augment_batch(batch, torch.Generator().manual_seed(2), color_jitter=0.0)
    assert torch.equal(plain["image"], batch["image"])


def test_module_passes_its_expr_scale_to_the_losses(monkeypatch):
    import ghist._model._module as module

    seen = {}

    def fake_losses(out, batch, network, **kwargs):
        seen.update(kwargs)
        return {"total": torch.zeros(())}

    monkeypatch.setattr(module, "ghist_losses", fake_losses)
    net = torch.nn.Module()
    net.forward = lambda *args: {}
    lit = GHISTModule(net, expr_scale=2.5)
    lit._losses({"image": None, "labels": None, "cell_batch": None, "n_cells": 0})
    assert seen["expr_scale"] == 2.5
