from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from spatialdata.models import TableModel

import ghist


@pytest.fixture(scope="module")
def sdata():
    """Synthetic slide with a 'prediction' table: the measured types, a fifth of the cells relabelled."""
    sdata = ghist.datasets.synthetic(image_size=160, n_genes=5, seed=2)
    true = sdata.tables["table"]
    true.obs["band"] = pd.Categorical(np.where(true.obsm["spatial"][:, 1] < 80, "top", "bottom"))
    types = true.obs["cell_type"]
    rng = np.random.default_rng(0)
    flip = rng.random(true.n_obs) < 0.2
    pred_types = np.where(flip, rng.choice(types.cat.categories, true.n_obs), types.astype(str))
    # Reverse the cell order so that rows must be matched by label id, not by position.
    obs = true.obs[["region", "cell_id"]].iloc[::-1].copy()
    obs["ghist_cell_type"] = pd.Categorical(pred_types[::-1], categories=types.cat.categories)
    pred = AnnData(X=np.zeros((true.n_obs, 5), np.float32), obs=obs)
    sdata.tables["ghist"] = TableModel.parse(pred, region="nuclei", region_key="region", instance_key="cell_id")
    return sdata


def _pred_heights(ax: plt.Axes, n_types: int) -> np.ndarray:
    """Bar heights of the predicted bars: groups x types (the first ``n_types`` containers)."""
    return np.array([[bar.get_height() for bar in container] for container in ax.containers[:n_types]]).T


def test_slide_png(sdata, tmp_path):
    path = tmp_path / "figs" / "composition.png"
    ax = ghist.pl.composition(sdata, true_key="table", save=path)
    assert path.stat().st_size > 5000
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    types = list(sdata.tables["table"].obs["cell_type"].cat.categories)
    expected = sdata.tables["ghist"].obs["ghist_cell_type"].value_counts(normalize=True).reindex(types, fill_value=0)
    np.testing.assert_allclose(_pred_heights(ax, len(types))[0], expected.to_numpy())
    assert len(ax.containers) == 2 * len(types)  # predicted and measured bars
    assert "Pearson r" in ax.get_title()
    plt.close("all")


def test_perfect_prediction_scores_one(sdata):
    perfect = sdata.tables["table"].copy()
    perfect.obs["ghist_cell_type"] = perfect.obs["cell_type"]
    sdata.tables["perfect"] = perfect
    try:
        ax = ghist.pl.composition(sdata, pred_key="perfect", true_key="table", show=False)
    finally:
        del sdata.tables["perfect"]
    assert "Pearson r = 1.00, mean |difference| = 0.000" in ax.get_title()
    plt.close("all")


def test_groupby_from_measured_table(sdata):
    # "band" lives only in the measured table: predicted cells get it through their label ids.
    ax = ghist.pl.composition(sdata, true_key="table", groupby="band", show=False)
    true, pred = sdata.tables["table"].obs, sdata.tables["ghist"].obs
    types = list(true["cell_type"].cat.categories)
    band = pred["cell_id"].map(dict(zip(true["cell_id"], true["band"].astype(str))))
    heights = _pred_heights(ax, len(types))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bottom", "top"]
    for i, name in enumerate(["bottom", "top"]):
        sel = (band == name).to_numpy()
        expected = pred["ghist_cell_type"][sel].value_counts(normalize=True).reindex(types, fill_value=0)
        np.testing.assert_allclose(heights[i], expected.to_numpy())
    plt.close("all")


def test_cohort_anndata(tmp_path):
    types = ["B", "Malignant", "T"]
    rng = np.random.default_rng(0)
    props = rng.dirichlet(np.ones(3), size=5)
    adata = AnnData(
        X=np.c_[np.full(5, 100.0), props, rng.random((5, 2))],
        obs=pd.DataFrame({"arm": ["a", "b", "a", "b", "a"]}, index=[f"S{i}" for i in range(5)]),
        var=pd.DataFrame(index=["n_cells", *[f"prop:{t}" for t in types], "expr:G1", "expr:G2"]),
    )
    for j, t in enumerate(types):
        adata.obs[f"true_prop:{t}"] = props[:, j]
    path = tmp_path / "cohort.png"
    ax = ghist.pl.composition(adata, true_key="true_prop", save=path)
    assert path.stat().st_size > 5000
    np.testing.assert_allclose(_pred_heights(ax, 3), props)
    assert "Pearson r = 1.00" in ax.get_title()
    plt.close("all")

    ax = ghist.pl.composition(adata, groupby="arm", show=False)
    arm = adata.obs["arm"].to_numpy()
    np.testing.assert_allclose(_pred_heights(ax, 3), [props[arm == "a"].mean(0), props[arm == "b"].mean(0)])
    plt.close("all")


def test_errors(sdata):
    with pytest.raises(KeyError, match=r"ghist\.tl\.predict"):
        ghist.pl.composition(sdata, pred_key="nope", show=False)
    with pytest.raises(KeyError, match="'nope' not found"):
        ghist.pl.composition(sdata, true_key="table", groupby="nope", show=False)
    with pytest.raises(KeyError, match="cell_type"):
        ghist.pl.composition(sdata, true_key="table", cell_type_key="missing", show=False)
    with pytest.raises(ValueError, match="prop:"):
        ghist.pl.composition(AnnData(np.ones((2, 1))), show=False)
    with pytest.raises(TypeError):
        ghist.pl.composition(np.ones(3), show=False)
    plt.close("all")
