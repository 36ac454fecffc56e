from __future__ import annotations

import pytest
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


def _diverging_module(monkeypatch, value: float, **settings) -> GHISTModule:
    import ghist._model._module as module

    def losses(out, batch, network, **kwargs):
        return {"total": torch.tensor(value), "expr": torch.tensor(value), "pixel": torch.tensor(0.5)}

    monkeypatch.setattr(module, "ghist_losses", losses)
    net = torch.nn.Module()
    net.forward = lambda *args: {}
    return GHISTModule(net, expr_scale=1.0, augment=False, **settings)


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_a_non_finite_loss_stops_training_at_once_saying_what_to_change(monkeypatch):
    from ghist._model._module import TrainingDivergedError

    batch = {"image": torch.zeros(1, 3, 4, 4), "labels": None, "cell_batch": None, "n_cells": 0, "expr": torch.zeros(1)}
    with pytest.raises(TrainingDivergedError, match=r"\['expr'\].*lr=1e\+06.*lr=100000"):
        _diverging_module(monkeypatch, float("nan"), lr=1e6).training_step(batch, 0)
    with pytest.raises(TrainingDivergedError):
        _diverging_module(monkeypatch, float("inf")).training_step(batch, 0)
    finite = _diverging_module(monkeypatch, 1.5).training_step(batch, 0)
    assert float(finite) == 1.5


def test_non_finite_weights_are_never_handed_back():
    from ghist._model._module import TrainingDivergedError, check_finite_weights

    net = torch.nn.Linear(2, 2)
    check_finite_weights(net, 1e-3)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="weight"):
        check_finite_weights(net, 1e-3)
