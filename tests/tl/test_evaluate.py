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
