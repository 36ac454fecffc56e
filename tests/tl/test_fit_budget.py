"""`ghist.tl.fit`: validated numbers, step/time budgets, early stopping, resume, quiet output, no litter."""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import timedelta

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import ghist
from ghist._model._data import collate_tiles

SMALL = {"width": 4, "embed_dim": 16, "batch_size": 4, "seed": 0, "progress": False, "precision": "32-true"}


def _accuracy(model, dataset) -> float:
    batch = collate_tiles([dataset[i] for i in range(len(dataset))])
    model.network.eval()
    with torch.inference_mode():
        out = model.network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
    known = batch["cell_type"] >= 0
    return float((out["cell_logits"].argmax(-1)[known] == batch["cell_type"][known]).float().mean())


class _Record(Callback):
    """Records the trainer's budget and the learning rate of every step; optionally stops at once."""

    def __init__(self, stop: bool = False):
        self.stop = stop
        self.lrs: list[float] = []
        self.max_steps = self.max_epochs = self.max_time = None

    def on_train_start(self, trainer, pl_module):
        from lightning.pytorch.callbacks import Timer

        self.max_steps, self.max_epochs = trainer.max_steps, trainer.max_epochs
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        self.max_time = None if timer is None else timer._duration
        if self.stop:
            trainer.should_stop = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("kwarg", "value", "match"),
    [
        ("width", 0, r"`width` must be an integer >= 1, got 0"),
        ("width", 2.5, r"`width` must be an integer >= 1, got 2\.5"),
        ("embed_dim", -3, r"`embed_dim` must be an integer >= 1, got -3"),
        ("lr", 0.0, r"`lr` must be a finite number > 0, got 0\.0"),
        ("lr", float("nan"), r"`lr` must be a finite number > 0, got nan"),
        ("weight_decay", -1e-4, r"`weight_decay` must be a finite number >= 0, got -0\.0001"),
        ("batch_size", 0, r"`batch_size` must be an integer >= 1, got 0"),
        ("max_epochs", 0, r"`max_epochs` must be an integer >= 1 \(or None\), got 0"),
        ("max_epochs", -1, r"`max_epochs` must be an integer >= 1 \(or None\), got -1"),
        ("max_steps", 0, r"`max_steps` must be an integer >= 1 \(or None\), got 0"),
        ("max_time", "00:00:00", r"`max_time` must allow at least one step.*'00:00:00'"),
        ("max_time", timedelta(seconds=-5), r"`max_time` must allow at least one step"),
        ("max_time", 30, r"`max_time` must be a string 'HH:MM:SS'.*timedelta, got 30 \(int\)"),
        ("max_time", "twenty minutes", r"`max_time` 'twenty minutes' is not 'HH:MM:SS'"),
        ("precision", "fp8", r"`precision` must be one of .*'32-true'.*'bf16-mixed'.*got 'fp8'"),
        ("precision", 8, r"`precision` must be one of .*got 8"),
        ("num_workers", -1, r"`num_workers` must be an integer >= 0, got -1"),
        ("patience", 0, r"`patience` must be an integer >= 1 \(or None\), got 0"),
    ],
)
def test_fit_rejects_bad_numbers_before_training(tiles, tmp_path, kwarg, value, match):
    kwargs = {**SMALL, kwarg: value}
    with pytest.raises((ValueError, TypeError), match=match):
        ghist.tl.fit(tiles, checkpoint_dir=tmp_path / "ckpt", **kwargs)
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


@pytest.mark.slow
def test_default_budget_is_steps_not_epochs(tiles, tmp_path):
    record = _Record(stop=True)
    ghist.tl.fit(tiles, checkpoint_dir=tmp_path / "a", callbacks=[record], **SMALL)
    assert record.max_steps == 3000
    assert record.max_epochs == -1
    assert record.max_time is None
    # with a time budget only, training runs until the time is up
    record = _Record(stop=True)
    ghist.tl.fit(tiles, max_time="00:10:00", checkpoint_dir=tmp_path / "b", callbacks=[record], **SMALL)
    assert record.max_steps == -1
    assert record.max_epochs == -1
    assert record.max_time == 600


@pytest.mark.slow
def test_learning_rate_decays_over_max_steps(tiles, tmp_path):
    record = _Record()
    model = ghist.tl.fit(tiles, max_steps=7, lr=1e-3, checkpoint_dir=tmp_path, callbacks=[record], **SMALL)
    assert len(record.lrs) == 7
    expected = [1e-3 * (1 - k / 7) for k in range(7)]
    assert record.lrs == pytest.approx(expected, rel=1e-6)
    assert model.history_["step"].iloc[-1] == 7


@pytest.mark.slow
def test_early_stopping_on_validation_score(tiles, tmp_path):
    model = ghist.tl.fit(tiles, max_epochs=60, patience=2, lr=3e-3, checkpoint_dir=tmp_path, **SMALL)
    history = model.history_
    assert len(history) < 60
    # stopped `patience` epochs after the best one
    assert len(history) == model.best_epoch_ + 1 + 2
    assert int(history["val_score"].idxmax()) == model.best_epoch_


@pytest.mark.slow
def test_step_budget_ending_inside_the_first_epoch(tiles, tmp_path, recwarn):
    # Lightning ends such an epoch before its validation: early stopping and the best-epoch checkpoint then have no
    # score to read (EarlyStopping raised "conditioned on metric `val_score` which is not available").
    assert len(tiles.train) > SMALL["batch_size"]  # more than one step per epoch
    model = ghist.tl.fit(tiles, max_steps=1, checkpoint_dir=tmp_path, **SMALL)
    assert model.is_trained
    assert model.history_["step"].iloc[-1] == 1
    assert not [w for w in recwarn if "val_score" in str(w.message)]


@pytest.mark.slow
def test_early_stopping_can_be_turned_off(tiles, tmp_path):
    model = ghist.tl.fit(tiles, max_epochs=6, patience=1, early_stopping=False, checkpoint_dir=tmp_path, **SMALL)
    assert len(model.history_) == 6


@pytest.mark.slow
def test_short_or_weak_training_warns(tiles, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ghist"):
        ghist.tl.fit(tiles, max_steps=2, lr=1e-9, checkpoint_dir=tmp_path, **SMALL)
    text = caplog.text
    assert "Trained for 2 optimisation steps" in text
    assert "raise `max_time`" in text
    assert "near chance" in text
    assert "macro F1" in text or "Pearson" in text


@pytest.mark.slow
def test_resume_continues_budget_and_history(tiles, tmp_path):
    first = ghist.tl.fit(tiles, max_epochs=2, checkpoint_dir=tmp_path / "run", **SMALL)
    assert first.history_["epoch"].tolist() == [0.0, 1.0]
    resumed = ghist.tl.fit(
        tiles, max_epochs=4, resume=tmp_path / "run" / "last.ckpt", checkpoint_dir=tmp_path / "run2", **SMALL
    )
    # the history of the first run is carried over
    assert resumed.history_["epoch"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert resumed.history_["step"].tolist() == sorted(resumed.history_["step"].tolist())


@pytest.mark.slow
def test_resume_counts_time_already_used(tiles, tmp_path):
    first = ghist.tl.fit(tiles, max_time="00:00:00:04", checkpoint_dir=tmp_path / "run", **SMALL)
    steps_first = int(first.history_["step"].iloc[-1])
    start = time.monotonic()
    resumed = ghist.tl.fit(
        tiles, max_time="00:00:00:04", resume=tmp_path / "run" / "last.ckpt", checkpoint_dir=tmp_path / "run", **SMALL
    )
    steps_per_epoch = -(-len(tiles.train) // SMALL["batch_size"])
    # the 4 s were used by the first run: at most one more epoch is trained, not another 4 s worth
    assert int(resumed.history_["step"].iloc[-1]) <= steps_first + steps_per_epoch
    assert time.monotonic() - start < 4 + 3


@pytest.mark.slow
@pytest.mark.parametrize("progress", [False, True])
def test_fit_is_quiet(tiles, tmp_path, capsys, caplog, recwarn, progress):
    with caplog.at_level(logging.INFO):
        ghist.tl.fit(tiles, **{**SMALL, "progress": progress}, max_epochs=2, checkpoint_dir=tmp_path / "run")
        # resuming into another folder is quiet as well
        ghist.tl.fit(
            tiles,
            **{**SMALL, "progress": progress},
            max_epochs=3,
            resume=tmp_path / "run" / "last.ckpt",
            checkpoint_dir=tmp_path / "run2",
        )
    out, err = capsys.readouterr()
    everything = "\n".join([out, err, caplog.text, *(str(w.message) for w in recwarn)])
    for noise in (
        "GPU available",
        "TPU available",
        "Tip",
        "litlogger",
        "exists and is not empty",
        "dirpath has changed",
    ):
        assert noise not in everything, noise
    assert not recwarn.list, [str(w.message) for w in recwarn]
    assert ("it/s" in out + err or "s/it" in out + err) == progress


@pytest.mark.slow
def test_fit_leaves_no_temporary_folder(tiles, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def ours():
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ghist_fit_"))

    before = ours()
    with caplog.at_level(logging.INFO, logger="ghist"):
        model = ghist.tl.fit(tiles, max_epochs=1, **SMALL)
    assert model.is_trained
    assert ours() == before
    assert "ghist_fit_" in caplog.text  # where the checkpoints were is logged


@pytest.mark.slow
def test_default_precision_on_cpu_is_float32_and_learns(tiles, tmp_path, caplog):
    kwargs = {k: v for k, v in SMALL.items() if k != "precision"}
    with caplog.at_level(logging.INFO, logger="ghist"):
        model = ghist.tl.fit(
            tiles,
            width=8,
            embed_dim=32,
            max_epochs=15,
            lr=3e-3,
            checkpoint_dir=tmp_path,
            **{k: v for k, v in kwargs.items() if k not in ("width", "embed_dim")},
        )
    assert "precision 32-true" in caplog.text
    losses = model.history_["train_loss_epoch"].to_numpy()
    assert losses[-1] < 0.7 * losses[0]
    # well above chance on held-out tiles, as the float32 `trained` fixture (tests/tl/test_fit.py)
    assert _accuracy(model, tiles.test) > max(0.5, 2.0 / len(tiles.cell_types))


def test_demo_rejects_bad_arguments_at_once(tmp_path, capsys):
    from ghist._cli import main

    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["demo", "--max-time", "garbage", "--out", str(tmp_path / "demo")])
    assert info.value.code == 2
    assert time.monotonic() - start < 5
    assert "--max-time" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit):
        main(["demo", "--width", "0", "--out", str(tmp_path / "demo")])
    assert "--width" in capsys.readouterr().err


@pytest.mark.slow
def test_history_is_saved_in_checkpoints(tiles, tmp_path):
    ghist.tl.fit(tiles, max_epochs=2, checkpoint_dir=tmp_path, **SMALL)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    rows = next(v for k, v in state["callbacks"].items() if "EpochHistory" in k)["rows"]
    assert [r["epoch"] for r in rows] == [0.0, 1.0]
