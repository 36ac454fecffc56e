"""Univariate Cox proportional-hazards screens of per-sample features (genes, cell-type proportions, scores)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._constants import COHORT_SE_LAYER
from .._deprecation import renamed_arguments
from .._survival_data import durations, events
from .._validation import check_number

logger = logging.getLogger(__name__)

__all__ = ["survival"]

_RESULT_COLUMNS = ["feature", "hr", "ci_lower", "ci_upper", "coef", "se", "p", "q", "n", "n_events"]
_DURATION, _EVENT, _FEATURE, _WEIGHT = "__duration__", "__event__", "__feature__", "__weight__"
INVERSE_VARIANCE = "inverse_variance"


@renamed_arguments(standardize="standardise")
def survival(
    adata: AnnData,
    *,
    duration_key: str,
    event_key: str,
    features: Sequence[str] | None = None,
    covariates: Sequence[str] | None = None,
    layer: str | None = None,
    penalizer: float = 0.0,
    standardise: bool = True,
    weights: str | None = None,
    se_layer: str = COHORT_SE_LAYER,
    progress: bool = True,
) -> pd.DataFrame:
    """Fit one Cox proportional-hazards model per feature and rank the features by their association with survival.

    For every feature a Cox model (:class:`lifelines.CoxPHFitter`) is fitted with that feature as the only
    predictor, plus the optional ``covariates`` it is adjusted for. With ``standardise=True`` the feature is
    z-scored over the samples used for its fit, so the hazard ratio is per standard deviation and comparable
    between features. p-values are Wald tests of the feature's coefficient, and q-values are Benjamini–Hochberg
    adjusted over the features that could be fitted.

    Parameters
    ----------
    adata
        Samples x features, e.g. one row per slide or patient with mean predicted expression, cell-type
        proportions or scores in ``X`` (feature names in ``var_names``) and clinical columns in ``obs``.
    duration_key
        Column of ``adata.obs`` with the follow-up time (non-negative).
    event_key
        Column of ``adata.obs`` with the event indicator: ``1``/``True`` for an observed event (death,
        relapse), ``0``/``False`` for a censored sample.
    features
        Features (``var_names``) to test. Defaults to all.
    covariates
        Columns of ``adata.obs`` to adjust for (e.g. age, stage). Categorical, string and boolean columns are
        one-hot encoded (first level dropped); numeric ones enter as they are.
    layer
        Layer of ``adata`` to read the features from instead of ``X``.
    penalizer
        L2 penalty passed to :class:`lifelines.CoxPHFitter`; a small value (e.g. ``0.01``) helps convergence
        on small or separable cohorts.
    standardise
        z-score each feature, so that ``hr`` is the hazard ratio per standard deviation. Otherwise per unit.
    weights
        Down-weight uncertain samples. ``None``: every sample counts once. The name of a column of ``adata.obs``:
        its positive, finite values weight each sample in every fit. ``"inverse_variance"``: each feature's fit
        weights sample ``i`` by ``1 / se_i^2``, ``se`` being that feature's standard error in ``layers[se_layer]``
        (from :func:`ghist.tl.predict_cohort`); features whose standard error is missing for every sample (e.g.
        ``n_cells``) are fitted unweighted. Weights are rescaled to mean 1 over each fit's samples. With weights,
        lifelines maximises the weighted partial likelihood and the standard errors, confidence intervals and
        p-values use its robust (sandwich, Lin–Wei) variance, as weights that are not frequencies require. This
        makes precisely measured slides count more; it does not correct the attenuation of a hazard ratio by a
        noisy feature (that would be a measurement-error model, e.g. regression calibration). The z-scoring of
        ``standardise`` is unweighted.
    se_layer
        Layer of per-feature standard errors for ``weights="inverse_variance"``.
    progress
        Show a progress bar over the features.

    Returns
    -------
    One row per feature, indexed by feature and sorted by ``p`` (features that could not be fitted last), with
    columns ``feature``, ``hr`` (hazard ratio), ``ci_lower``/``ci_upper`` (its 95% confidence interval),
    ``coef`` (log hazard ratio), ``se`` (its standard error), ``p``, ``q`` (Benjamini–Hochberg), ``n`` (samples
    used) and ``n_events`` (events among them). Features that are constant, have no events among their samples or
    whose fit fails get ``NaN`` statistics and a warning. The call's settings are in ``result.attrs["params"]``.

    Examples
    --------
    >>> res = ghist.tl.survival(cohort, duration_key="os_months", event_key="os_event", covariates=["stage"])
    >>> res.query("q < 0.05").head()

    """
    # lifelines and tqdm load here, not on ``import ghist``.
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError
    from tqdm.auto import tqdm

    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData of samples x features, got {type(adata).__name__}.")
    covariates = [] if covariates is None else list(covariates)
    if isinstance(features, str):
        features = [features]
    features = list(adata.var_names) if features is None else list(features)
    _check_keys(adata, duration_key, event_key, covariates, features, layer)
    check_number("penalizer", penalizer, positive=False)

    duration = durations(adata.obs[duration_key], duration_key)
    event = events(adata.obs[event_key], event_key)
    cov = _encode_covariates(adata.obs, covariates)
    base_ok = np.isfinite(duration) & np.isfinite(event) & adata.obs[covariates].notna().all(axis=1).to_numpy()
    if (~base_ok).any():
        logger.info("Dropping %d samples with missing duration, event or covariates.", int((~base_ok).sum()))
    if not base_ok.any():
        raise ValueError("No sample has a duration, an event and all covariates.")

    values = _feature_matrix(adata, features, layer)
    sample_weights, se = _check_weights(adata, weights, se_layer, features)
    logger.info(
        "Fitting %d univariate Cox models on %d samples (%d covariate columns).",
        len(features),
        int(base_ok.sum()),
        cov.shape[1],
    )

    rows, skipped = [], {}
    for j, name in enumerate(tqdm(features, desc="ghist.tl.survival", disable=not progress)):
        x = values[:, j]
        ok = base_ok & np.isfinite(x)
        row = {"feature": name, "n": int(ok.sum()), "n_events": int(event[ok].sum())}
        reason = _why_not_fittable(x[ok], event[ok])
        w = sample_weights if se is None else _inverse_variance(se[:, j], ok, name, adata.obs_names)
        if reason is None:
            xo = x[ok]
            if standardise:
                xo = (xo - xo.mean()) / xo.std(ddof=1)
            frame = pd.DataFrame({_DURATION: duration[ok], _EVENT: event[ok], _FEATURE: xo})
            sub_cov = cov.loc[ok].reset_index(drop=True)
            sub_cov = sub_cov.loc[:, sub_cov.nunique() > 1]  # a level absent from this subset is not estimable
            frame = pd.concat([frame, sub_cov], axis=1)
            fit_kwargs = {}
            if w is not None:
                frame[_WEIGHT] = w[ok] / w[ok].mean()
                fit_kwargs = {"weights_col": _WEIGHT, "robust": True}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # lifelines' convergence chatter; failures are caught below
                    fit = CoxPHFitter(penalizer=penalizer).fit(
                        frame, duration_col=_DURATION, event_col=_EVENT, **fit_kwargs
                    )
                s = fit.summary.loc[_FEATURE]
                row.update(
                    coef=float(s["coef"]),
                    se=float(s["se(coef)"]),
                    hr=float(s["exp(coef)"]),
                    ci_lower=float(s["exp(coef) lower 95%"]),
                    ci_upper=float(s["exp(coef) upper 95%"]),
                    p=float(s["p"]),
                )
            except (ConvergenceError, np.linalg.LinAlgError, ValueError) as err:
                reason = f"fit failed ({type(err).__name__})"
        if reason is not None:
            skipped[name] = reason
        rows.append(row)

    if skipped:
        shown = ", ".join(f"{k!r}: {v}" for k, v in list(skipped.items())[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(
            f"{len(skipped)} feature(s) could not be fitted and have NaN statistics: {shown}{more}.",
            UserWarning,
            stacklevel=2,
        )

    res = pd.DataFrame(rows).reindex(columns=_RESULT_COLUMNS)
    res["q"] = _benjamini_hochberg(res["p"].to_numpy(dtype=float))
    res = res.sort_values("p", na_position="last", kind="stable").set_index("feature", drop=False)
    res.index.name = None
    res.attrs["params"] = {
        "duration_key": duration_key,
        "event_key": event_key,
        "covariates": covariates,
        "layer": layer,
        "penalizer": penalizer,
        "standardise": standardise,
        "weights": weights,
        "se_layer": se_layer if weights == INVERSE_VARIANCE else None,
    }
    logger.info("Fitted %d features; %d with q < 0.05.", int(res["p"].notna().sum()), int((res["q"] < 0.05).sum()))
    return res


def _check_weights(
    adata: AnnData, weights: str | None, se_layer: str, features: list[str]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(per-sample weights, per-feature standard errors)``; at most one is not None. Bad weights are refused."""
    if weights is None:
        return None, None
    if not isinstance(weights, str):
        raise TypeError(
            f"`weights` must be None, {INVERSE_VARIANCE!r} or a column of `adata.obs`; got {type(weights).__name__}."
        )
    if weights == INVERSE_VARIANCE:
        if se_layer not in adata.layers:
            raise KeyError(
                f"`weights={INVERSE_VARIANCE!r}` reads standard errors from `adata.layers[{se_layer!r}]`, which is "
                f"missing (have {list(adata.layers)}); `ghist.tl.predict_cohort` writes it."
            )
        return None, _feature_matrix(adata, features, se_layer)
    if weights not in adata.obs.columns:
        raise KeyError(
            f"`weights` {weights!r} is neither {INVERSE_VARIANCE!r} nor a column of `adata.obs` "
            f"(have {list(adata.obs.columns)})."
        )
    column = adata.obs[weights]
    if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
        raise ValueError(f"`weights` column {weights!r} must be numeric; got dtype {column.dtype}.")
    w = column.to_numpy(dtype=float)
    bad = ~(np.isfinite(w) & (w > 0))
    if bad.any():
        raise ValueError(
            f"`weights` column {weights!r} must hold finite numbers > 0; samples "
            f"{list(adata.obs_names[bad][:5])} have {list(w[bad][:5])}."
        )
    return w, None


def _inverse_variance(se: np.ndarray, ok: np.ndarray, feature: str, samples: pd.Index) -> np.ndarray | None:
    """``1 / se^2`` for one feature, or None (unweighted) where it has no standard error at all."""
    if not np.isfinite(se).any():
        return None
    bad = ok & ~(np.isfinite(se) & (se > 0))
    if bad.any():
        raise ValueError(
            f"Feature {feature!r}: `weights={INVERSE_VARIANCE!r}` needs a finite standard error > 0 for every "
            f"sample; samples {list(samples[bad][:5])} have {list(se[bad][:5])}."
        )
    with np.errstate(divide="ignore"):
        return 1.0 / se**2


def _benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of ``p``; ``NaN`` entries stay ``NaN`` and do not count as tests."""
    from scipy.stats import false_discovery_control  # scipy.stats takes ~0.3 s to import

    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def _check_keys(
    adata: AnnData,
    duration_key: str,
    event_key: str,
    covariates: list[str],
    features: list[str],
    layer: str | None,
) -> None:
    missing_obs = [k for k in [duration_key, event_key, *covariates] if k not in adata.obs.columns]
    if missing_obs:
        raise KeyError(f"Column(s) {missing_obs} not found in `adata.obs` (have {list(adata.obs.columns)}).")
    clash = {duration_key, event_key} & set(covariates)
    if clash:
        raise ValueError(f"Covariates {sorted(clash)} are the duration or event column.")
    missing_var = [f for f in features if f not in adata.var_names]
    if missing_var:
        raise KeyError(
            f"Feature(s) {missing_var[:10]}{' ...' if len(missing_var) > 10 else ''} not found in `adata.var_names`."
        )
    if not features:
        raise ValueError("`features` is empty.")
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found in `adata.layers` (have {list(adata.layers)}).")


def _encode_covariates(obs: pd.DataFrame, covariates: list[str]) -> pd.DataFrame:
    parts = []
    for key in covariates:
        col = obs[key]
        if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
            cat = col.astype("category")
            dummies = pd.get_dummies(cat, prefix=key, prefix_sep="=", drop_first=True, dtype=float)
            dummies.loc[cat.isna().to_numpy()] = np.nan
            parts.append(dummies)
        else:
            parts.append(col.astype(float).rename(key).to_frame())
    if not parts:
        return pd.DataFrame(index=range(len(obs)))
    return pd.concat(parts, axis=1).reset_index(drop=True)


def _feature_matrix(adata: AnnData, features: list[str], layer: str | None) -> np.ndarray:
    idx = adata.var_names.get_indexer(features)
    mat = adata.X if layer is None else adata.layers[layer]
    mat = mat[:, idx]
    if sparse.issparse(mat):
        mat = mat.toarray()
    return np.asarray(mat, dtype=float)


def _why_not_fittable(x: np.ndarray, event: np.ndarray) -> str | None:
    if x.size < 3:
        return f"only {x.size} samples"
    if np.ptp(x) == 0:
        return "constant"
    if event.sum() == 0:
        return "no events"
    return None
