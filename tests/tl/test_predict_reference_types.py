"""A model trained without cell types (spots) but with reference profiles still gives every cell a type."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import ghist


@pytest.fixture(scope="module")
def spot_like_model():
    sdata = ghist.datasets.synthetic(image_size=128, n_genes=12, seed=0)
    genes = list(sdata.tables["table"].var_names)
    cells = ghist.datasets.synthetic_reference(n_cells_per_type=20, genes=genes, seed=0)
    ref = ghist.pp.reference_profiles(cells, "cell_type")
    model = ghist.GHISTModel(genes, None, reference=ref.X, reference_names=list(ref.obs_names), width=4, embed_dim=8)
    return model, ref


def test_types_follow_the_best_correlated_profile(spot_like_model, test_sdata):
    import squidpy as sq

    model, ref = spot_like_model
    table = ghist.tl.predict(test_sdata, model, progress=False)
    assert list(table.obs["ghist_cell_type"].cat.categories) == list(ref.obs_names)
    X = pd.DataFrame(np.asarray(table.X), columns=table.var_names)
    profiles = pd.DataFrame(np.asarray(ref.X), index=ref.obs_names, columns=ref.var_names)[table.var_names]
    r = np.array([[np.corrcoef(x, p)[0, 1] for p in profiles.to_numpy()] for x in X.to_numpy()])
    known = table.obs["ghist_cell_type"].notna().to_numpy()
    assert known.mean() > 0.9
    np.testing.assert_array_equal(
        table.obs["ghist_cell_type"][known].astype(str).to_numpy(), profiles.index[r[known].argmax(1)]
    )
    np.testing.assert_allclose(table.obs["ghist_cell_type_score"][known], r[known].max(1), rtol=1e-5, atol=1e-6)
    # the README's squidpy chain works on it
    sq.gr.spatial_neighbors_knn(table, n_neighs=6)
    sq.gr.nhood_enrichment(table, cluster_key="ghist_cell_type", n_perms=10, seed=0, show_progress_bar=False)
    assert "ghist_cell_type_nhood_enrichment" in table.uns


def test_no_reference_no_types(test_sdata):
    genes = list(test_sdata.tables["table"].var_names)
    table = ghist.tl.predict(test_sdata, ghist.GHISTModel(genes, width=4, embed_dim=8, tile_size=64), progress=False)
    assert "ghist_cell_type" not in table.obs
