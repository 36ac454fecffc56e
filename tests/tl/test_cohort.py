from __future__ import annotations

import numpy as np
import pytest
import spatialdata

import ghist


@pytest.fixture(scope="module")
def cohort():
    slides, clinical = ghist.datasets.synthetic_cohort(3, image_size=112, seed=3, progress=False)
    return slides, clinical


@pytest.fixture(scope="module")
def gene_sets(trained):
    genes = trained.genes
    return {"first": genes[:4], "second": [*genes[4:8], "__not_in_panel__"]}


@pytest.fixture(scope="module")
def sequential(cohort, trained, gene_sets):
    slides, _ = cohort
    # on the CPU, as the distributed workers run by default: a GPU's convolutions round differently
    return ghist.tl.predict_cohort(
        slides, trained, gene_sets=gene_sets, per_type=True, progress=False, accelerator="cpu"
    )


def test_features(sequential, cohort, trained, gene_sets):
    slides, _ = cohort
    adata = sequential
    types, genes = trained.cell_types, trained.genes
    assert list(adata.obs_names) == list(slides)
    assert adata.n_vars == 1 + len(types) + len(genes) + len(types) * len(genes) + len(gene_sets)
    kinds = adata.var["kind"].astype(str)
    assert (kinds == "prop").sum() == len(types)
    assert (kinds == "expr_by_type").sum() == len(types) * len(genes)
    assert list(adata.var_names[kinds == "score"]) == ["score:first", "score:second"]
    assert adata.var_names[0] == "n_cells"
    assert kinds.iloc[0] == "count"

    props = adata[:, [f"prop:{t}" for t in types]].X
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-9)
    assert not adata.obs["segmented"].any()

    # The summaries agree with a direct `tl.predict` of the same slide.
    sample = next(iter(slides))
    sdata = spatialdata.deepcopy(slides[sample])
    table = ghist.tl.predict(sdata, trained, progress=False)
    row = adata[sample]
    assert row[:, "n_cells"].X[0, 0] == table.n_obs
    np.testing.assert_allclose(row[:, [f"expr:{g}" for g in genes]].X[0], table.X.mean(axis=0), rtol=1e-5, atol=1e-6)
    share = table.obs["ghist_cell_type"].value_counts(normalize=True).reindex(types).to_numpy()
    np.testing.assert_allclose(row[:, [f"prop:{t}" for t in types]].X[0], share, atol=1e-9)
    t0 = types[int(np.argmax(share))]
    in_type = table.X[(table.obs["ghist_cell_type"] == t0).to_numpy()].mean(axis=0)
    np.testing.assert_allclose(row[:, [f"expr:{t0}:{g}" for g in genes]].X[0], in_type, rtol=1e-5, atol=1e-6)
    absent = [t for t, s in zip(types, share) if s == 0]
    if absent:
        assert np.isnan(row[:, f"expr:{absent[0]}:{genes[0]}"].X[0, 0])

    params = adata.uns["ghist_cohort"]["params"]
    assert params["gene_sets"]["second"] == gene_sets["second"][:4]  # the gene outside the panel is dropped
    assert params["distributed"] is False


def test_inputs_not_modified(cohort, sequential):
    slides, _ = cohort
    for sdata in slides.values():
        assert list(sdata.tables) == []
        assert list(sdata.labels) == ["nuclei"]


def test_distributed_matches_sequential(sequential, cohort, trained, gene_sets):
    from distributed import Client

    slides, _ = cohort
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        dist = ghist.tl.predict_cohort(
            slides, trained, gene_sets=gene_sets, per_type=True, client=client, progress=False
        )
    assert list(dist.obs_names) == list(sequential.obs_names)
    assert list(dist.var_names) == list(sequential.var_names)
    np.testing.assert_allclose(dist.X, sequential.X, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert dist.uns["ghist_cohort"]["params"]["distributed"] is True


def test_zarr_path_and_segmentation(cohort, trained, tmp_path):
    slides, _ = cohort
    first, second = list(slides)[:2]
    path = tmp_path / "s.zarr"
    slides[first].write(path)
    no_labels = spatialdata.SpatialData(images={"he": slides[second].images["he"]})
    adata = ghist.tl.predict_cohort({"disk": path, "unlabelled": no_labels}, trained, progress=False)
    assert list(adata.obs["segmented"]) == [False, True]
    assert (adata[:, "n_cells"].X[:, 0] > 0).all()
    # The store on disk got no prediction table; the in-memory slide got no labels.
    assert list(spatialdata.read_zarr(path).tables) == []
    assert list(no_labels.labels) == []


def test_errors(cohort, trained):
    slides, _ = cohort
    with pytest.raises(ValueError, match="empty"):
        ghist.tl.predict_cohort({}, trained, progress=False)
    with pytest.raises(KeyError, match="image 'hne' not found"):
        ghist.tl.predict_cohort(slides, trained, image_key="hne", progress=False)
    no_labels = {"s": spatialdata.SpatialData(images={"he": next(iter(slides.values())).images["he"]})}
    with pytest.raises(KeyError, match="segment=True"):
        ghist.tl.predict_cohort(no_labels, trained, segment=False, progress=False)
    with pytest.raises(KeyError, match="none of its genes"):
        ghist.tl.predict_cohort(slides, trained, gene_sets={"x": ["NOPE"]}, progress=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.zarr"):
        ghist.tl.predict_cohort({"s": "missing.zarr"}, trained, progress=False)
    with pytest.raises(TypeError, match="key_added"):
        ghist.tl.predict_cohort(slides, trained, key_added="x", progress=False)


def test_slide_task_rebuilds_the_model_from_its_state(cohort, trained):
    """Workers get `GHISTModel._to_state()` (JSON-able settings + CPU tensors), not a pickled model."""
    import json

    from ghist.tl._cohort import _predict_slide

    slides, _ = cohort
    sample = next(iter(slides))
    state = trained._to_state()
    json.dumps(state["settings"], allow_nan=False)
    options = {
        "image_key": "he",
        "labels_key": "nuclei",
        "gene_sets": {},
        "per_type": False,
        "segment": False,
        "segment_kwargs": {},
        "score_kwargs": {},
        "predict_kwargs": {"accelerator": "cpu"},
    }
    from_state, _ = _predict_slide(sample, slides[sample], state, options)
    from_model, _ = _predict_slide(sample, slides[sample], trained, options)
    np.testing.assert_allclose(from_state, from_model, rtol=1e-6, atol=1e-7)
