from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test
from matplotlib.collections import LineCollection, PathCollection

import ghist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cohort() -> ad.AnnData:
    """200 patients; hazard rises with ERBB2 and falls with CD8A; the other features are noise."""
    rng = np.random.default_rng(0)
    n = 200
    names = ["ERBB2", "CD8A", "ESR1", "KRT5", "MKI67", "VIM"]
    x = rng.normal(size=(n, len(names)))
    t = rng.exponential(1 / (0.1 * np.exp(0.8 * x[:, 0] - 0.5 * x[:, 1])))
    c = rng.uniform(0, 40, size=n)
    obs = pd.DataFrame(
        {
            "os_months": np.minimum(t, c),
            "os_event": (t <= c).astype(int),
            "subtype": pd.Categorical(rng.choice(["LumA", "Her2", "Basal"], size=n)),
            "score": x[:, 0] + rng.normal(scale=0.1, size=n),
        },
        index=[f"p{i}" for i in range(n)],
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=names))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


def test_kaplan_meier_median_split(cohort, tmp_path):
    out = tmp_path / "sub" / "km.png"
    ax = ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_months", event_key="os_event", save=out)
    assert_png(out)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 2
    assert labels[0].startswith("low")
    assert labels[1].startswith("high")
    assert "n=100" in labels[0]
    assert "n=100" in labels[1]
    x = cohort[:, "ERBB2"].X.ravel()
    hi = x > np.median(x)
    t, e = cohort.obs["os_months"].to_numpy(), cohort.obs["os_event"].to_numpy()
    p = logrank_test(t[hi], t[~hi], e[hi], e[~hi]).p_value
    title = ax.get_legend().get_title().get_text()
    assert title.startswith("log-rank p")
    assert f"{p:.1e}" in title
    assert ax.get_title() == "ERBB2"
    # one survival curve per group (lifelines names its step lines after the fitter label)
    curve_labels = {line.get_label() for line in ax.get_lines()}
    assert set(labels) <= curve_labels
    # the numbers-at-risk table lives on a twin axes below the plot
    fig = ax.figure
    assert len(fig.axes) == 2
    table = " ".join(t.get_text() for t in fig.axes[1].get_xticklabels())
    assert "At risk" in table
    assert "100" in table


def test_kaplan_meier_options(cohort):
    ax = ghist.pl.kaplan_meier(
        cohort, "CD8A", duration_key="os_months", event_key="os_event", cutoff=0.75, show_at_risk=False, title="T"
    )
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "n=150" in labels[0]
    assert "n=50" in labels[1]
    assert len(ax.figure.axes) == 1
    assert ax.get_title() == "T"
    ax = ghist.pl.kaplan_meier(
        cohort, "score", duration_key="os_months", event_key="os_event", cutoff=lambda v: 1.0, show_at_risk=False
    )
    n_high = int((cohort.obs["score"] > 1.0).sum())
    assert f"n={n_high}" in ax.get_legend().get_texts()[1].get_text()


def test_kaplan_meier_categorical_obs_column(cohort):
    _, ax = plt.subplots()
    out = ghist.pl.kaplan_meier(cohort, "subtype", duration_key="os_months", event_key="os_event", ax=ax)
    assert out is ax
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [lb.split(" ")[0] for lb in labels] == ["Basal", "Her2", "LumA"]
    assert "log-rank p" in ax.get_legend().get_title().get_text()


def test_kaplan_meier_errors(cohort):
    with pytest.raises(KeyError, match="'os_days'"):
        ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_days", event_key="os_event")
    with pytest.raises(KeyError, match="'HER2'"):
        ghist.pl.kaplan_meier(cohort, "HER2", duration_key="os_months", event_key="os_event")
    with pytest.raises(ValueError, match="cutoff"):
        ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_months", event_key="os_event", cutoff="mean")
    with pytest.raises(ValueError, match="empty"):
        ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_months", event_key="os_event", cutoff=lambda v: 99.0)
    bad = cohort.copy()
    bad.obs["ERBB2"] = 0.0
    with pytest.raises(ValueError, match="both"):
        ghist.pl.kaplan_meier(bad, "ERBB2", duration_key="os_months", event_key="os_event")
    bad.obs["os_event"] = 3
    with pytest.raises(ValueError, match="0/1"):
        ghist.pl.kaplan_meier(bad, "CD8A", duration_key="os_months", event_key="os_event")


@pytest.fixture(scope="module")
def result(cohort) -> pd.DataFrame:
    return ghist.tl.survival(cohort, duration_key="os_months", event_key="os_event", progress=False)


def test_hazard_ratios_forest(result, tmp_path):
    out = tmp_path / "forest.png"
    ax = ghist.pl.hazard_ratios(result, title="Cox", save=out)
    assert_png(out)
    n = len(result)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(result.index)  # top row = smallest p
    assert ax.get_yticks()[0] == n - 1
    assert ax.get_xscale() == "log"
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    whiskers = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(points) == 1
    assert len(points[0].get_offsets()) == n
    assert np.allclose(points[0].get_offsets()[:, 0], result["hr"].to_numpy())
    segs = whiskers[0].get_segments()
    assert len(segs) == n
    assert np.allclose([s[0][0] for s in segs], result["ci_lower"])
    assert np.allclose([s[1][0] for s in segs], result["ci_upper"])
    # reference line at HR = 1
    assert any(np.allclose(line.get_xdata(), 1.0) for line in ax.get_lines())
    # significant features highlighted (coloured, bold), the others grey
    colors = points[0].get_facecolors()
    sig = (result["q"] < 0.05).to_numpy()
    assert sig.any()
    assert (~sig).any()
    grey = matplotlib.colors.to_rgba("#9a9a9a")
    assert all(np.allclose(c, grey) != s for c, s in zip(colors, sig))
    bold = [t.get_fontweight() == "bold" for t in ax.get_yticklabels()]
    assert bold == list(sig)
    texts = [t.get_text() for t in ax.texts]
    assert any("q" in t for t in texts)
    assert len(texts) == n + 1


def test_hazard_ratios_top_and_threshold(result):
    ax = ghist.pl.hazard_ratios(result, top=3)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(result.index[:3])
    ax = ghist.pl.hazard_ratios(result, q_threshold=0.05)
    assert len(ax.get_yticklabels()) == int((result["q"] < 0.05).sum())


def test_hazard_ratios_skips_unfitted_rows(result):
    res = result.copy()
    res.loc["VIM", ["hr", "ci_lower", "ci_upper", "p", "q"]] = np.nan
    ax = ghist.pl.hazard_ratios(res)
    assert "VIM" not in [t.get_text() for t in ax.get_yticklabels()]


def test_hazard_ratios_errors(result):
    with pytest.raises(KeyError, match="ci_lower"):
        ghist.pl.hazard_ratios(result.drop(columns="ci_lower"))
    with pytest.raises(ValueError, match="No feature"):
        ghist.pl.hazard_ratios(result, q_threshold=1e-300)
    with pytest.raises(ValueError, match="top"):
        ghist.pl.hazard_ratios(result, top=0)


def test_show_none_does_not_block_when_saving(cohort, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    monkeypatch.setattr(matplotlib, "is_interactive", lambda: True)
    ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_months", event_key="os_event", save=tmp_path / "a.png")
    assert shown == []  # saving and interactive: not shown
    ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_months", event_key="os_event")
    assert shown == [1]  # interactive, not saving: shown
    ghist.pl.kaplan_meier(cohort, "ERBB2", duration_key="os_months", event_key="os_event", show=False)
    assert shown == [1]
