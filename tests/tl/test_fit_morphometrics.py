"""``fit(morphometrics=True)``: trained, saved with the model, used by predict; old models load without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ghist


@pytest.fixture(scope="module")
def morpho_model(tiles, tmp_path_factory):
    return ghist.tl.fit(
        tiles,
        width=4,
        embed_dim=16,
        max_steps=12,
        batch_size=4,
        lr=3e-3,
        seed=0,
        precision="32-true",
        progress=False,
        checkpoint_dir=tmp_path_factory.mktemp("ckpt_morpho"),
        morphometrics=True,
    )


def test_saved_loaded_and_predicted_with(morpho_model, test_sdata, tmp_path):
    assert morpho_model.init_params_["morphometrics"] is True
    morpho_model.save(tmp_path / "m")
    loaded = ghist.GHISTModel.load(tmp_path / "m")
    assert loaded.network.morphometrics
    assert loaded.init_params_["morphometrics"] is True
    for name, value in morpho_model.network.state_dict().items():
        torch.testing.assert_close(loaded.network.state_dict()[name], value)
    a = ghist.tl.predict(test_sdata, morpho_model, key_added="a", progress=False, seed=0)
    b = ghist.tl.predict(test_sdata, loaded, key_added="b", progress=False, seed=0)
    assert np.isfinite(np.asarray(a.X)).all()
    np.testing.assert_allclose(np.asarray(a.X), np.asarray(b.X), rtol=1e-5, atol=1e-6)


def test_models_saved_before_morphometrics_load_without_them(tmp_path):
    model = ghist.GHISTModel(["EPCAM", "PTPRC"], None, width=4, embed_dim=8, tile_size=32)
    model.save(tmp_path / "old")
    meta = tmp_path / "old" / "model.json"
    settings = json.loads(meta.read_text())
    del settings["init_params"]["morphometrics"]
    meta.write_text(json.dumps(settings))
    loaded = ghist.GHISTModel.load(tmp_path / "old")
    assert loaded.network.morphometrics is False
    assert loaded.init_params_["morphometrics"] is False


def test_bad_morphometrics():
    with pytest.raises(TypeError, match="morphometrics"):
        ghist.GHISTModel(["EPCAM"], None, width=4, embed_dim=8, tile_size=32, morphometrics="yes")
