"""The declared settings: one place for each option's default, range and documentation, used by fit, the model,
the network and ``model.json``."""

from __future__ import annotations

import dataclasses
import inspect
import math
from datetime import timedelta

import pytest

import ghist
from ghist._model._spec import (
    OUTPUT_ACTIVATION_CHOICES,
    ArchitectureSpec,
    SettingError,
    TrainingSpec,
    default_output_activation,
    fit_options,
    split_fit_options,
)

# fit's keyword defaults before the settings were declared in one place (ghist 0.2's signature, by hand): the spec
# must keep every one of them.
OLD_FIT_DEFAULTS = {
    "width": 64,
    "embed_dim": 256,
    "max_steps": None,
    "max_epochs": None,
    "max_time": None,
    "early_stopping": True,
    "patience": None,
    "batch_size": 8,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "augment": True,
    "color_jitter": 0.0,
    "stain_jitter": 0.0,
    "accelerator": "auto",
    "devices": "auto",
    "strategy": "auto",
    "precision": None,
    "seed": 0,
    "pixel_size": None,
    "num_workers": 0,
    "progress": True,
    "context_neighbours": 0,
    "output_activation": None,
    "loss_weights": None,
    "morphometrics": False,
    "cell_offset": False,
    "readout": True,
}
FIT_OWN = {
    "tiles",
    "reference",
    "reference_groupby",
    "cell_type_groups",
    "checkpoint_dir",
    "resume",
    "encoder",
    "encoder_weights",
    "encoder_trainable",
    "encoder_options",
    "trainer_kwargs",
}


def test_fit_signature_is_the_spec_with_the_old_defaults():
    params = inspect.signature(ghist.tl.fit).parameters
    spec_names = {f.name for f in fit_options()}
    assert set(params) == FIT_OWN | spec_names  # fit's keywords are its own and the specs', nothing else
    assert set(OLD_FIT_DEFAULTS) <= spec_names  # a new option adds a keyword; none of these may change
    for name, default in OLD_FIT_DEFAULTS.items():
        assert params[name].default == default, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_fit_docstring_is_written_from_the_spec():
    doc = inspect.getdoc(ghist.tl.fit)
    for f in fit_options():
        first_line = inspect.cleandoc(f.metadata["doc"]).splitlines()[0]
        assert f"\n{f.name}\n    {first_line}" in doc, f.name
    assert "{fit_options}" not in doc


def test_fit_keywords_map_onto_the_specs_in_one_place():
    arch, run, rest = split_fit_options({"width": 8, "lr": 0.01, "readout": False, "gradient_clip_val": 1.0})
    assert arch["width"] == 8
    assert arch["output_activation"] is None  # fit picks the activation from the tiles
    assert isinstance(run, TrainingSpec)
    assert run.lr == 0.01
    assert run.readout is False
    assert rest == {"gradient_clip_val": 1.0}


def test_the_output_activation_is_decided_in_the_spec():
    """Its default by supervision is one mapping in the spec: the field's default, fit's choice, the network's."""
    from ghist._model._network import OUTPUT_ACTIVATIONS, ExpressionHead

    assert set(OUTPUT_ACTIVATIONS) == set(OUTPUT_ACTIVATION_CHOICES)  # every name the spec accepts has a function
    assert (default_output_activation(spots=False), default_output_activation(spots=True)) == ("softplus", "relu")
    assert ArchitectureSpec().output_activation == default_output_activation(spots=False)
    head = ExpressionHead(8, 3, 8, hidden=8, n_tokens=1, token_dim=8, n_heads=1)
    assert head.activation is OUTPUT_ACTIVATIONS[default_output_activation(spots=False)]


def test_model_and_network_share_the_spec():
    model = ghist.GHISTModel(["A", "B"], ["x", "y"], width=4, embed_dim=8, tile_size=32, morphometrics=True)
    assert model.spec is model.network.spec
    assert model.spec == ArchitectureSpec(width=4, embed_dim=8, tile_size=32, morphometrics=True)
    assert model.network.morphometrics
    saved = model._to_state()["settings"]["init_params"]
    assert {k: saved[k] for k in ArchitectureSpec.names()} == model.spec.to_json()
    with pytest.raises(TypeError, match="width"):  # an unknown setting names the known ones
        ghist.GHISTModel(["A"], widht=4)


@pytest.mark.parametrize(
    ("settings", "culprit"),
    [
        ({"width": 2000}, "width"),
        ({"width": 4.0}, "width"),
        ({"embed_dim": 10**6}, "embed_dim"),
        ({"tile_size": 40000}, "tile_size"),
        ({"tile_size": 16}, "tile_size"),
        ({"mean": (float("nan"), 0.0, 0.0)}, "mean[0]"),
        ({"std": (1.0, math.inf, 1.0)}, "std[1]"),
        ({"std": (1.0, 1.0)}, "std"),
        ({"mean": (300.0, 0.0, 0.0)}, "mean[0]"),
        ({"pixel_size": float("nan")}, "pixel_size"),
        ({"pixel_size": 1e30}, "pixel_size"),
        ({"expr_scale": float("inf")}, "expr_scale"),
        ({"context_neighbours": -1}, "context_neighbours"),
        ({"output_activation": "tanh"}, "output_activation"),
        ({"morphometrics": "yes"}, "morphometrics"),
    ],
)
def test_architecture_ranges(settings, culprit):
    with pytest.raises(SettingError, match=culprit.replace("[", r"\[")):
        ArchitectureSpec(**settings)


@pytest.mark.parametrize(
    ("settings", "culprit"),
    [
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"color_jitter": 1.0}, "color_jitter"),
        ({"max_time": 60}, "max_time"),
        ({"precision": "fp8"}, "precision"),
        ({"progress": 1}, "progress"),
        ({"accelerator": "tpu"}, "accelerator"),
    ],
)
def test_training_ranges(settings, culprit):
    with pytest.raises(ValueError, match=culprit):
        TrainingSpec(**settings)


def test_specs_are_frozen_and_normalised():
    run = TrainingSpec(max_time="00:01:30", loss_weights={"expr_pearson": 1})
    assert run.max_time == timedelta(minutes=1, seconds=30)
    assert run.loss_weights == {"expr_pearson": 1.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.lr = 1.0  # type: ignore[misc]
    assert ArchitectureSpec(mean=[1, 2, 3]).mean == (1.0, 2.0, 3.0)


def test_older_files_get_the_values_they_were_trained_with():
    spec = ArchitectureSpec.from_saved({"width": 16, "tile_size": 64})
    assert spec.output_activation == "relu"  # before the setting existed, the network used ReLU
    assert (spec.morphometrics, spec.cell_offset, spec.readout, spec.context_neighbours) == (False, False, False, 0)
    with pytest.raises(SettingError, match="unknown model settings"):
        ArchitectureSpec.from_saved({"width": 16, "depth": 3})
