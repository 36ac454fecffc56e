from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from scipy import sparse

import ghist


def simulate_cohort(
    n: int = 200, n_features: int = 8, beta: float = 0.8, seed: int = 0, censor_rate: float = 0.05
) -> ad.AnnData:
    """Exponential survival whose hazard is 0.1 * exp(beta * x0); x1.. are noise; exponential censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    hazard = 0.1 * np.exp(beta * x[:, 0])
    t = rng.exponential(1 / hazard)
    c = rng.exponential(1 / censor_rate, size=n)
    obs = pd.DataFrame(
        {"time": np.minimum(t, c), "event": (t <= c).astype(int)}, index=[f"patient{i}" for i in range(n)]
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"f{j}" for j in range(n_features)]))


@pytest.fixture(scope="module")
def cohort() -> ad.AnnData:
    return simulate_cohort()


def test_planted_signal_is_found(cohort):
    res = ghist.tl.survival(cohort, duration_key="time", event_key="event", progress=False)
    assert list(res.columns) == ["feature", "hr", "ci_lower", "ci_upper", "coef", "se", "p", "q", "n", "n_events"]
    assert res.index[0] == "f0"
    assert res["feature"].iloc[0] == "f0"
    assert res.loc["f0", "q"] < 0.05
    assert (res.drop(index="f0")["q"] >= 0.05).all()
    # per-SD hazard ratio of the planted feature is close to exp(0.8) and inside its own CI
    f0 = res.loc["f0"]
    assert 1.6 < f0["hr"] < 2.8
    assert f0["ci_lower"] < f0["hr"] < f0["ci_upper"]
    assert np.isclose(f0["hr"], np.exp(f0["coef"]))
    assert res["p"].is_monotonic_increasing
    assert (res["q"] >= res["p"]).all()
    assert (res["n"] == cohort.n_obs).all()
    assert (res["n_events"] == cohort.obs["event"].sum()).all()


def test_matches_lifelines_directly(cohort):
    res = ghist.tl.survival(cohort, duration_key="time", event_key="event", features=["f2"], progress=False)
    x = cohort[:, "f2"].X.ravel()
    df = pd.DataFrame({"T": cohort.obs["time"].to_numpy(), "E": cohort.obs["event"].to_numpy(), "x": x / x.std(ddof=1)})
    ref = CoxPHFitter().fit(df, "T", "E").summary.loc["x"]
    assert np.isclose(res.loc["f2", "coef"], ref["coef"], rtol=1e-4)
    assert np.isclose(res.loc["f2", "p"], ref["p"], rtol=1e-3)
    # standardise=False gives the per-unit coefficient: coef_unit = coef_sd / sd
    raw = ghist.tl.survival(
        cohort, duration_key="time", event_key="event", features=["f2"], standardise=False, progress=False
    )
    assert np.isclose(raw.loc["f2", "coef"], ref["coef"] / x.std(ddof=1), rtol=1e-3)
    assert np.isclose(raw.loc["f2", "p"], ref["p"], rtol=1e-3)


def test_permuted_survival_has_no_discovery(cohort):
    perm = np.random.default_rng(1).permutation(cohort.n_obs)
    shuffled = cohort.copy()
    shuffled.obs[["time", "event"]] = cohort.obs[["time", "event"]].to_numpy()[perm]
    res = ghist.tl.survival(shuffled, duration_key="time", event_key="event", progress=False)
    assert (res["q"] >= 0.05).all()


def test_covariate_adjustment_removes_confounded_effect():
    rng = np.random.default_rng(2)
    n = 300
    stage = rng.choice(["I", "II", "III"], size=n)
    severity = pd.Series(stage).map({"I": 0.0, "II": 1.0, "III": 2.0}).to_numpy()
    x = severity + rng.normal(scale=0.7, size=n)  # the feature tracks stage, but only stage drives the hazard
    t = rng.exponential(1 / (0.05 * np.exp(1.0 * severity)))
    c = rng.exponential(1 / 0.02, size=n)
    obs = pd.DataFrame(
        {"time": np.minimum(t, c), "event": t <= c, "stage": pd.Categorical(stage)}, index=[str(i) for i in range(n)]
    )
    adata = ad.AnnData(x[:, None], obs=obs, var=pd.DataFrame(index=["marker"]))
    crude = ghist.tl.survival(adata, duration_key="time", event_key="event", progress=False)
    adjusted = ghist.tl.survival(adata, duration_key="time", event_key="event", covariates=["stage"], progress=False)
    assert crude.loc["marker", "hr"] > 1.5
    assert crude.loc["marker", "p"] < 1e-6
    assert abs(adjusted.loc["marker", "coef"]) < 0.5 * crude.loc["marker", "coef"]
    assert adjusted.loc["marker", "p"] > 0.01
    assert adjusted.attrs["params"]["covariates"] == ["stage"]
    # a numeric covariate is used as is
    adata.obs["severity"] = severity
    numeric = ghist.tl.survival(adata, duration_key="time", event_key="event", covariates=["severity"], progress=False)
    assert np.isclose(numeric.loc["marker", "coef"], adjusted.loc["marker", "coef"], atol=0.05)


def test_constant_and_nan_features(cohort):
    adata = cohort.copy()
    adata.X[:, 3] = 1.0
    adata.X[:10, 4] = np.nan
    with pytest.warns(UserWarning, match="'f3': constant"):
        res = ghist.tl.survival(adata, duration_key="time", event_key="event", progress=False)
    assert res.loc["f3", ["hr", "p", "q"]].isna().all()
    assert res.index[-1] == "f3"  # unfittable features last
    assert res.loc["f4", "n"] == adata.n_obs - 10
    assert res.loc["f4", "n_events"] == adata.obs["event"].iloc[10:].sum()
    assert np.isfinite(res.loc["f4", "p"])
    # q-values are adjusted over the fitted features only
    fitted = res["p"].notna()
    assert np.allclose(res.loc[fitted, "q"], ghist.tl._survival._benjamini_hochberg(res.loc[fitted, "p"].to_numpy()))


def test_no_events_for_a_feature_warns():
    adata = simulate_cohort(n=60, n_features=2, seed=3)
    adata.obs["event"] = 0
    with pytest.warns(UserWarning, match="no events"):
        res = ghist.tl.survival(adata, duration_key="time", event_key="event", progress=False)
    assert res["p"].isna().all()


def test_sparse_layer_and_bool_events(cohort):
    adata = cohort.copy()
    adata.layers["sp"] = sparse.csr_matrix(adata.X)
    adata.obs["event_bool"] = adata.obs["event"].astype(bool)
    dense = ghist.tl.survival(cohort, duration_key="time", event_key="event", features=["f0", "f1"], progress=False)
    sp = ghist.tl.survival(
        adata, duration_key="time", event_key="event_bool", features=["f0", "f1"], layer="sp", progress=False
    )
    pd.testing.assert_frame_equal(dense, sp)


def test_benjamini_hochberg():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5])
    q = ghist.tl._survival._benjamini_hochberg(p)
    assert np.isnan(q[2])
    # m = 4 tests: sorted p 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.0533, 0.0533, 0.5
    assert np.allclose(q[[0, 3, 1, 4]], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])


def test_does_not_modify_input(cohort):
    before_obs, before_x = cohort.obs.copy(), cohort.X.copy()
    ghist.tl.survival(cohort, duration_key="time", event_key="event", features=["f0"], progress=False)
    pd.testing.assert_frame_equal(cohort.obs, before_obs)
    np.testing.assert_array_equal(cohort.X, before_x)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"duration_key": "os", "event_key": "event"}, KeyError, "'os'"),
        ({"duration_key": "time", "event_key": "dead"}, KeyError, "'dead'"),
        ({"duration_key": "time", "event_key": "event", "covariates": ["age"]}, KeyError, "'age'"),
        ({"duration_key": "time", "event_key": "event", "features": ["f0", "ERBB2"]}, KeyError, "ERBB2"),
        ({"duration_key": "time", "event_key": "event", "layer": "counts"}, KeyError, "counts"),
        ({"duration_key": "time", "event_key": "event", "covariates": ["time"]}, ValueError, "duration or event"),
        ({"duration_key": "time", "event_key": "event", "penalizer": -1.0}, ValueError, "penalizer"),
    ],
)
def test_bad_arguments(cohort, kwargs, err, match):
    with pytest.raises(err, match=match):
        ghist.tl.survival(cohort, progress=False, **kwargs)


def test_bad_event_and_duration_values(cohort):
    adata = cohort.copy()
    adata.obs["event2"] = adata.obs["event"] * 2
    with pytest.raises(ValueError, match="0/1 or boolean"):
        ghist.tl.survival(adata, duration_key="time", event_key="event2", progress=False)
    adata.obs["status"] = np.where(adata.obs["event"] == 1, "dead", "alive")
    with pytest.raises(ValueError, match="0/1 or boolean"):
        ghist.tl.survival(adata, duration_key="time", event_key="status", progress=False)
    adata.obs["neg"] = adata.obs["time"] - 100
    with pytest.raises(ValueError, match="negative"):
        ghist.tl.survival(adata, duration_key="neg", event_key="event", progress=False)
    with pytest.raises(TypeError, match="AnnData"):
        ghist.tl.survival(adata.obs, duration_key="time", event_key="event")


def test_missing_clinical_values_are_dropped(cohort):
    adata = cohort.copy()
    adata.obs["time"] = adata.obs["time"].astype(float)
    adata.obs.iloc[:5, adata.obs.columns.get_loc("time")] = np.nan
    res = ghist.tl.survival(adata, duration_key="time", event_key="event", features=["f0"], progress=False)
    assert res.loc["f0", "n"] == adata.n_obs - 5
    # a sample with a missing covariate is left out too (rows 5-7 here), also for a string covariate
    site = np.where(np.arange(adata.n_obs) % 2 == 0, "A", "B").astype(object)
    site[5:8] = None
    adata.obs["site"] = site
    res = ghist.tl.survival(
        adata, duration_key="time", event_key="event", features=["f0"], covariates=["site"], progress=False
    )
    assert res.loc["f0", "n"] == adata.n_obs - 8
