from __future__ import annotations

import numpy as np
import pytest
from spatialdata.models import TableModel

import ghist


def test_evaluate_perfect_prediction_scores_one(test_sdata):
    truth = test_sdata.tables["table"]
    pred = truth.copy()
    X = truth.X.toarray() if hasattr(truth.X, "toarray") else np.asarray(truth.X)
    pred.X = np.log1p(X).astype(np.float32)
    pred.obs["ghist_cell_type"] = truth.obs["cell_type"].copy()
    test_sdata.tables["ghist"] = pred
    scores = ghist.tl.evaluate(test_sdata, cell_type_key="cell_type")
    varying = X.std(0) > 0
    np.testing.assert_allclose(scores.loc[truth.var_names[varying], "pearson"], 1.0, atol=1e-6)
    assert scores.attrs["cell_type_accuracy"] == 1.0
    assert scores.attrs["composition_error"] == 0.0
    assert {"mean_pearson_svg20", "mean_pearson_svg50", "median_pearson"} <= set(scores.attrs)
    assert scores["svg_rank"].min() == 1


def test_evaluate_matches_cells_by_id(trained, test_sdata):
    table = ghist.tl.predict(test_sdata, trained, progress=False)
    shuffled = table[np.random.default_rng(0).permutation(table.n_obs)].copy()
    del test_sdata.tables["ghist"]
    test_sdata.tables["ghist"] = TableModel.parse(shuffled)
    a = ghist.tl.evaluate(test_sdata)
    test_sdata.tables["ghist"] = table
    b = ghist.tl.evaluate(test_sdata)
    np.testing.assert_allclose(a.sort_index()["pearson"], b.sort_index()["pearson"])


def test_evaluate_errors(test_sdata):
    with pytest.raises(KeyError, match="ghist"):
        ghist.tl.evaluate(test_sdata)
    test_sdata.tables["ghist"] = test_sdata.tables["table"].copy()
    with pytest.raises(KeyError, match="Unknown"):
        ghist.tl.evaluate(test_sdata, cell_type_key="Unknown")


def _perfect(test_sdata):
    truth = test_sdata.tables["table"]
    pred = truth.copy()
    X = truth.X.toarray() if hasattr(truth.X, "toarray") else np.asarray(truth.X)
    pred.X = np.log1p(X).astype(np.float32)
    test_sdata.tables["ghist"] = pred
    return X


def test_constant_prediction_is_counted_and_named(test_sdata, caplog):
    _perfect(test_sdata)
    pred = test_sdata.tables["ghist"]
    gene = pred.var_names[1]
    pred.X[:, 1] = 0.0  # a model that gives one gene zero everywhere (a dead output)
    with caplog.at_level("WARNING", logger="ghist.tl._evaluate"):
        scores = ghist.tl.evaluate(test_sdata)
    assert np.isnan(scores.loc[gene, "pearson"])
    assert scores.attrs["n_constant_predictions"] == 1
    assert scores.attrs["n_constant_genes"] == 0
    assert "predicted constant" in caplog.text
    assert gene in caplog.text


def test_constant_measured_gene_gets_nan_and_is_counted(test_sdata):
    truth = test_sdata.tables["table"]
    X = truth.X.toarray() if hasattr(truth.X, "toarray") else np.asarray(truth.X).copy()
    X[:, 0] = 3  # one gene constant over every cell
    truth.X = X
    _perfect(test_sdata)
    scores = ghist.tl.evaluate(test_sdata)
    gene = truth.var_names[0]
    assert np.isnan(scores.loc[gene, "pearson"])
    assert np.isnan(scores.loc[gene, "moran_i"])
    assert scores["svg_rank"].isna().sum() == scores.attrs["n_constant_genes"] >= 1
    assert np.isfinite(scores.attrs["mean_pearson"])
    assert np.isfinite(scores.attrs["mean_pearson_svg20"])
    assert scores.attrs["level"] == "cell"
    sub = ghist.tl.evaluate(test_sdata, genes=list(truth.var_names[1:4]))
    assert sorted(sub.index) == sorted(truth.var_names[1:4])


def test_import_ghist_does_not_load_squidpy():
    import subprocess
    import sys

    code = "import sys, ghist; assert 'squidpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _spot_sdata(test_sdata):
    """Predictions of the synthetic cells (their true counts) and 16 circular spots with measured counts."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from spatialdata.models import ShapesModel

    truth = test_sdata.tables["table"]
    pred = truth.copy()
    X = truth.X.toarray() if hasattr(truth.X, "toarray") else np.asarray(truth.X)
    pred.X = np.log1p(X).astype(np.float32)
    from ghist.pp._tile_spots import nucleus_centroids

    ids, xy = nucleus_centroids(test_sdata.labels["nuclei"])
    pred.obsm["spatial"] = xy[np.searchsorted(ids, pred.obs["cell_id"].to_numpy())]
    test_sdata.tables["ghist"] = pred
    size = test_sdata.labels["nuclei"].shape[0]
    g = np.arange(24.0, size, 48.0)
    centres = np.array([(x, y) for y in g for x in g])
    test_sdata.shapes["spots"] = ShapesModel.parse(centres, geometry=0, radius=np.full(len(centres), 22.0))
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 50, size=(len(centres), 5))  # genes outside the predicted panel
    panel = rng.integers(0, 30, size=(len(centres), X.shape[1]))
    counts = np.hstack([panel, extra]).astype(np.float32)
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * len(centres)), "spot_id": np.arange(len(centres))})
    obs.index = obs.index.astype(str)
    var = pd.DataFrame(index=[*truth.var_names, *[f"extra{i}" for i in range(5)]])
    table = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)
    test_sdata.tables["spot_counts"] = TableModel.parse(
        table, region="spots", region_key="region", instance_key="spot_id"
    )
    return counts, list(truth.var_names)


def _log_norm(values, library, target_sum=1e4):
    return np.log1p(values / np.maximum(library, 1e-12)[:, None] * target_sum)


def test_spot_mode_normalises_both_sides_per_spot(test_sdata):
    from ghist._stats import column_pearson

    counts, genes = _spot_sdata(test_sdata)
    n_tables = len(test_sdata.tables)
    pseudo = ghist.tl.aggregate_to_spots(test_sdata, spots_key="spots", spots_table_key="spot_counts")
    sums = np.asarray(pseudo.X, dtype=np.float64)
    del test_sdata.tables["ghist_spots"]
    measured = counts[:, : len(genes)].astype(np.float64)

    scores = ghist.tl.evaluate(test_sdata, table_key="spot_counts", spots_key="spots")
    assert len(test_sdata.tables) == n_tables  # nothing written
    expected = column_pearson(_log_norm(sums, sums.sum(1)), _log_norm(measured, measured.sum(1)))
    np.testing.assert_allclose(scores.loc[genes, "pearson"], expected, rtol=1e-6)
    attrs = scores.attrs
    assert attrs["level"] == "spot"
    assert attrs["n_spots"] == len(counts)
    assert attrs["n_cells"] == int(pseudo.obs["n_cells"].sum())
    assert attrs["n_spots_without_cells"] == int((pseudo.obs["n_cells"] == 0).sum())
    assert {"mean_pearson", "median_pearson", "mean_spearman", "n_constant_genes", "mean_pearson_svg20"} <= set(attrs)

    # library "all" with a given panel share: the HER2ST benchmark's normalisation, scored on a subset of genes
    share = 0.4
    scores = ghist.tl.evaluate(
        test_sdata,
        table_key="spot_counts",
        spots_key="spots",
        genes=genes[:5],
        library="all",
        panel_share=share,
        key_added="pseudo",
    )
    pred_norm = _log_norm(sums, sums.sum(1) / share)
    true_norm = _log_norm(measured, counts.sum(1))
    np.testing.assert_allclose(scores.loc[genes[:5], "pearson"], column_pearson(pred_norm, true_norm)[:5], rtol=1e-6)
    written = test_sdata.tables["pseudo"]
    np.testing.assert_allclose(written.layers["log_normalised"], pred_norm, rtol=1e-5)
    np.testing.assert_allclose(written.X, sums, rtol=1e-5)
    # default share: the median over the measured spots
    median = float(np.median(measured.sum(1) / counts.sum(1)))
    default = ghist.tl.evaluate(test_sdata, table_key="spot_counts", spots_key="spots", library="all")
    assert default.attrs["panel_share"] == pytest.approx(median)


def test_spot_mode_errors(test_sdata):
    _spot_sdata(test_sdata)
    with pytest.raises(ValueError, match="cell_type_key"):
        ghist.tl.evaluate(test_sdata, table_key="spot_counts", spots_key="spots", cell_type_key="cell_type")
    with pytest.raises(ValueError, match="spots only"):
        ghist.tl.evaluate(test_sdata, library="all")
    with pytest.raises(ValueError, match="panel_share"):
        ghist.tl.evaluate(test_sdata, table_key="spot_counts", spots_key="spots", panel_share=0.5)
    with pytest.raises(ValueError, match="library"):
        ghist.tl.evaluate(test_sdata, table_key="spot_counts", spots_key="spots", library="genes")
    with pytest.raises(ValueError, match="annotates"):
        ghist.tl.evaluate(test_sdata, table_key="table", spots_key="spots")
    with pytest.raises(KeyError, match="NOPE"):
        ghist.tl.evaluate(test_sdata, table_key="spot_counts", spots_key="spots", genes=["NOPE"])
    test_sdata.tables["taken"] = test_sdata.tables["spot_counts"].copy()
    with pytest.raises(ValueError, match="already exists"):
        ghist.tl.evaluate(test_sdata, table_key="spot_counts", spots_key="spots", key_added="taken")


def _moran_knn6(values: np.ndarray, coords: np.ndarray) -> float:
    """Moran's I over the 6-nearest-neighbour graph with row-normalised weights, computed without squidpy."""
    from sklearn.neighbors import NearestNeighbors

    n = len(values)
    _, idx = NearestNeighbors(n_neighbors=7).fit(coords).kneighbors(coords)
    W = np.zeros((n, n))
    for i, row in enumerate(idx):
        W[i, [j for j in row if j != i][:6]] = 1.0
    W /= W.sum(axis=1, keepdims=True)
    z = values - values.mean()
    return float(n / W.sum() * (z @ W @ z) / (z @ z))


def test_moran_i_is_that_of_the_6_nearest_neighbour_graph(test_sdata):
    """The graph built with `spatial_neighbors_knn` is the 6-NN graph of the former `spatial_neighbors` call."""
    _perfect(test_sdata)
    truth = test_sdata.tables["table"]
    scores = ghist.tl.evaluate(test_sdata)
    X = np.log1p(truth.X.toarray() if hasattr(truth.X, "toarray") else np.asarray(truth.X, dtype=float))
    coords = np.asarray(truth.obsm["spatial"], dtype=float)[:, :2]
    for j in np.flatnonzero(X.std(0) > 0)[:5]:
        gene = truth.var_names[j]
        assert scores.loc[gene, "moran_i"] == pytest.approx(_moran_knn6(X[:, j], coords), rel=1e-5, abs=1e-7)


def test_evaluate_is_quiet(test_sdata, recwarn, capsys, caplog):
    """No deprecation warning from ghist's own squidpy calls, and none of squidpy's INFO lines on the console."""
    import logging
    import warnings

    _perfect(test_sdata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        ghist.tl.evaluate(test_sdata)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning | DeprecationWarning)]
    captured = capsys.readouterr()
    assert "Creating graph" not in captured.out + captured.err
    assert logging.getLogger("spatialdata._logging").level != logging.CRITICAL  # restored, not left muted
    assert "Creating graph" not in caplog.text


def test_import_ghist_does_not_load_scipy_stats_or_sklearn():
    import subprocess
    import sys

    code = "import sys, ghist; bad = [m for m in ('scipy.stats', 'sklearn') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
