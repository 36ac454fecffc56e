from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ghist.pp import reference_profiles


def _reference(seed: int = 0, *, sparse: bool = True, n_cells: int = 60) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(1.0, 2.0, size=(1, 7)), size=(n_cells, 7)).astype(np.float32)
    groups = pd.Categorical(rng.choice(["T", "B", "Malignant"], size=n_cells), categories=["Malignant", "T", "B", "NK"])
    obs = pd.DataFrame({"cell_type": groups, "batch": rng.choice(["b2", "b1"], size=n_cells)})
    obs.index = [f"cell{i}" for i in range(n_cells)]
    var = pd.DataFrame(index=[f"G{i}" for i in range(7)])
    return ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, obs=obs, var=var)


def _expected(adata: ad.AnnData, groupby: str, genes=None) -> pd.DataFrame:
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    frame = pd.DataFrame(np.log1p(X), columns=adata.var_names)
    if genes is not None:
        frame = frame[genes]
    return frame.groupby(adata.obs[groupby].astype(str).to_numpy()).mean()


@pytest.mark.parametrize("sparse", [True, False])
def test_profiles_are_group_means_of_log1p(sparse):
    adata = _reference(sparse=sparse)
    ref = reference_profiles(adata, "cell_type")
    # categorical: category order, empty categories ("NK") left out
    assert list(ref.obs_names) == ["Malignant", "T", "B"]
    assert list(ref.var_names) == list(adata.var_names)
    assert ref.X.dtype == np.float32
    expected = _expected(adata, "cell_type").loc[ref.obs_names]
    np.testing.assert_allclose(ref.X, expected.to_numpy(), rtol=1e-5)
    counts = adata.obs["cell_type"].value_counts()
    assert ref.obs["n_cells"].to_dict() == {k: counts[k] for k in ref.obs_names}
    assert ref.uns["ghist"]["params"]["groupby"] == "cell_type"


def test_mean_of_log_not_log_of_mean():
    adata = ad.AnnData(
        X=np.array([[0.0], [8.0]], dtype=np.float32),
        obs=pd.DataFrame({"g": ["a", "a"]}, index=["c0", "c1"]),
        var=pd.DataFrame(index=["G"]),
    )
    ref = reference_profiles(adata, "g")
    assert ref.X[0, 0] == pytest.approx(np.log1p(8.0) / 2)  # not log1p(4)


def test_string_groups_are_sorted_and_genes_subset():
    adata = _reference(1)
    ref = reference_profiles(adata, "batch", genes=["G5", "G0"])
    assert list(ref.obs_names) == ["b1", "b2"]
    assert list(ref.var_names) == ["G5", "G0"]
    expected = _expected(adata, "batch", ["G5", "G0"]).loc[["b1", "b2"]]
    np.testing.assert_allclose(ref.X, expected.to_numpy(), rtol=1e-5)


def test_missing_groups_and_layer():
    adata = _reference(2)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.toarray() / 3.0  # normalised: not what the profiles use
    adata.obs.loc[adata.obs_names[:5], "cell_type"] = np.nan
    ref = reference_profiles(adata, "cell_type", layer="counts")
    keep = adata.obs["cell_type"].notna().to_numpy()
    assert ref.obs["n_cells"].sum() == keep.sum()
    kept = adata[keep].copy()
    kept.X = kept.layers["counts"]
    np.testing.assert_allclose(ref.X, _expected(kept, "cell_type").loc[ref.obs_names].to_numpy(), rtol=1e-5)


def test_input_not_modified():
    adata = _reference(3)
    before = adata.copy()
    reference_profiles(adata, "cell_type", genes=["G1"])
    assert (adata.X != before.X).nnz == 0
    assert adata.obs.equals(before.obs)
    assert adata.shape == before.shape


def test_warns_on_non_counts(caplog):
    adata = _reference(4)
    adata.X = adata.X.toarray() * 0.37
    ghist_logger = logging.getLogger("ghist")
    ghist_logger.propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="ghist"):
            reference_profiles(adata, "cell_type")
    finally:
        ghist_logger.propagate = False
    assert "raw counts" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "change", "error", "match"),
    [
        ({"groupby": "celltype"}, None, KeyError, "'celltype'"),
        ({"groupby": "cell_type", "genes": ["G1", "EPCAM"]}, None, KeyError, "'EPCAM'"),
        ({"groupby": "cell_type", "layer": "raw"}, None, KeyError, "'raw'"),
        ({"groupby": "cell_type"}, "nan", ValueError, "NaN"),
        ({"groupby": "cell_type"}, "negative", ValueError, "negative"),
        ({"groupby": "cell_type"}, "all_missing", ValueError, "no non-missing group"),
    ],
)
def test_bad_inputs(kwargs, change, error, match):
    adata = _reference(5, sparse=False)
    if change == "nan":
        adata.X[3, 1] = np.nan
    elif change == "negative":
        adata.X[3, 1] = -1
    elif change == "all_missing":
        adata.obs["cell_type"] = pd.Categorical([np.nan] * adata.n_obs, categories=["T"])
    with pytest.raises(error, match=match):
        reference_profiles(adata, **kwargs)


def test_not_an_anndata():
    with pytest.raises(TypeError, match="AnnData"):
        reference_profiles(pd.DataFrame({"a": [1]}), "a")
