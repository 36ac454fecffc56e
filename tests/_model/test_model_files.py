"""Model folders: every number of ``model.json`` checked before anything is allocated; ``save(overwrite=True)``
replaces only an earlier ghist model, atomically, touching nothing beside it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ghist
from ghist._folders import NotOurFolderError, replace_folder


def _saved(tmp_path, name="m", **settings):
    model = ghist.GHISTModel(["A", "B", "C"], ["x", "y"], width=4, embed_dim=8, tile_size=32, **settings)
    model.save(tmp_path / name)
    return model, tmp_path / name


def _edit(folder, **changes):
    meta = folder / "model.json"
    settings = json.loads(meta.read_text())
    settings["init_params"].update(changes)
    meta.write_text(json.dumps(settings))


@pytest.fixture
def no_network_built(monkeypatch):
    """Fails the test if a real (not meta-device) network is built: what a hostile model.json must never get to."""
    from ghist._model import _network

    built = []
    original = _network.GHISTNetwork.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not next(self.parameters()).is_meta:
            built.append(self)

    monkeypatch.setattr(_network.GHISTNetwork, "__init__", spy)
    return built


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"width": 2000}, "width"),  # used to allocate 4.8 GB before failing
        ({"tile_size": 40000}, "tile_size"),  # 6 GB
        ({"embed_dim": 100000}, "embed_dim"),
        ({"mean": [float("nan"), 0.0, 0.0]}, "mean"),  # gave NaN expression
        ({"std": [1.0, 0.0, 1.0]}, "std"),
        ({"std": [1.0, 1.0]}, "std"),
        ({"pixel_size": -1.0}, "pixel_size"),
        ({"expr_scale": 1e300}, "expr_scale"),
        ({"width": "4"}, "width"),
        ({"output_activation": "tanh"}, "output_activation"),
        ({"morphometrics": 1}, "morphometrics"),
        ({"context_neighbours": 10**9}, "context_neighbours"),
        ({"depth": 5}, "depth"),
    ],
)
def test_load_checks_every_setting_before_building(tmp_path, no_network_built, change, culprit):
    _, folder = _saved(tmp_path)
    no_network_built.clear()
    _edit(folder, **change)
    with pytest.raises(ValueError, match=culprit):
        ghist.GHISTModel.load(folder)
    assert not no_network_built


def test_nan_in_the_json_text_is_refused(tmp_path):
    _, folder = _saved(tmp_path)
    meta = folder / "model.json"
    meta.write_text(meta.read_text().replace('"mean": [\n      0.0', '"mean": [\n      NaN'))
    assert "NaN" in meta.read_text()
    with pytest.raises(ValueError, match=r"mean\[0\]"):
        ghist.GHISTModel.load(folder)


def test_weight_shapes_are_checked_against_the_settings_before_building(tmp_path, no_network_built):
    _, folder = _saved(tmp_path)
    no_network_built.clear()
    _edit(folder, width=8)  # weights of width 4
    with pytest.raises(ValueError, match=r"settings imply"):
        ghist.GHISTModel.load(folder)
    assert not no_network_built


def test_non_finite_weights_are_refused(tmp_path):
    _, folder = _saved(tmp_path)
    tensors = torch.load(folder / "weights.pt", weights_only=True)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name].view(-1)[0] = math.nan
    torch.save(tensors, folder / "weights.pt")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ghist.GHISTModel.load(folder)


def test_bad_training_state_is_refused(tmp_path):
    _, folder = _saved(tmp_path)
    settings = json.loads((folder / "model.json").read_text())
    settings["best_epoch"] = "three"
    (folder / "model.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="best_epoch"):
        ghist.GHISTModel.load(folder)


def test_a_valid_model_still_loads_exactly(tmp_path):
    model, folder = _saved(tmp_path, morphometrics=True)
    loaded = ghist.GHISTModel.load(folder)
    assert loaded.spec == model.spec
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------ save


def test_save_keeps_a_sibling_it_did_not_create(tmp_path):
    _, folder = _saved(tmp_path)
    sibling = tmp_path / ".m.old"  # the name the old save used for its backup, and deleted
    sibling.mkdir()
    (sibling / "thesis.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    ghist.GHISTModel(["A"], width=4, embed_dim=8, tile_size=32).save(folder, overwrite=True)
    assert (sibling / "thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left beside it
    assert ghist.GHISTModel.load(folder).genes == ["A"]


def test_save_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("years of work")
    model = ghist.GHISTModel(["A"], width=4, embed_dim=8, tile_size=32)
    with pytest.raises(NotOurFolderError, match="not a ghist model"):
        model.save(notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


def test_save_refuses_a_model_folder_holding_the_users_files(tmp_path):
    _, folder = _saved(tmp_path)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(NotOurFolderError, match=r"notes\.txt"):
        ghist.GHISTModel(["A"], width=4, embed_dim=8, tile_size=32).save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert ghist.GHISTModel.load(folder).genes == ["A", "B", "C"]


def test_save_replaces_an_earlier_model_and_its_card(tmp_path):
    _, folder = _saved(tmp_path)
    (folder / "CARD.md").write_text("# old card")
    ghist.GHISTModel(["A"], width=4, embed_dim=8, tile_size=32).save(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.pt"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ghist.GHISTModel(["A"], width=4, embed_dim=8, tile_size=32).save(folder)


def test_a_failed_write_leaves_the_old_folder_and_nothing_else(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "marker").write_text("old")

    def fail(tmp):
        (tmp / "marker").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_folder(dest, fail, overwrite=True, is_ours=lambda p: (p / "marker").is_file())
    assert (dest / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    replace_folder(dest, lambda t: (t / "marker").write_text("new"), overwrite=True, is_ours=lambda p: True)
    assert (dest / "marker").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
