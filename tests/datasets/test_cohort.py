from __future__ import annotations

import warnings

import numpy as np
import pytest
from anndata import AnnData

import ghist
from ghist._constants import XENIUM_BREAST_CELL_TYPES

N = 24
SIZE = 112


@pytest.fixture(scope="module")
def cohort():
    return ghist.datasets.synthetic_cohort(N, image_size=SIZE, hazard_ratio=4.0, seed=0, progress=False)


def test_slides_are_he_only(cohort):
    slides, clinical = cohort
    assert list(slides) == list(clinical.index) == [f"P{i:03d}" for i in range(N)]
    for sdata in slides.values():
        assert list(sdata.images) == ["he"]
        assert list(sdata.labels) == ["nuclei"]
        assert list(sdata.tables) == []
        assert sdata.images["he"].shape == (3, SIZE, SIZE)
    n_labels = [int(np.unique(sdata.labels["nuclei"].values).size - 1) for sdata in slides.values()]
    assert n_labels == list(clinical["n_cells"])


def test_clinical_columns(cohort):
    _, clinical = cohort
    assert clinical.index.name == "patient"
    assert (clinical["time"] > 0).all()
    assert clinical["time"].max() <= 200.0
    assert set(clinical["event"].unique()) == {0, 1}
    props = clinical[[f"true_prop:{t}" for t in XENIUM_BREAST_CELL_TYPES]]
    np.testing.assert_allclose(props.sum(axis=1), 1.0)
    assert clinical.attrs["causal_feature"] == "prop:Macrophage"
    assert clinical.attrs["hazard_ratio"] == 4.0


def test_proportions_vary_by_patient(cohort):
    _, clinical = cohort
    props = clinical.filter(like="true_prop:")
    for t in ("Macrophage", "T", "Fibroblast"):
        col = props[f"true_prop:{t}"]
        assert col.std() / col.mean() > 0.15, t
    assert props.round(6).drop_duplicates().shape[0] == N


def test_deterministic(cohort):
    slides, clinical = cohort
    again, clinical2 = ghist.datasets.synthetic_cohort(3, image_size=SIZE, hazard_ratio=4.0, seed=0, progress=False)
    for pid in again:  # a patient's slide depends on the seed and its index only
        np.testing.assert_array_equal(again[pid].images["he"].values, slides[pid].images["he"].values)
        np.testing.assert_array_equal(again[pid].labels["nuclei"].values, slides[pid].labels["nuclei"].values)
    np.testing.assert_allclose(clinical2.filter(like="true_prop:"), clinical.filter(like="true_prop:").iloc[:3])
    other, _ = ghist.datasets.synthetic_cohort(3, image_size=SIZE, seed=1, progress=False)
    assert not np.array_equal(other["P000"].labels["nuclei"].values, slides["P000"].labels["nuclei"].values)


def test_planted_feature_drives_survival(cohort):
    _, clinical = cohort
    props = clinical.filter(like="true_prop:")
    adata = AnnData(X=props.to_numpy(), obs=clinical[["time", "event"]].copy())
    adata.var_names = [c.replace("true_prop:", "prop:") for c in props.columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a type absent from every tiny slide cannot be fitted
        res = ghist.tl.survival(adata, duration_key="time", event_key="event", progress=False)
    causal = clinical.attrs["causal_feature"]
    assert res.index[0] == causal
    assert res.loc[causal, "hr"] > 1
    assert res.loc[causal, "q"] < 0.05


def test_hazard_ratio_changes_only_survival(cohort):
    _, planted = cohort
    _, clinical = ghist.datasets.synthetic_cohort(N, image_size=SIZE, hazard_ratio=1.0, seed=0, progress=False)
    # Same slides, same random draws: only the hazard differs.
    np.testing.assert_allclose(clinical.filter(like="true_prop:"), planted.filter(like="true_prop:"))
    assert not np.allclose(clinical["time"], planted["time"])


def test_errors():
    with pytest.raises(ValueError, match="causal_type"):
        ghist.datasets.synthetic_cohort(4, causal_type="Neuron")
    with pytest.raises(ValueError, match="n_patients"):
        ghist.datasets.synthetic_cohort(1)
    with pytest.raises(ValueError, match="hazard_ratio"):
        ghist.datasets.synthetic_cohort(4, hazard_ratio=0)


def test_synthetic_type_weights():
    def share(**weights):
        sdata = ghist.datasets.synthetic(image_size=192, n_genes=1, seed=5, type_weights=weights or None)
        return sdata.tables["table"].obs["cell_type"].value_counts(normalize=True)

    base, more, fewer = share(), share(Macrophage=3.0), share(Macrophage=1 / 3)
    assert fewer["Macrophage"] < base["Macrophage"] < more["Macrophage"]
    assert more["T"] < base["T"]  # the other types of mixed compartments make room
    with pytest.raises(ValueError, match="unknown types"):
        ghist.datasets.synthetic(image_size=64, type_weights={"Neuron": 2.0})
    with pytest.raises(ValueError, match="> 0"):
        ghist.datasets.synthetic(image_size=64, type_weights={"T": 0.0})
