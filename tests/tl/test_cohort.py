from __future__ import annotations

import numpy as np
import pytest
import spatialdata
from anndata import AnnData
from spatialdata.models import Labels2DModel

import ghist
from ghist._validation import ValidationError


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
    with pytest.raises(ValidationError, match="Image 'hne' not found") as info:
        ghist.tl.predict_cohort(slides, trained, image_key="hne", progress=False)
    assert len(info.value.problems) == len(slides)  # every slide's problem, each naming its slide
    assert all(p.startswith(f"Slide {s!r}:") for p, s in zip(info.value.problems, slides))
    no_labels = {"s": spatialdata.SpatialData(images={"he": next(iter(slides.values())).images["he"]})}
    with pytest.raises(ValidationError, match="segment=True"):
        ghist.tl.predict_cohort(no_labels, trained, segment=False, progress=False)
    with pytest.raises(KeyError, match="none of its genes"):
        ghist.tl.predict_cohort(slides, trained, gene_sets={"x": ["NOPE"]}, progress=False)
    with pytest.raises(ValidationError, match=r"Slide 's': no SpatialData zarr store at 'missing\.zarr'"):
        ghist.tl.predict_cohort({"s": "missing.zarr"}, trained, progress=False)
    with pytest.raises(TypeError, match="key_added"):
        ghist.tl.predict_cohort(slides, trained, key_added="x", progress=False)
    with pytest.raises(ValueError, match="on_error"):
        ghist.tl.predict_cohort(slides, trained, on_error="ignore", progress=False)


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


# ---------------------------------------------------------------------------------------------- bad slides, cache
def _float_image(slide):
    image = slide.images["he"].astype("float32") / 255
    return spatialdata.SpatialData(images={"he": image}, labels={"nuclei": slide.labels["nuclei"]})


def _empty_labels(slide):
    labels = Labels2DModel.parse(np.zeros(slide.labels["nuclei"].shape, dtype=np.int32), dims=("y", "x"))
    return spatialdata.SpatialData(images={"he": slide.images["he"]}, labels={"nuclei": labels})


def _half_labels(slide):
    labels = Labels2DModel.parse(np.asarray(slide.labels["nuclei"])[::2, ::2], dims=("y", "x"))
    return spatialdata.SpatialData(images={"he": slide.images["he"]}, labels={"nuclei": labels})


@pytest.fixture
def count_work(monkeypatch):
    """Counts the slides that get predicted (after the up-front checks)."""
    from ghist.tl import _cohort

    calls = []
    real = _cohort._predict_one

    def counting(sample, *args, **kwargs):
        calls.append(sample)
        return real(sample, *args, **kwargs)

    monkeypatch.setattr(_cohort, "_predict_one", counting)
    return calls


def test_every_slide_is_checked_before_any_work(cohort, trained, count_work, tmp_path):
    slides, _ = cohort
    good, other = list(slides.values())[:2]
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    bad = {
        "good": good,
        "float": _float_image(other),
        "half": _half_labels(other),
        "gone": tmp_path / "gone.zarr",
        "broken": broken,
    }
    with pytest.raises(ValidationError) as info:
        ghist.tl.predict_cohort(bad, trained, progress=False, accelerator="cpu")
    text = str(info.value)
    assert "Slide 'float': Image 'he' has dtype float32" in text
    assert "Slide 'half': Image 'he' and labels 'nuclei' have the same transformation" in text
    assert "Slide 'gone': no SpatialData zarr store" in text
    assert "Slide 'broken': cannot open" in text
    assert "'good'" not in text
    assert count_work == []  # nothing predicted


def test_skip_keeps_the_finished_slides_and_the_cache_resumes(cohort, trained, count_work, tmp_path, caplog):
    import json

    slides, _ = cohort
    first, second, third = list(slides)
    mixed = {
        first: slides[first],
        "float": _float_image(slides[second]),  # refused up front
        "empty": _empty_labels(slides[second]),  # fails while predicted
        third: slides[third],
    }
    cache = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="ghist"):
        adata = ghist.tl.predict_cohort(
            mixed, trained, on_error="skip", cache_dir=cache, progress=False, accelerator="cpu"
        )
    assert list(adata.obs_names) == [first, third]
    failed = adata.uns["ghist_cohort"]["failed"]
    assert list(failed) == ["float", "empty"]
    assert failed["float"].startswith("ValidationError: Image 'he' has dtype float32")
    assert failed["empty"].startswith("ValueError: Labels 'nuclei' hold no nucleus")
    json.dumps(adata.uns["ghist_cohort"], allow_nan=False)
    assert "'empty'" in caplog.text
    assert "'float'" in caplog.text
    assert count_work == [first, "empty", third]
    assert len(list(cache.glob("*.npz"))) == 2
    assert not list(cache.glob(".tmp-*"))

    # A rerun predicts only what is not finished; the same settings give the same rows.
    count_work.clear()
    with caplog.at_level("INFO", logger="ghist"):
        again = ghist.tl.predict_cohort(
            mixed, trained, on_error="skip", cache_dir=cache, progress=False, accelerator="cpu"
        )
    assert count_work == ["empty"]
    assert "Reused 2 of 4 slides" in caplog.text
    assert again.uns["ghist_cohort"]["cached"] == [first, third]
    np.testing.assert_array_equal(again.X, adata.X)
    # Other settings: nothing is reused.
    count_work.clear()
    ghist.tl.predict_cohort(
        {first: slides[first]}, trained, cache_dir=cache, progress=False, accelerator="cpu", alpha=0.0
    )
    assert count_work == [first]


def test_an_error_names_its_slide_and_keeps_its_type(cohort, trained, tmp_path):
    slides, _ = cohort
    first, second = list(slides)[:2]
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"^Slide 'empty': Labels 'nuclei' hold no nucleus") as info:
        ghist.tl.predict_cohort(
            {first: slides[first], "empty": _empty_labels(slides[second])},
            trained,
            cache_dir=cache,
            progress=False,
            accelerator="cpu",
        )
    assert type(info.value) is ValueError
    assert info.value.__cause__ is not None
    assert len(list(cache.glob("*.npz"))) == 1  # the slide finished before the failure is kept


def test_distributed_skip_writes_the_cache_on_the_client(cohort, trained, tmp_path):
    from distributed import Client

    slides, _ = cohort
    first, second = list(slides)[:2]
    cache = tmp_path / "cache"
    mixed = {first: slides[first], "empty": _empty_labels(slides[second])}
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        adata = ghist.tl.predict_cohort(mixed, trained, client=client, on_error="skip", cache_dir=cache, progress=False)
    assert list(adata.obs_names) == [first]
    assert adata.uns["ghist_cohort"]["failed"]["empty"].startswith("ValueError: Labels 'nuclei' hold no nucleus")
    assert len(list(cache.glob("*.npz"))) == 1
    local = ghist.tl.predict_cohort({first: slides[first]}, trained, cache_dir=cache, progress=False, accelerator="cpu")
    assert local.uns["ghist_cohort"]["cached"] == [first]


@pytest.mark.parametrize("n_genes", [30, 99, 250, 260, 500])
def test_gene_set_of_the_most_expressed_gene_has_control_genes(n_genes):
    # scanpy's rank bins of round(n / (n_bins - 1)) genes leave the top gene alone where that divides n (250 genes,
    # 25 bins): a set of just that gene then had no control genes
    import scanpy as sc

    from ghist.tl._cohort import score_n_bins

    rng = np.random.default_rng(0)
    adata = AnnData(rng.gamma(2.0, 1.0, size=(40, n_genes)).astype(np.float32))
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    top = adata.var_names[int(np.argmax(adata.X.mean(0)))]
    n_bins = score_n_bins(n_genes)
    assert 3 <= n_bins <= 25
    sc.tl.score_genes(adata, [top], n_bins=n_bins, random_state=0, use_raw=False)
    assert np.isfinite(adata.obs["score"]).all()


def test_cache_key_holds_the_default_score_bins(cohort, trained, tmp_path, monkeypatch):
    """Gene-set scores cached under one default ``n_bins`` are not reused once the default gives another."""
    import ghist.tl._cohort as cohort_module

    slides, _ = cohort
    first = next(iter(slides))
    kwargs = {"gene_sets": {"set": list(trained.genes[:3])}, "progress": False, "accelerator": "cpu"}
    before = ghist.tl.predict_cohort({first: slides[first]}, trained, cache_dir=tmp_path, **kwargs)
    settings = before.uns["ghist_cohort"]["params"]["score_kwargs"]
    assert settings == {"random_state": 0, "n_bins": cohort_module.score_n_bins(trained.n_genes)}
    again = ghist.tl.predict_cohort({first: slides[first]}, trained, cache_dir=tmp_path, **kwargs)
    assert again.uns["ghist_cohort"]["cached"] == [first]
    monkeypatch.setattr(cohort_module, "score_n_bins", lambda n_genes: 4)
    changed = ghist.tl.predict_cohort({first: slides[first]}, trained, cache_dir=tmp_path, **kwargs)
    assert changed.uns["ghist_cohort"]["cached"] == []
    assert changed.uns["ghist_cohort"]["params"]["score_kwargs"]["n_bins"] == 4
