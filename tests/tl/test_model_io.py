from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

import ghist


def test_save_load_roundtrip(trained, test_sdata, tmp_path):
    trained.save(tmp_path / "model")
    loaded = ghist.GHISTModel.load(tmp_path / "model")
    assert loaded.genes == trained.genes
    assert loaded.cell_types == trained.cell_types
    assert loaded.cell_type_groups == trained.cell_type_groups
    assert loaded.init_params_ == trained.init_params_
    assert loaded.is_trained
    assert loaded.best_epoch_ == trained.best_epoch_
    pd.testing.assert_frame_equal(loaded.history_, trained.history_)
    a = ghist.tl.predict(test_sdata, trained, key_added="a", progress=False)
    b = ghist.tl.predict(test_sdata, loaded, key_added="b", progress=False)
    np.testing.assert_array_equal(a.X, b.X)
    assert (a.obs["ghist_cell_type"] == b.obs["ghist_cell_type"]).all()
    assert "GHISTModel (trained" in repr(loaded)


def test_save_refuses_overwrite_and_load_checks(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)
    with pytest.raises(ValueError, match="other genes"):
        ghist.GHISTModel.load(tmp_path / "m", genes=["NOTAGENE"])
    with pytest.raises(FileNotFoundError):
        ghist.GHISTModel.load(tmp_path / "missing")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_model_validates_arguments():
    with pytest.raises(ValueError, match="more than once"):
        ghist.GHISTModel(["A", "A"])
    with pytest.raises(ValueError, match="reference"):
        ghist.GHISTModel(["A", "B"], reference=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="needs cell types"):
        ghist.GHISTModel(["A"], cell_type_groups={"g": ["T"]})


# ---------------------------------------------------------------------------------------------- safe model files
class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _small_model(**kwargs):
    return ghist.GHISTModel(["A", "B", "C"], ["T", "B"], width=4, embed_dim=8, tile_size=64, **kwargs)


def test_model_file_is_tensors_and_json(tmp_path):
    model = _small_model(reference=np.array([[0.5, 1.0, 2.0], [0.0, 0.1, 3.0]]), cell_type_groups={"t": ["T"]})
    history = pd.DataFrame({"epoch": [0.0, 1.0], "train_loss_epoch": [2.0, 1.0], "val_score": [np.nan, 0.5]})
    model._mark_trained(1, history)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "weights.pt"]
    settings = json.loads((tmp_path / "m" / "model.json").read_text())  # strict JSON (no NaN)
    assert settings["class"] == "GHISTModel"
    assert settings["format_version"] == 2
    assert settings["init_params"] == model.init_params_
    assert settings["best_epoch"] == 1
    assert settings["history"]["val_score"] == [None, 0.5]
    tensors = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    head = {f"uncertainty_head.{k}" for k in model.uncertainty_head.state_dict()}  # the variance head, beside
    assert set(tensors) == set(model.network.state_dict()) | head
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())

    loaded = ghist.GHISTModel.load(tmp_path / "m")
    assert loaded.is_trained
    assert loaded.best_epoch_ == 1
    pd.testing.assert_frame_equal(loaded.history_, history)
    assert loaded.cell_type_groups == {"t": ["T"]}
    for name, value in model.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[name], value), name


def test_state_roundtrip_is_json_and_tensors():
    model = _small_model()
    assert not model.is_trained
    state = model._to_state()
    json.dumps(state["settings"], allow_nan=False)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state["tensors"].values())
    rebuilt = ghist.GHISTModel._from_state(state)
    assert not rebuilt.is_trained
    assert rebuilt.init_params_ == model.init_params_
    for name, value in model.network.state_dict().items():
        assert torch.equal(rebuilt.network.state_dict()[name], value), name
    with pytest.raises(ValueError, match="other genes"):
        ghist.GHISTModel._from_state(state, genes=["A"])
    with pytest.raises(ValueError, match="not a GHISTModel"):
        ghist.GHISTModel._from_state({"settings": {"class": "Other"}, "tensors": {}})


def test_later_settings_are_saved_and_older_models_load_as_trained(tmp_path):
    model = _small_model(morphometrics=True, cell_offset=True, readout=True)
    assert model.init_params_["output_activation"] == "softplus"
    with torch.no_grad():
        model.network.readout.weight.normal_()
    model.readout_ = {"genes_corrected": 2, "penalty": [0.1, None, 1.0]}
    model._mark_trained(1, None)
    model.save(tmp_path / "new")
    loaded = ghist.GHISTModel.load(tmp_path / "new")
    assert loaded.init_params_["output_activation"] == "softplus"
    assert loaded.init_params_["morphometrics"] is True
    assert loaded.network.morphometrics
    assert loaded.init_params_["cell_offset"] is True
    assert loaded.network.expr_head.cell_offset is not None
    assert torch.equal(loaded.network.readout.weight, model.network.readout.weight)
    assert loaded.readout_ == model.readout_
    assert "residual readout: 2 genes corrected" in repr(loaded)

    relu = _small_model(output_activation="relu")
    state = relu._to_state()
    for later in ("output_activation", "morphometrics", "cell_offset", "readout"):  # as before these settings existed
        del state["settings"]["init_params"][later]
    del state["settings"]["readout"]
    older = ghist.GHISTModel._from_state(state)
    assert older.init_params_["output_activation"] == "relu"
    assert older.init_params_["morphometrics"] is False
    assert older.init_params_["cell_offset"] is False
    assert older.init_params_["readout"] is False
    assert older.network.readout is None
    assert older.readout_ is None
    # the loaded network computes what the saved one did: negative pre-activations give exactly 0
    embedding, query = torch.randn(5, 8), torch.randn(5, 2)
    with torch.no_grad():
        older.network.expr_head.to_offset.bias.fill_(-100.0)
        assert torch.equal(older.network.expr_head(embedding, query)[0], torch.zeros(5, 3))
    with pytest.raises(ValueError, match="output_activation"):
        _small_model(output_activation="exp")


def test_training_state_is_read_only():
    model = _small_model()
    with pytest.raises(AttributeError):
        model.is_trained = True
    with pytest.raises(AttributeError):
        model.best_epoch_ = 3
    model._mark_trained(2, None)
    assert model.is_trained_
    assert model.best_epoch_ == 2


def test_load_refuses_a_pickle_that_runs_code(tmp_path):
    _small_model().save(tmp_path / "m")
    marker = tmp_path / "pwned"
    weights = tmp_path / "m" / "weights.pt"
    torch.save({"x": _RunsCode(marker)}, weights)  # a zip-format torch file
    with pytest.raises(ValueError, match=r"weights\.pt"):
        ghist.GHISTModel.load(tmp_path / "m")
    weights.write_bytes(pickle.dumps(_RunsCode(marker)))  # a raw pickle
    with pytest.raises(ValueError, match=r"weights\.pt"):
        ghist.GHISTModel.load(tmp_path / "m")
    assert not marker.exists()


def test_load_refuses_a_legacy_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "old").mkdir()
    torch.save({"class": "GHISTModel", "state_dict": _RunsCode(marker)}, tmp_path / "old" / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt.*weights_only=True"):
        ghist.GHISTModel.load(tmp_path / "old")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"", "empty"),
        (b"\x00garbage\xff" * 50, "cannot be read"),
        ("truncated", "cannot be read"),
        ("list", "other things than tensors"),
        ("other_model", "do not fit"),
    ],
)
def test_load_damaged_or_foreign_weights(tmp_path, content, what):
    model = _small_model()
    model.save(tmp_path / "m")
    weights = tmp_path / "m" / "weights.pt"
    if content == "truncated":
        data = weights.read_bytes()
        content = data[: len(data) // 2]
    elif content == "list":
        torch.save([torch.zeros(2)], weights)
    elif content == "other_model":
        torch.save(ghist.GHISTModel(["A", "B", "C"], width=8, embed_dim=8).network.state_dict(), weights)
    if isinstance(content, bytes):
        weights.write_bytes(content)
    with pytest.raises(ValueError, match=what) as info:
        ghist.GHISTModel.load(tmp_path / "m")
    assert str(weights) in str(info.value)


def test_load_damaged_settings(tmp_path):
    _small_model().save(tmp_path / "m")
    meta = tmp_path / "m" / "model.json"
    meta.write_text('{"class": "GHISTModel", "init_par')
    with pytest.raises(ValueError, match=r"model\.json.*JSON"):
        ghist.GHISTModel.load(tmp_path / "m")
    meta.write_text('{"class": "Something"}')
    with pytest.raises(ValueError, match=r"model\.json.*GHISTModel"):
        ghist.GHISTModel.load(tmp_path / "m")
    meta.write_text(json.dumps({"class": "GHISTModel", "format_version": 99, "init_params": {"genes": ["A"]}}))
    with pytest.raises(ValueError, match="newer"):
        ghist.GHISTModel.load(tmp_path / "m")


def test_load_legacy_v0_1_directory(tmp_path):
    """ghist 0.1 wrote one pickled dict of plain values and tensors: it still loads, with weights_only=True."""
    model = _small_model(reference=np.array([[0.5, 1.0, 2.0]]))
    payload = {
        "class": "GHISTModel",
        "ghist_version": "0.1.0",
        "init_params": model.init_params_,
        "reference": model.network.reference / model.expr_scale,
        "state_dict": model.network.state_dict(),
        "is_trained": True,
        "best_epoch": 4,
        "history": {"epoch": [0.0, 1.0], "train_loss_epoch": [1.0, 0.5]},
    }
    (tmp_path / "old").mkdir()
    torch.save(payload, tmp_path / "old" / "model.pt")
    (tmp_path / "old" / "model.json").write_text(json.dumps({"class": "GHISTModel", "init_params": {}}))
    loaded = ghist.GHISTModel.load(tmp_path / "old")
    assert loaded.is_trained
    assert loaded.best_epoch_ == 4
    assert loaded.history_["train_loss_epoch"].tolist() == [1.0, 0.5]
    for name, value in model.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[name], value), name
