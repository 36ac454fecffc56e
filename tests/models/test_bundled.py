"""The model shipped with ghist: its files, its card, and ``predict`` / ``predict_cohort`` with no model."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from spatialdata import SpatialData

import ghist
from ghist._bundled_models import get_bundled

NAME = ghist.models.DEFAULT_MODEL


@pytest.fixture(scope="module")
def bundled():
    return ghist.models.load(NAME)


@pytest.fixture
def he_only():
    sdata = ghist.datasets.synthetic(image_size=512, seed=3)
    return SpatialData(images={"he": sdata.images["he"]}, labels={"nuclei": sdata.labels["nuclei"]})


def test_available_describes_the_shipped_model():
    table = ghist.models.available()
    assert isinstance(table, pd.DataFrame)
    row = table.loc[NAME]
    assert bool(row["default"])
    assert row["n_genes"] == 250
    assert row["pixel_size"] == pytest.approx(2.75)
    # "a few MB": package data every user downloads
    assert 0 < row["size_mb"] < 10
    assert "HER2ST" in row["trained_on"]


def test_bundled_model_keeps_the_settings_it_was_trained_with(bundled):
    # trained before these settings existed, i.e. with ReLU and no morphometrics; its file does not name them
    saved = get_bundled(NAME).settings()["init_params"]
    assert "output_activation" not in saved
    assert "morphometrics" not in saved
    assert "cell_offset" not in saved
    assert bundled.init_params_["output_activation"] == "relu"
    assert bundled.init_params_["morphometrics"] is False
    assert bundled.init_params_["cell_offset"] is False


def test_card_has_what_a_user_must_read():
    card = ghist.models.card(NAME)
    for needed in ("Andersson", "Intended use", "Limitations", "leave-one-section-out", "ridge", "| **mean** |"):
        assert needed in card, needed
    # every cross-validation fold is reported, held-out section by section
    for section in ("B4", "C2", "C3", "C4"):
        assert f"| {section} |" in card


def test_bundled_model_beats_ridge_on_every_fold_of_its_card():
    rows = [
        line
        for line in ghist.models.card(NAME).splitlines()
        if line.startswith("| ") and line[2:4] in {"B4", "C2", "C3", "C4"}
    ]
    assert len(rows) == 4
    margins = [float(row.strip("|").split("|")[3]) for row in rows]
    assert all(m > 0 for m in margins), rows


def test_load_gives_a_trained_float32_model(bundled):
    assert isinstance(bundled, ghist.GHISTModel)
    assert len(bundled.genes) == 250
    assert bundled.pixel_size == pytest.approx(2.75)
    # stored in float16 to keep the package small, loaded as the network's float32
    assert {p.dtype for p in bundled.network.parameters()} == {torch.float32}
    assert not bundled.network.training
    assert "ERBB2" in bundled.genes  # the HER2 gene of HER2-positive breast cancer


def test_predict_with_no_model_uses_the_bundled_one(he_only, caplog):
    n_nuclei = len(np.unique(np.asarray(he_only.labels["nuclei"]))) - 1
    with caplog.at_level(logging.INFO, logger="ghist"):
        table = ghist.tl.predict(he_only, progress=False)
    assert NAME in caplog.text
    assert "HER2ST" in caplog.text
    assert he_only.tables["ghist"] is table
    assert table.n_obs >= 0.9 * n_nuclei
    assert table.n_vars == 250
    assert np.isfinite(table.X).all()
    # Every gene's spread varies from cell to cell, without a few cells dominating it: a variance head with its
    # units switched off (an earlier bundled model: coefficients of variation 0 to ~4) fails both.
    spread = np.asarray(table.layers["ghist_std"])
    variation = spread.std(axis=0) / spread.mean(axis=0)
    assert variation.min() > 0.02
    assert np.median(variation) < 1
    # a spot model gives no cell types, only expression; the values still differ between cells
    assert np.asarray(table.X).std(axis=0).mean() > 0


def test_predict_by_name_equals_predict_with_the_loaded_model(he_only, bundled):
    by_name = ghist.tl.predict(he_only, NAME, key_added="by_name", progress=False)
    loaded = ghist.tl.predict(he_only, bundled, key_added="loaded", progress=False)
    np.testing.assert_allclose(np.asarray(by_name.X), np.asarray(loaded.X), rtol=1e-5, atol=1e-6)


def test_predict_cohort_with_no_model(he_only, caplog):
    with caplog.at_level(logging.INFO, logger="ghist"):
        cohort = ghist.tl.predict_cohort({"s1": he_only}, gene_sets={"her2": ["ERBB2", "GRB7"]}, progress=False)
    assert NAME in caplog.text
    assert list(cohort.obs_names) == ["s1"]
    assert "expr:ERBB2" in cohort.var_names
    assert np.isfinite(cohort[:, "score:her2"].X).all()


# ------------------------------------------------------------------------------ model= names, paths and errors


@pytest.fixture
def saved_small(tmp_path):
    model = ghist.GHISTModel(["EPCAM", "PTPRC"], ["Malignant", "T"], width=4, embed_dim=8, tile_size=32)
    model.save(tmp_path / "small")
    return tmp_path / "small"


def test_load_accepts_a_saved_folder(saved_small):
    model = ghist.models.load(saved_small)
    assert model.genes == ["EPCAM", "PTPRC"]
    assert ghist.models.load(str(saved_small)).cell_types == ["Malignant", "T"]


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(FileNotFoundError, match=NAME):
        ghist.models.load("no-such-model")
    with pytest.raises(KeyError, match=NAME):
        ghist.models.card("no-such-model")


def test_name_that_is_also_a_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    with pytest.raises(ValueError, match="both"):
        ghist.models.load(NAME)


@pytest.mark.parametrize("bad", [3, ["her2st"], 2.75])
def test_model_of_the_wrong_kind(bad, he_only):
    with pytest.raises(TypeError, match="GHISTModel"):
        ghist.tl.predict(he_only, bad, progress=False)
    with pytest.raises(TypeError, match="GHISTModel"):
        ghist.tl.predict_cohort({"s1": he_only}, bad, progress=False)
