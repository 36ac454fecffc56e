"""Survival plots: Kaplan–Meier curves of a feature split into groups, and forest plots of Cox hazard ratios."""

from __future__ import annotations

import logging
from collections.abc import Callable
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._deprecation import renamed_arguments
from .._docs import doc_ax, doc_params, doc_save_show
from .._survival_data import durations, events
from ._utils import _check_top, _get_ax, _save_or_show

if TYPE_CHECKING:  # matplotlib and lifelines load when a plot is drawn, not on ``import ghist``
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

__all__ = ["hazard_ratios", "kaplan_meier"]

_HIGH, _LOW, _NS = "#c0392b", "#2e6fbd", "#9a9a9a"


@renamed_arguments(split="cutoff")
@doc_params(save_show=doc_save_show, ax=doc_ax)
def kaplan_meier(
    adata: AnnData,
    feature: str,
    *,
    duration_key: str,
    event_key: str,
    cutoff: str | float | Callable[[np.ndarray], float] = "median",
    layer: str | None = None,
    show_at_risk: bool = True,
    ci: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    save: str | PathLike | None = None,
    show: bool | None = None,
) -> Axes:
    """Kaplan–Meier curves of samples split by a feature, with the log-rank p-value and numbers at risk.

    A numeric feature is split at a threshold into a *high* (above) and a *low* (at or below) group; a
    categorical, string or boolean ``obs`` column gives one curve per category. Survival curves are
    :class:`lifelines.KaplanMeierFitter` estimates with 95% confidence bands and censoring ticks; the legend
    title holds the log-rank p-value (:func:`lifelines.statistics.logrank_test`, or the multivariate test for
    more than two groups).

    Parameters
    ----------
    adata
        Samples x features with the clinical columns in ``obs`` (see :func:`ghist.tl.survival`).
    feature
        A ``var_names`` entry (read from ``X`` or ``layer``) or an ``obs`` column.
    duration_key
        Column of ``adata.obs`` with the follow-up time.
    event_key
        Column of ``adata.obs`` with the event indicator (``1``/``True`` = event observed).
    cutoff
        Where a numeric feature is split: ``"median"``, a quantile in ``(0, 1)`` (e.g. ``0.75`` puts the top
        quarter in *high*), or a callable taking the feature values and returning the threshold.
    layer
        Layer of ``adata`` to read a ``var_names`` feature from instead of ``X``.
    show_at_risk
        Add the table of numbers at risk below the axes (:func:`lifelines.plotting.add_at_risk_counts`).
    ci
        Draw the 95% confidence band of each curve.
    title
        Axes title; defaults to the feature name.
    {ax}
    {save_show}

    Returns
    -------
    The Axes holding the curves.

    Examples
    --------
    >>> ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_months", event_key="os_event", save="km.png")

    """
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    missing = [k for k in (duration_key, event_key) if k not in adata.obs.columns]
    if missing:
        raise KeyError(f"Column(s) {missing} not found in `adata.obs` (have {list(adata.obs.columns)}).")
    values = _values(adata, feature, layer)
    duration = durations(adata.obs[duration_key], duration_key)
    event = events(adata.obs[event_key], event_key)

    ok = np.isfinite(duration) & np.isfinite(event) & values.notna().to_numpy()
    if (~ok).any():
        logger.info("Dropping %d samples with a missing duration, event or %r.", int((~ok).sum()), feature)
    values, duration, event = values[ok], duration[ok], event[ok]
    groups, labels, colors = _groups(values, cutoff, feature)

    fig, ax = _get_ax(ax, (6.0, 4.5))
    fitters = []
    for g, label, color in zip(groups, labels, colors):
        kmf = KaplanMeierFitter(label=label).fit(duration[g], event[g])
        kmf.plot_survival_function(
            ax=ax, ci_show=ci, ci_alpha=0.15, show_censors=True, censor_styles={"ms": 5, "marker": "|"}, color=color
        )
        fitters.append(kmf)

    if len(groups) == 2:
        test = logrank_test(duration[groups[0]], duration[groups[1]], event[groups[0]], event[groups[1]])
    else:
        codes = np.select(groups, list(range(len(groups))))
        test = multivariate_logrank_test(duration, codes, event)
    p = float(test.p_value)

    ax.set_xlabel(duration_key)
    ax.set_ylabel("Survival probability")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.set_title(feature if title is None else title)
    ax.legend(
        title=f"log-rank {_fmt_p(p)}",
        loc="best",
        frameon=True,
        framealpha=0.85,
        edgecolor="none",
        fontsize="small",
        title_fontsize="small",
    )
    ax.spines[["top", "right"]].set_visible(False)
    if show_at_risk:
        add_at_risk_counts(*fitters, ax=ax, fig=fig, rows_to_show=["At risk"], labels=[_short(lb) for lb in labels])
    _save_or_show(fig, save, show)
    return ax


@renamed_arguments(alpha="q_highlight")
@doc_params(save_show=doc_save_show, ax=doc_ax)
def hazard_ratios(
    result: pd.DataFrame,
    *,
    top: int | None = 20,
    q_threshold: float | None = None,
    q_highlight: float = 0.05,
    title: str | None = None,
    ax: Axes | None = None,
    save: str | PathLike | None = None,
    show: bool | None = None,
) -> Axes:
    """Forest plot of Cox hazard ratios: one row per feature, point estimate with its 95% confidence interval.

    Features are ordered by p-value (smallest at the top) on a log-scaled hazard-ratio axis with a reference line
    at 1; features with ``q < q_highlight`` are coloured (red: higher risk, blue: lower risk), the others grey. The
    hazard ratio, its interval and the q-value are written to the right of each row.

    Parameters
    ----------
    result
        Output of :func:`ghist.tl.survival`: columns ``hr``, ``ci_lower``, ``ci_upper``, ``p`` and (optionally)
        ``q``, indexed by feature. Rows without an estimate are left out.
    top
        Show at most this many features (the smallest p-values). ``None`` shows all.
    q_threshold
        Show only features with ``q`` (``p`` when there is no ``q`` column) below this.
    q_highlight
        Features with ``q`` (or ``p``) below this are highlighted.
    title
        Axes title.
    {ax}
    {save_show}

    Returns
    -------
    The Axes holding the forest plot.

    Examples
    --------
    >>> res = ghist.tl.survival(cohort, duration_key="os_months", event_key="os_event")
    >>> ghist.pl.hazard_ratios(res, top=15, save="forest.pdf")

    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    from matplotlib.transforms import ScaledTranslation, blended_transform_factory

    if not isinstance(result, pd.DataFrame):
        raise TypeError(f"`result` must be the DataFrame returned by `ghist.tl.survival`, got {type(result).__name__}.")
    needed = ["hr", "ci_lower", "ci_upper", "p"]
    missing = [c for c in needed if c not in result.columns]
    if missing:
        raise KeyError(
            f"Column(s) {missing} not found in `result` (have {list(result.columns)}); "
            "pass the output of `ghist.tl.survival`."
        )
    _check_top(top)
    if isinstance(q_highlight, bool) or not isinstance(q_highlight, int | float) or not 0 < q_highlight < 1:
        raise ValueError(f"`q_highlight` must be a number in (0, 1), got {q_highlight!r}.")
    sig_col = "q" if "q" in result.columns else "p"
    df = result[result[needed].notna().all(axis=1) & np.isfinite(result[needed]).all(axis=1)]
    df = df[(df["hr"] > 0) & (df["ci_lower"] > 0)]
    if q_threshold is not None:
        df = df[df[sig_col] < q_threshold]
    df = df.sort_values("p", kind="stable")
    if top is not None:
        df = df.iloc[:top]
    if df.empty:
        raise ValueError("No feature with a finite hazard ratio to plot (check `q_threshold` and the fits).")

    names = [str(f) for f in (df["feature"] if "feature" in df.columns else df.index)]
    n = len(df)
    fig, ax = _get_ax(ax, (6.5, 0.8 + 0.32 * n))
    y = np.arange(n)[::-1]  # smallest p at the top
    hr, lo, hi = (df[c].to_numpy(float) for c in ("hr", "ci_lower", "ci_upper"))
    sig = df[sig_col].to_numpy(float) < q_highlight
    colors = np.where(~sig, _NS, np.where(hr >= 1, _HIGH, _LOW))

    ax.axvline(1.0, color="0.35", lw=0.9, ls="--", zorder=0)
    ax.hlines(y, lo, hi, colors=colors, lw=1.6, zorder=1)
    ax.scatter(hr, y, c=colors, marker="s", s=28, zorder=2)
    ax.set_xscale("log")
    lo_lim, hi_lim = min(lo.min(), 1.0), max(hi.max(), 1.0)
    pad = (hi_lim / lo_lim) ** 0.06
    ax.set_xlim(lo_lim / pad, hi_lim * pad)
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(*ax.get_xlim())))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yticks(y, names)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("Hazard ratio (95% CI)")
    ax.tick_params(axis="y", length=0)
    ax.spines[["top", "right", "left"]].set_visible(False)
    for tick, is_sig in zip(ax.get_yticklabels(), sig):
        tick.set_fontweight("bold" if is_sig else "normal")

    trans = blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(
        1.02,
        n - 0.3,
        "HR (95% CI)",
        transform=trans,
        va="bottom",
        ha="left",
        fontsize="small",
        fontweight="bold",
        color="0.2",
    )
    q = df[sig_col].to_numpy(float)
    for yi, h, a, b, qi in zip(y, hr, lo, hi, q):
        ax.text(
            1.02,
            yi,
            f"{h:.2f} ({a:.2f}–{b:.2f})   {sig_col} {_fmt_p(qi, eq=False)}",
            transform=trans,
            va="center",
            ha="left",
            fontsize="small",
            color="0.2",
        )
    if title is not None:
        ax.set_title(title)
    handles = [
        Line2D([], [], color=_HIGH, marker="s", ls="-", label=f"{sig_col} < {q_highlight:g}, HR > 1"),
        Line2D([], [], color=_LOW, marker="s", ls="-", label=f"{sig_col} < {q_highlight:g}, HR < 1"),
        Line2D([], [], color=_NS, marker="s", ls="-", label="not significant"),
    ]
    below = ax.transAxes + ScaledTranslation(0, -0.5, fig.dpi_scale_trans)  # half an inch under the x axis
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0),
        bbox_transform=below,
        ncol=3,
        frameon=False,
        fontsize="small",
    )
    _save_or_show(fig, save, show)
    return ax


def _values(adata: AnnData, feature: str, layer: str | None) -> pd.Series:
    in_obs, in_var = feature in adata.obs.columns, feature in adata.var_names
    if in_obs and in_var:
        raise ValueError(f"{feature!r} is both an `adata.obs` column and a `var_names` entry; rename one of them.")
    if in_obs:
        return adata.obs[feature].reset_index(drop=True)
    if not in_var:
        raise KeyError(f"{feature!r} is neither a column of `adata.obs` nor in `adata.var_names`.")
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found in `adata.layers` (have {list(adata.layers)}).")
    mat = adata.X if layer is None else adata.layers[layer]
    col = mat[:, adata.var_names.get_loc(feature)]
    col = col.toarray() if sparse.issparse(col) else np.asarray(col)
    return pd.Series(col.ravel().astype(float))


def _groups(
    values: pd.Series, cutoff: str | float | Callable, feature: str
) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Boolean masks, labels and colours of the groups to draw."""
    is_numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if not is_numeric:
        cats = values.astype("category").cat.remove_unused_categories()
        if len(cats.cat.categories) < 2:
            raise ValueError(f"{feature!r} has fewer than two groups among samples with survival data.")
        groups = [(cats == c).to_numpy() for c in cats.cat.categories]
        labels = [f"{c} (n={int(g.sum())})" for c, g in zip(cats.cat.categories, groups)]
        return groups, labels, [f"C{i}" for i in range(len(groups))]

    x = values.to_numpy(float)
    if callable(cutoff):
        thr = float(cutoff(x))
    elif isinstance(cutoff, str):
        if cutoff != "median":
            raise ValueError(
                f"`cutoff` (where to split) must be 'median', a quantile in (0, 1) or a callable, got {cutoff!r}."
            )
        thr = float(np.median(x))
    elif isinstance(cutoff, int | float) and 0 < cutoff < 1:
        thr = float(np.quantile(x, cutoff))
    else:
        raise ValueError(
            f"`cutoff` (where to split) must be 'median', a quantile in (0, 1) or a callable, got {cutoff!r}."
        )
    high = x > thr
    if high.all() or not high.any():
        raise ValueError(
            f"Splitting {feature!r} at {thr:.4g} leaves one group empty; choose another `cutoff` to split at."
        )
    low = ~high
    labels = [f"low (≤ {thr:.3g}, n={int(low.sum())})", f"high (> {thr:.3g}, n={int(high.sum())})"]
    return [low, high], labels, [_LOW, _HIGH]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Readable hazard-ratio ticks between ``lo`` and ``hi``: a 1-2-5 series, denser for narrow ranges."""
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [m * 10.0**d for d in decades for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 4:
            break
    return ticks


def _short(label: str) -> str:
    """Group name without the count, for the at-risk table."""
    return label.split(" (")[0]


def _fmt_p(p: float, eq: bool = True) -> str:
    prefix = "p = " if eq else "= "
    if not np.isfinite(p):
        return prefix + "NA"
    if p < 1e-300:
        return ("p < " if eq else "< ") + "1e-300"
    if p < 1e-3:
        return prefix + f"{p:.1e}"
    return prefix + f"{p:.3f}"
