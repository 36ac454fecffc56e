from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import ghist
from ghist._model._data import collate_tiles


def _accuracy(model, dataset) -> float:
    batch = collate_tiles([dataset[i] for i in range(len(dataset))])
    model.network.eval()
    with torch.inference_mode():
        out = model.network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
    known = batch["cell_type"] >= 0
    pred = out["cell_logits"].argmax(-1)
    return float((pred[known] == batch["cell_type"][known]).float().mean())


def test_fit_learns(trained, tiles):
    history = trained.history_
    assert trained.is_trained
    assert trained.is_trained_  # scikit-learn style alias
    assert trained.init_params_["output_activation"] == "softplus"  # the default with cell-level targets
    assert not trained.network.training
    assert len(history) >= 2
    losses = history["train_loss_epoch"].to_numpy()
    assert losses[-1] < 0.7 * losses[0]
    n_types = len(tiles.cell_types)
    # well above chance on held-out tiles never seen in training
    assert _accuracy(trained, tiles.test) > max(0.5, 2.0 / n_types)
    assert "val_score" in history.columns


@pytest.mark.slow
def test_fit_is_reproducible(tiles, tmp_path):
    kwargs = {"width": 4, "embed_dim": 16, "max_epochs": 1, "batch_size": 4, "seed": 3, "progress": False}
    a = ghist.tl.fit(tiles, checkpoint_dir=tmp_path / "a", **kwargs)
    b = ghist.tl.fit(tiles, checkpoint_dir=tmp_path / "b", **kwargs)
    for (name, pa), pb in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.slow
def test_stain_jitter_reaches_training_and_stays_reproducible(tiles, tmp_path):
    kwargs = {"width": 4, "embed_dim": 16, "max_epochs": 1, "batch_size": 4, "seed": 3, "progress": False}
    plain = ghist.tl.fit(tiles, checkpoint_dir=tmp_path / "plain", **kwargs)
    a = ghist.tl.fit(tiles, stain_jitter=0.05, checkpoint_dir=tmp_path / "a", **kwargs)
    b = ghist.tl.fit(tiles, stain_jitter=0.05, checkpoint_dir=tmp_path / "b", **kwargs)
    same = [
        all(torch.equal(x, y) for x, y in zip(m.network.state_dict().values(), a.network.state_dict().values()))
        for m in (plain, b)
    ]
    assert same == [False, True]


@pytest.mark.slow
def test_loss_weights_reach_training(tiles, tmp_path):
    kwargs = {"width": 4, "embed_dim": 16, "max_epochs": 2, "batch_size": 4, "seed": 3, "progress": False}
    plain = ghist.tl.fit(tiles, checkpoint_dir=tmp_path / "plain", **kwargs)
    weighted = ghist.tl.fit(tiles, loss_weights={"expr_pearson": 1.0}, checkpoint_dir=tmp_path / "w", **kwargs)
    assert "train/expr_pearson" not in plain.history_.columns
    pearson = weighted.history_["train/expr_pearson"].to_numpy()
    assert np.isfinite(pearson).all()
    assert ((pearson > 0) & (pearson < 2)).all()
    pairs = zip(plain.network.state_dict().values(), weighted.network.state_dict().values())
    assert any(not torch.equal(x, y) for x, y in pairs)


@pytest.mark.slow
def test_fit_adds_a_residual_readout_fitted_after_training(tiles, tmp_path):
    kwargs = {"width": 4, "embed_dim": 16, "max_epochs": 2, "batch_size": 4, "seed": 3, "progress": False}
    plain = ghist.tl.fit(tiles, readout=False, checkpoint_dir=tmp_path / "plain", **kwargs)
    model = ghist.tl.fit(tiles, checkpoint_dir=tmp_path / "readout", **kwargs)
    assert plain.network.readout is None
    assert plain.readout_ is None
    assert plain.init_params_["readout"] is False
    report = model.readout_
    assert report["n_train"] > 0
    assert report["n_val"] > 0
    # a two-epoch network leaves residuals a linear map of its embedding explains
    assert report["genes_corrected"] > 0
    assert report["val_mse"]["after"] < report["val_mse"]["before"]
    assert model.init_params_["readout"] is True
    assert model.network.readout is not None
    # fitted after training: every trained weight is what the same seed gives without it
    readout_keys = {k for k in model.network.state_dict() if k.startswith("readout.")}
    assert readout_keys == {"readout.center", "readout.scale", "readout.weight", "readout.bias"}
    for name, value in plain.network.state_dict().items():
        assert torch.equal(model.network.state_dict()[name], value), name
    # and it is what the validation cells' predictions gain
    batch = collate_tiles([tiles.val[i] for i in range(len(tiles.val))])
    measured = torch.isfinite(batch["expr"]).all(dim=1)
    errors = []
    for m in (plain, model):
        with torch.inference_mode():
            out = m.network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
        errors.append(float(((out["expr"][measured] / m.expr_scale - batch["expr"][measured]) ** 2).mean()))
    assert errors[1] < errors[0]


@pytest.mark.slow
def test_resume_continues(tiles, tmp_path):
    kwargs = {"width": 4, "embed_dim": 16, "batch_size": 4, "seed": 1, "progress": False}
    first = ghist.tl.fit(tiles, max_epochs=1, checkpoint_dir=tmp_path / "run", **kwargs)
    assert first.best_epoch_ == 0
    last = tmp_path / "run" / "last.ckpt"
    assert last.exists()
    state = torch.load(last, weights_only=True)  # tensors and plain containers only
    assert state["epoch"] == 0
    resumed = ghist.tl.fit(tiles, max_epochs=3, resume=last, checkpoint_dir=tmp_path / "run2", **kwargs)
    # the resumed run trained epochs 1 and 2; its history carries the first run's epoch 0
    assert resumed.history_["epoch"].tolist() == [0.0, 1.0, 2.0]
    assert resumed.best_epoch_ in (0, 1, 2)

    # A checkpoint that would run code when unpickled is refused before anything is trained.
    marker = tmp_path / "pwned"
    state["callbacks"]["evil"] = _RunsCode(marker)
    torch.save(state, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"evil\.ckpt.*weights_only=True"):
        ghist.tl.fit(tiles, max_epochs=2, resume=tmp_path / "evil.ckpt", checkpoint_dir=tmp_path / "run3", **kwargs)
    assert not marker.exists()
    assert not (tmp_path / "run3" / "last.ckpt").exists()


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["pickle", "empty", "garbage", "truncated", "not_a_checkpoint"])
def test_resume_refuses_unsafe_or_damaged_checkpoints(tiles, tmp_path, kind):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "bad.ckpt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _RunsCode(marker), "epoch": 0}))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip" * 20)
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"bad\.ckpt") as info:
        ghist.tl.fit(tiles, width=4, embed_dim=16, max_epochs=1, resume=path, progress=False)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.slow
def test_fit_without_cell_types(train_sdata_session, tmp_path):
    from lightning.pytorch.callbacks import Callback

    class CountEpochs(Callback):
        epochs = 0

        def on_train_epoch_end(self, trainer, pl_module):
            CountEpochs.epochs += 1

    tiles = ghist.pp.make_tiles(train_sdata_session, tile_size=64, path=tmp_path / "t.zarr")
    assert tiles.cell_types is None
    model = ghist.tl.fit(
        tiles, width=4, embed_dim=16, max_epochs=2, batch_size=4, progress=False, callbacks=[CountEpochs()]
    )
    assert model.n_types == 0
    assert model.is_trained
    # a user's callback runs beside ghist's own checkpointing and history
    assert CountEpochs.epochs == 2
    assert len(model.history_) == 2


@pytest.mark.slow
def test_fit_max_time(tiles):
    model = ghist.tl.fit(
        tiles, width=4, embed_dim=16, max_epochs=10_000, max_time="00:00:00:03", batch_size=4, progress=False
    )
    assert len(model.history_) < 10_000


def test_fit_bad_inputs(tiles, reference):
    with pytest.raises(TypeError, match="TileSet"):
        ghist.tl.fit("tiles")
    bad = reference[:, reference.var_names[:3]].copy()
    with pytest.raises(KeyError, match="reference"):
        ghist.tl.fit(tiles, reference=bad, width=4, max_epochs=1)
    with pytest.raises(KeyError, match="not among"):
        ghist.tl.fit(tiles, cell_type_groups={"x": ["Unicorn"]}, width=4, max_epochs=1)
    with pytest.raises(ValueError, match="max_time"):
        ghist.tl.fit(tiles, max_time="twenty minutes", width=4, max_epochs=1)
    with pytest.raises(ValueError, match="color_jitter"):
        ghist.tl.fit(tiles, color_jitter=1.5, width=4, max_epochs=1)
    with pytest.raises(ValueError, match=r"`output_activation` must be one of \['relu', 'softplus'\]; got 'exp'"):
        ghist.tl.fit(tiles, output_activation="exp", width=4, max_epochs=1)
    with pytest.raises(KeyError, match=r"Unknown loss terms \['expr_pearsn'\]"):
        ghist.tl.fit(tiles, loss_weights={"expr_pearsn": 1.0}, width=4, max_epochs=1)
    with pytest.raises(ValueError, match=r"`loss_weights\['pixel'\]` must be a finite number >= 0"):
        ghist.tl.fit(tiles, loss_weights={"pixel": -1.0}, width=4, max_epochs=1)
    with pytest.raises(TypeError, match=r"`readout` must be True or False, got 'ridge'"):
        ghist.tl.fit(tiles, readout="ridge", width=4, max_epochs=1)
    with pytest.raises(ValueError, match=r"`accelerator` must be one of .*'auto'.*'mps'"):
        ghist.tl.fit(tiles, accelerator="tpu", width=4, max_epochs=1)


def test_readout_is_skipped_with_a_reason(caplog):
    from ghist.tl._fit_posthoc import fit_model_readout

    model = ghist.GHISTModel(["A", "B"], ["T", "B"], width=4, embed_dim=8, tile_size=64)
    with caplog.at_level("INFO", logger="ghist.tl._fit_posthoc"):
        fit_model_readout(model, [], [], "cpu", spot_supervised=True)
        fit_model_readout(model, [], None, "cpu")
    assert "spot supervision gives no per-cell targets" in caplog.text
    assert "no validation tiles" in caplog.text
    assert model.network.readout is None
    assert model.readout_ is None
