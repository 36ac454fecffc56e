from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

import ghist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_COLOR = matplotlib.colors.to_rgba("#d95f02")


@pytest.fixture
def eval_df() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    genes = [f"GENE{i}" for i in range(30)]
    df = pd.DataFrame(
        {"pearson": rng.uniform(-0.1, 0.9, 30), "spearman": rng.uniform(0.0, 0.8, 30)}, index=pd.Index(genes)
    )
    df["is_svg"] = np.arange(30) % 3 == 0
    return df


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def bars(ax) -> list[Rectangle]:
    return list(ax.patches)


def test_ranked_bars_with_svg_column(eval_df, tmp_path):
    out = tmp_path / "corr.png"
    ax = ghist.pl.gene_correlation(eval_df, svg="is_svg", save=out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    heights = [b.get_height() for b in bars(ax)]
    assert len(heights) == 30
    assert np.allclose(heights, np.sort(eval_df["pearson"].to_numpy())[::-1])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == list(eval_df["pearson"].sort_values(ascending=False).index)
    is_svg = [np.allclose(b.get_facecolor(), SVG_COLOR) for b in bars(ax)]
    assert is_svg == list(eval_df.loc[labels, "is_svg"])
    # mean lines: all genes and SVGs
    means = sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() in ("--", ":"))
    expected = sorted([eval_df["pearson"].mean(), eval_df.loc[eval_df["is_svg"], "pearson"].mean()])
    assert np.allclose(means, expected)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"mean, all genes = {eval_df['pearson'].mean():.3f}" in legend


def test_svg_as_gene_list_metric_and_top(eval_df):
    svgs = ["GENE1", "GENE2", "NOT_A_GENE"]
    ax = ghist.pl.gene_correlation(eval_df, metric="spearman", svg=svgs, top=10)
    assert len(bars(ax)) == 10
    top10 = eval_df["spearman"].sort_values(ascending=False).index[:10]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == list(top10)
    assert [np.allclose(b.get_facecolor(), SVG_COLOR) for b in bars(ax)] == [g in svgs for g in labels]
    # the mean line stays the mean over all genes, not over the shown ones
    dashed = [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert np.allclose(dashed, [eval_df["spearman"].mean()])
    assert "Spearman" in ax.get_ylabel()


def test_many_genes_and_missing_values():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"pearson": rng.uniform(0, 1, 200)}, index=[f"G{i}" for i in range(200)])
    df.iloc[:5, 0] = np.nan  # e.g. genes constant in the test image
    _, ax = plt.subplots()
    out = ghist.pl.gene_correlation(df, ax=ax)
    assert out is ax
    assert len(bars(ax)) == 195
    assert len(ax.get_xticks()) == 0
    assert "195 genes" in ax.get_xlabel()
    assert all(not np.allclose(b.get_facecolor(), SVG_COLOR) for b in bars(ax))


def test_errors(eval_df):
    with pytest.raises(KeyError, match="'r2'"):
        ghist.pl.gene_correlation(eval_df, metric="r2")
    with pytest.raises(KeyError, match="'svg'"):
        ghist.pl.gene_correlation(eval_df, svg="svg")
    with pytest.raises(ValueError, match="boolean"):
        ghist.pl.gene_correlation(eval_df, svg="spearman")
    with pytest.raises(ValueError, match="top"):
        ghist.pl.gene_correlation(eval_df, top=0)
    with pytest.raises(TypeError, match="DataFrame"):
        ghist.pl.gene_correlation(eval_df["pearson"].to_dict())


def test_svg_as_top_k_by_svg_rank(eval_df):
    ranked = eval_df.drop(columns="is_svg")
    ranked["svg_rank"] = np.arange(1, 31)[::-1]  # GENE29 is the most spatially variable
    ax = ghist.pl.gene_correlation(ranked, svg=5)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    marked = {g for g, b in zip(labels, bars(ax)) if np.allclose(b.get_facecolor(), SVG_COLOR)}
    assert marked == {f"GENE{i}" for i in range(25, 30)}
    with pytest.raises(KeyError, match="svg_rank"):
        ghist.pl.gene_correlation(eval_df, svg=5)
    with pytest.raises(ValueError, match="`svg` must be an integer >= 1"):
        ghist.pl.gene_correlation(ranked, svg=0)
