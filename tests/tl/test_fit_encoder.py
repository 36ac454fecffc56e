"""`fit(encoder=...)`: pretrained encoders (an nn.Module, or a timm name and a local weights file), trained for real."""

from __future__ import annotations

import copy
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import ghist


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        )

    def forward(self, x):
        return self.body(x)


class SmallViT(nn.Module):
    """ViT-like: patch embedding, class + 2 register tokens, one transformer layer, tokens out."""

    def __init__(self, dim: int = 16, patch: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.prefix = nn.Parameter(torch.randn(1, 3, dim) * 0.1)
        self.block = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.block(torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1))


FIT = {
    "width": 4,
    "embed_dim": 16,
    "max_epochs": 8,
    "batch_size": 4,
    "lr": 3e-3,
    "seed": 0,
    "precision": "32-true",
    "accelerator": "cpu",
    "progress": False,
    "early_stopping": False,
}


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _losses_fell(model) -> None:
    losses = model.history_["train_loss_epoch"].to_numpy()
    assert losses[-1] < 0.8 * losses[0], losses


def _predict(sdata, model, key):
    return ghist.tl.predict(sdata, model, key_added=key, progress=False, accelerator="cpu")


@pytest.fixture(scope="module")
def frozen_cnn(tiles):
    torch.manual_seed(1)
    mine = SmallCNN()
    before = _params(mine)
    model = ghist.tl.fit(tiles, encoder=mine, encoder_options={"name": "my-cnn", "input_size": 32}, **FIT)
    return mine, before, model


@pytest.fixture(scope="module")
def trainable_vit(tiles):
    torch.manual_seed(2)
    mine = SmallViT()
    before = _params(mine)
    model = ghist.tl.fit(tiles, encoder=mine, encoder_trainable=True, **FIT)
    return mine, before, model


@pytest.mark.slow
def test_frozen_cnn_encoder_learns_and_stays_unchanged(frozen_cnn):
    mine, before, model = frozen_cnn
    _losses_fell(model)
    enc = model.network.feature_encoder
    after = _params(enc.model)
    # Weights and batch-norm statistics: untouched by training (eval mode, no gradient), and the caller's module too.
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())
    assert not any(p.requires_grad for p in enc.model.parameters())
    settings = model.init_params_["encoder"]
    assert settings["kind"] == "module"
    assert settings["class"].endswith("SmallCNN")
    assert settings["label"] == "my-cnn"
    assert settings["out_dim"] == 8
    assert settings["input_size"] == 32
    assert settings["trainable"] is False
    assert "encoder: my-cnn (frozen)" in repr(model)


@pytest.mark.slow
def test_frozen_encoder_params_are_not_in_the_optimiser(frozen_cnn):
    from ghist._model._module import GHISTModule

    _, _, model = frozen_cnn
    module = GHISTModule(model.network, expr_scale=model.expr_scale)
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    encoder = {id(p) for p in model.network.feature_encoder.model.parameters()}
    assert not optimised & encoder
    assert {id(p) for p in model.network.feature_encoder.project.parameters()} <= optimised


@pytest.mark.slow
def test_trainable_vit_encoder_learns_and_changes(trainable_vit):
    mine, before, model = trainable_vit
    _losses_fell(model)
    after = _params(model.network.feature_encoder.model)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())  # the caller's module is a copy
    settings = model.init_params_["encoder"]
    assert settings["num_prefix_tokens"] == 3
    assert settings["patch_grid"] == [8, 8]
    assert settings["output"] == "tokens"


def _accuracy(model, dataset) -> float:
    from ghist._model._data import collate_tiles

    batch = collate_tiles([dataset[i] for i in range(len(dataset))])
    with torch.inference_mode():
        out = model.network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
    known = batch["cell_type"] >= 0
    return float((out["cell_logits"].argmax(-1)[known] == batch["cell_type"][known]).float().mean())


@pytest.mark.slow  # trains
@pytest.mark.parametrize("which", ["frozen_cnn", "trainable_vit"])
def test_encoder_models_beat_chance(which, request, tiles):
    _, _, model = request.getfixturevalue(which)
    chance = 1.0 / len(tiles.cell_types)
    assert _accuracy(model, tiles.train) > 2 * chance
    assert _accuracy(model, tiles.test) > chance  # 4 held-out tiles (56 cells): noisy, but above chance


# the fine-tuned ViT's fixture trains its encoder too (about 19 s): slow tier
@pytest.mark.parametrize("which", ["frozen_cnn", pytest.param("trainable_vit", marks=pytest.mark.slow)])
def test_save_load_roundtrip_gives_identical_predictions(which, request, test_sdata, tmp_path):
    mine, _, model = request.getfixturevalue(which)
    model.save(tmp_path / "m")
    arch = type(mine)()  # same architecture, other random weights: the saved ones are loaded
    loaded = ghist.GHISTModel.load(tmp_path / "m", encoder=arch)
    assert loaded.init_params_ == model.init_params_
    a = _predict(test_sdata, model, "a")
    b = _predict(test_sdata, loaded, "b")
    assert a.n_obs > 0
    np.testing.assert_array_equal(a.X, b.X)
    saved = model.network.feature_encoder.model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.network.feature_encoder.model.state_dict().items())
    assert loaded.network.feature_encoder.model is not arch


@pytest.mark.slow
def test_load_without_or_with_a_wrong_encoder_errors(frozen_cnn, tmp_path):
    _, _, model = frozen_cnn
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"custom encoder 'my-cnn'.*encoder=MyEncoder"):
        ghist.GHISTModel.load(tmp_path / "m")
    with pytest.raises(ValueError, match=r"SmallViT.*SmallCNN"):
        ghist.GHISTModel.load(tmp_path / "m", encoder=SmallViT())
    with pytest.raises(ValueError, match=r"out_dim=4.*8"):
        ghist.GHISTModel.load(tmp_path / "m", encoder=SmallCNN(channels=4))


def test_load_checks_encoder_weight_shapes(tmp_path):
    torch.manual_seed(0)
    model = ghist.GHISTModel(["A", "B"], ["x", "y"], width=4, embed_dim=8, tile_size=32, **_encoder_args(SmallCNN()))
    model.save(tmp_path / "m")
    other = SmallCNN()
    other.body[0] = nn.Conv2d(3, 8, 5, stride=2, padding=2)  # same output, other kernel
    with pytest.raises(ValueError, match=r"other shapes: \['body.0.weight"):
        ghist.GHISTModel.load(tmp_path / "m", encoder=other)


def _encoder_args(module):
    from ghist._model._encoder import prepare_encoder

    module, config = prepare_encoder(module)
    return {"encoder": config, "encoder_module": module}


def test_model_without_encoder_refuses_one_at_load(tmp_path):
    ghist.GHISTModel(["A"], width=4, embed_dim=8, tile_size=32).save(tmp_path / "m")
    assert "encoder" not in ghist.GHISTModel.load(tmp_path / "m").init_params_
    with pytest.raises(ValueError, match="has no encoder"):
        ghist.GHISTModel.load(tmp_path / "m", encoder=SmallCNN())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_FIT_ENCODER",))


def test_fit_refuses_a_malicious_weights_file_before_training(tiles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"body.0.weight": _Exploit()}, fh)
    with pytest.raises(ValueError, match="cannot be read safely"):
        ghist.tl.fit(tiles, encoder=SmallCNN(), encoder_weights=tmp_path / "pytorch_model.bin", **FIT)
    assert not (tmp_path / "PWNED_BY_FIT_ENCODER").exists()
    with pytest.raises(ValueError, match="without an `encoder`"):
        ghist.tl.fit(tiles, encoder_weights=tmp_path / "pytorch_model.bin", **FIT)


# ---------------------------------------------------------------------------------------------- timm by name
class FakeTimmViT(nn.Module):
    """What timm gives: forward pools to (B, C); forward_features gives tokens; num_prefix_tokens says how many."""

    def __init__(self, dim: int = 16, patch: int = 8, reg_tokens: int = 0, **kwargs):
        super().__init__()
        self.vit = SmallViT(dim, patch)
        self.num_prefix_tokens = 3
        self.kwargs = kwargs

    def forward_features(self, x):
        return self.vit(x)

    def forward(self, x):
        return self.forward_features(x)[:, 0]


FakeTimmViT.__module__ = "timm.models.fake"


@pytest.fixture
def fake_timm(monkeypatch):
    """timm cannot be imported beside this torch (torchvision's operators fail): a stand-in with its API."""
    calls = []

    def create_model(name, pretrained=False, num_classes=1000, **kwargs):
        assert pretrained is False, "ghist must never ask timm to download weights"
        calls.append({"name": name, "num_classes": num_classes, **kwargs})
        if name not in ("fake_vit_tiny", "vit_giant_patch14_224"):
            raise RuntimeError(f"Unknown model ({name})")
        return FakeTimmViT(**kwargs)

    timm = types.ModuleType("timm")
    timm.create_model = create_model
    layers = types.ModuleType("timm.layers")
    layers.SwiGLUPacked = type("SwiGLUPacked", (), {})
    timm.layers = layers
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.layers", layers)
    return calls


@pytest.mark.slow
def test_timm_name_with_local_weights_fits_saves_and_rebuilds(fake_timm, tiles, test_sdata, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.manual_seed(5)
    state = FakeTimmViT().state_dict()
    torch.save(state, path)
    model = ghist.tl.fit(
        tiles,
        encoder="fake_vit_tiny",
        encoder_weights=path,
        encoder_options={"timm_kwargs": {"dim": 16}},
        **{**FIT, "max_epochs": 2},  # the name -> model -> weights -> features path; learning is tested above
    )
    assert fake_timm[0] == {"name": "fake_vit_tiny", "num_classes": 0, "dim": 16}
    got = model.network.feature_encoder.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())  # frozen: still the file's weights
    settings = model.init_params_["encoder"]
    assert settings["kind"] == "timm"
    assert settings["name"] == "fake_vit_tiny"
    assert settings["num_prefix_tokens"] == 3
    model.save(tmp_path / "m")
    loaded = ghist.GHISTModel.load(tmp_path / "m")  # rebuilt by name, weights from the model file
    assert fake_timm[-1] == {"name": "fake_vit_tiny", "num_classes": 0, "dim": 16}
    np.testing.assert_array_equal(_predict(test_sdata, model, "a").X, _predict(test_sdata, loaded, "b").X)
    monkeypatch_timm_missing = pytest.MonkeyPatch()
    monkeypatch_timm_missing.setitem(sys.modules, "timm", None)
    try:
        with pytest.raises(ImportError, match=r"ghist\[encoders\]"):
            ghist.GHISTModel.load(tmp_path / "m")
    finally:
        monkeypatch_timm_missing.undo()


def test_timm_presets_map_hub_names_offline(fake_timm, tmp_path):
    from ghist._model._encoder import PRESETS, prepare_encoder

    path = tmp_path / "w.bin"
    torch.save(FakeTimmViT().state_dict(), path)
    _, config = prepare_encoder("hf-hub:MahmoodLab/UNI2-h", weights=path)
    call = fake_timm[-1]
    assert call["name"] == "vit_giant_patch14_224"
    assert call["reg_tokens"] == 8
    assert call["num_classes"] == 0
    assert call["mlp_layer"] is sys.modules["timm.layers"].SwiGLUPacked
    assert call["act_layer"] is torch.nn.SiLU
    assert config["input_size"] == 224
    assert config["mean"] == list(PRESETS["hf-hub:MahmoodLab/UNI2-h"]["mean"])
    with pytest.raises(ValueError, match="never downloads"):
        prepare_encoder("hf-hub:someone/unknown-model", weights=path)
    with pytest.raises(ValueError, match="needs `encoder_weights`"):
        prepare_encoder("fake_vit_tiny")
    torch.save({"nope": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="do not fit the encoder"):
        prepare_encoder("fake_vit_tiny", weights=tmp_path / "other.bin")
    with pytest.raises(ValueError, match="JSON values only"):
        prepare_encoder("fake_vit_tiny", weights=path, options={"timm_kwargs": {"act_layer": torch.nn.SiLU}})


def test_timm_name_without_timm_says_how_to_install(monkeypatch, tmp_path):
    from ghist._model._encoder import prepare_encoder

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install 'ghist\[encoders\]'"):
        prepare_encoder("vit_small_patch16_224", weights=tmp_path / "w.bin")


@pytest.mark.slow
def test_module_deepcopy_is_what_trains(trainable_vit):
    mine, _, model = trainable_vit
    assert model.network.feature_encoder.model is not mine
    assert copy.deepcopy(model.network.feature_encoder.config) == model.init_params_["encoder"]
