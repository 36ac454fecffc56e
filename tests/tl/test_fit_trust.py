"""fit never hands back a model that predicts NaN, and refuses what it cannot use before training."""

from __future__ import annotations

import pytest

import ghist
from ghist._model._module import TrainingDivergedError


def test_fit_refuses_an_unknown_keyword_before_training(tiles):
    with pytest.raises(TypeError, match="did you mean 'batch_size'"):
        ghist.tl.fit(tiles, batchsize=4, max_steps=1, progress=False)


@pytest.mark.parametrize(("option", "value"), [("lr", float("nan")), ("seed", 2**70), ("width", 2000)])
def test_fit_refuses_bad_settings_before_training(tiles, option, value):
    with pytest.raises(ValueError, match=option):
        ghist.tl.fit(tiles, max_steps=1, progress=False, **{option: value})


@pytest.mark.slow
def test_a_diverged_fit_stops_at_its_first_non_finite_loss(tiles, tmp_path):
    # lr=1e6 used to train to the end and return a model predicting NaN (or, with the readout, end in a bare
    # numpy LinAlgError after the whole budget)
    with pytest.raises(TrainingDivergedError, match=r"Lower the learning rate \(`lr=1e\+06`") as caught:
        ghist.tl.fit(
            tiles, width=4, embed_dim=16, lr=1e6, max_steps=200, progress=False, checkpoint_dir=tmp_path / "ckpt"
        )
    step = int(str(caught.value).split("optimisation step ")[1].split(":")[0])
    assert step < 20  # stopped at once, not after the budget
    assert isinstance(caught.value, ValueError)
