"""Per-cell uncertainty: the variance head, `layers["ghist_std"]`, cell-type entropy, cohort SEs, weighted survival."""

from __future__ import annotations

import json
import logging
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata
import torch

import ghist
from ghist._model._module import GHISTModule
from ghist._model._network import GHISTNetwork
from ghist._model._uncertainty import (
    HEAD_HIDDEN_LR_FACTOR,
    HEAD_LR_FACTOR,
    HEAD_PREFIX,
    _gaussian_nll,
    entropy,
    head_param_groups,
    make_variance_head,
    spot_variance,
    uncertainty_loss,
)
from ghist.tl._cohort_se import mean_se

from .test_fit_spots import spot_sample_and_tiles


@pytest.fixture(scope="module")
def predicted(trained, test_sdata_session):
    sdata = spatialdata.deepcopy(test_sdata_session)
    return ghist.tl.predict(sdata, trained, progress=False, accelerator="cpu")


def test_predict_writes_std_and_entropy(predicted, trained):
    std = predicted.layers["ghist_std"]
    assert std.shape == predicted.X.shape
    assert np.isfinite(std).all()
    assert (std > 0).all()
    h = predicted.obs["ghist_cell_type_entropy"].to_numpy()
    assert np.isfinite(h).all()
    assert (h >= 0).all()
    assert (h <= math.log(trained.n_types) + 1e-9).all()
    np.testing.assert_allclose(h, entropy(predicted.obsm["ghist_cell_type_proba"].to_numpy()))
    assert h.std() > 0  # cells differ in how sure the model is
    # the post-hoc scale was fitted on validation cells
    assert trained.uncertainty_["level"] == "cell"
    assert trained.uncertainty_["n"] > 0
    scale = np.asarray(trained.uncertainty_["scale"])
    assert scale.shape == (trained.n_genes,)
    assert (scale > 0).all()
    assert scale.std() > 0  # one factor per gene


def test_entropy_bounds():
    k = 4
    h = entropy(np.array([[1, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0]], dtype=float))
    np.testing.assert_allclose(h, [0.0, math.log(k), math.log(2)])


def test_tta_adds_the_spread_of_the_views(trained, test_sdata):
    plain = ghist.tl.predict(test_sdata, trained, key_added="p", progress=False, accelerator="cpu")
    tta = ghist.tl.predict(test_sdata, trained, key_added="t", tta=True, progress=False, accelerator="cpu")
    assert np.isfinite(tta.layers["ghist_std"]).all()
    assert not np.allclose(plain.layers["ghist_std"], tta.layers["ghist_std"])


def test_variance_head_nll_falls(trained):
    nll = trained.history_["train/uncertainty_nll"].to_numpy()
    assert np.isfinite(nll).all()
    assert nll[-3:].mean() < nll[0] - 0.1


@pytest.mark.slow
def test_noisier_gene_gets_a_larger_std(tmp_path):
    """One gene's counts replaced by noise unrelated to the image: the head must give it a larger spread."""
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=12, seed=4)
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    X = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, dtype=np.float32).copy()
    X[:, 0] = rng.choice([0, 60], size=X.shape[0])  # log1p: 0 or 4.1 at random
    table.X = X
    tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type", tile_size=64, path=tmp_path / "t.zarr")
    model = ghist.tl.fit(
        tiles,
        width=4,
        embed_dim=16,
        max_steps=60,
        batch_size=4,
        lr=3e-3,
        seed=0,
        precision="32-true",
        progress=False,
        accelerator="cpu",
        checkpoint_dir=tmp_path / "ckpt",
    )
    pred = ghist.tl.predict(sdata, model, progress=False, accelerator="cpu")
    gene_std = pred.layers["ghist_std"].mean(axis=0)
    assert gene_std[0] > 1.5 * np.median(gene_std[1:])
    # the head itself learnt it, not only the per-gene calibration factors
    raw = gene_std / np.asarray(model.uncertainty_["scale"])
    assert raw[0] > 1.25 * np.median(raw[1:])


def _train_head_on_heteroscedastic_noise(groups_of) -> tuple[float, float]:
    """A head trained alone (300 AdamW steps, network lr 3e-3) on noise whose sd grows with one embedding feature.

    Returns the fraction of hidden units active on some test input and Spearman's rho between the head's mean std
    and the true sd.
    """
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    head = make_variance_head(16, 5)
    optimizer = torch.optim.AdamW(groups_of(head, 3e-3), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1)

    def draw(n):
        embedding, mean = torch.randn(n, 16, generator=generator), torch.rand(n, 5, generator=generator)
        sd = 0.05 + 0.5 * embedding[:, :1].abs()
        return embedding, mean, mean + sd * torch.randn(n, 5, generator=generator), sd[:, 0]

    for _ in range(300):
        embedding, mean, target, _ = draw(64)
        loss = _gaussian_nll(target, mean, head(embedding, mean))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    embedding, mean, _, sd = draw(2000)
    with torch.no_grad():
        hidden = head.net[:3](torch.cat([embedding, mean], dim=1))  # after the ReLU
        std = torch.exp(0.5 * head(embedding, mean)).mean(dim=1)
    return float((hidden > 0).any(dim=0).float().mean()), float(spearmanr(std.numpy(), sd.numpy()).statistic)


@pytest.mark.slow
def test_head_units_stay_alive_and_track_the_noise():
    """The head's groups keep its ReLU units alive; one group at the levels' rate (as before) switched most off."""
    alive, rho = _train_head_on_heteroscedastic_noise(head_param_groups)
    assert alive > 0.9
    assert rho > 0.8
    alive_fast, rho_fast = _train_head_on_heteroscedastic_noise(
        lambda head, lr: [{"params": list(head.parameters()), "lr": lr * HEAD_LR_FACTOR}]
    )
    assert alive_fast < 0.5
    assert rho_fast < 0.3


def test_head_param_groups_split_levels_from_the_rest():
    head = make_variance_head(8, 3)
    groups = head_param_groups(head, 1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * HEAD_LR_FACTOR, 1e-3 * HEAD_HIDDEN_LR_FACTOR])
    assert groups[0]["params"] == [head.net[-1].bias]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in head.parameters())


def test_head_leaves_the_network_gradients_unchanged(tiles):
    """The head's loss is added to the total, but no gradient of it reaches the network."""
    torch.manual_seed(0)
    model = ghist.GHISTModel(tiles.genes, tiles.cell_types, width=4, embed_dim=16, tile_size=tiles.tile_size)
    module = GHISTModule(model.network, expr_scale=model.expr_scale, uncertainty=model.uncertainty_head)
    batch = next(iter(tiles.loader("train", batch_size=4)))
    model.network.eval()  # no dropout: both passes see the same network
    grads = []
    for with_head in (False, True):
        model.network.zero_grad()
        prepared = module._prepare(batch)
        losses, out = module._losses(prepared)
        loss = losses["total"]
        if with_head:
            nll = uncertainty_loss(model.uncertainty_head, out, prepared, model.expr_scale)
            assert nll is not None
            assert torch.isfinite(nll)
            loss = loss + nll
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.network.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)
    assert all(p.grad is not None for p in model.uncertainty_head.parameters())


def test_building_the_head_leaves_the_random_stream_alone():
    torch.manual_seed(3)
    ghist.GHISTModel(["A", "B"], ["x", "y"], width=4, embed_dim=16)
    after = torch.rand(3)
    torch.manual_seed(3)
    net = GHISTNetwork(2, 2, width=4, embed_dim=16)
    del net
    torch.testing.assert_close(after, torch.rand(3))


def test_save_load_keeps_the_head(trained, test_sdata, tmp_path):
    trained.save(tmp_path / "m")
    loaded = ghist.GHISTModel.load(tmp_path / "m")
    assert loaded.uncertainty_ == trained.uncertainty_
    for (na, a), (nb, b) in zip(
        trained.uncertainty_head.state_dict().items(), loaded.uncertainty_head.state_dict().items(), strict=True
    ):
        assert na == nb
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    weights = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    assert any(k.startswith(HEAD_PREFIX) for k in weights)
    a = ghist.tl.predict(test_sdata, trained, key_added="a", progress=False, accelerator="cpu")
    b = ghist.tl.predict(test_sdata, loaded, key_added="b", progress=False, accelerator="cpu")
    np.testing.assert_array_equal(a.layers["ghist_std"], b.layers["ghist_std"])


def test_old_model_without_head_loads_and_predicts(trained, test_sdata, tmp_path, caplog):
    trained.save(tmp_path / "m")
    # What a model saved before the variance head looks like: no head tensors, no "uncertainty" settings.
    weights = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    torch.save({k: v for k, v in weights.items() if not k.startswith(HEAD_PREFIX)}, tmp_path / "m" / "weights.pt")
    settings = json.loads((tmp_path / "m" / "model.json").read_text())
    del settings["uncertainty"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(settings))
    old = ghist.GHISTModel.load(tmp_path / "m")
    assert old.uncertainty_head is None
    with caplog.at_level(logging.WARNING, logger="ghist"):
        table = ghist.tl.predict(test_sdata, old, key_added="old", progress=False, accelerator="cpu")
    assert "no variance head" in caplog.text
    assert "ghist_std" not in table.layers
    new = ghist.tl.predict(test_sdata, trained, key_added="new", progress=False, accelerator="cpu")
    np.testing.assert_array_equal(table.X, new.X)  # the point prediction does not depend on the head
    assert "ghist_cell_type_entropy" in table.obs
    # an old model saved again (still without head) loads again
    old.save(tmp_path / "again")
    assert ghist.GHISTModel.load(tmp_path / "again").uncertainty_head is None


def test_cohort_carries_standard_errors(trained):
    slides, _ = ghist.datasets.synthetic_cohort(2, image_size=112, seed=3, progress=False)
    cohort = ghist.tl.predict_cohort(slides, trained, per_type=True, progress=False, accelerator="cpu")
    se = cohort.layers["ghist_se"]
    assert se.shape == cohort.shape
    kinds = cohort.var["kind"].astype(str).to_numpy()
    assert np.isnan(se[:, kinds == "count"]).all()
    for kind in ("prop", "expr"):
        assert np.isfinite(se[:, kinds == kind]).all()
        assert (se[:, kinds == kind] > 0).all()
    # the expression SEs follow from the cells of a direct prediction
    sample = next(iter(slides))
    table = ghist.tl.predict(spatialdata.deepcopy(slides[sample]), trained, progress=False, accelerator="cpu")
    expected = mean_se(np.asarray(table.X, dtype=float), np.asarray(table.layers["ghist_std"], dtype=float))
    np.testing.assert_allclose(se[0, kinds == "expr"], expected, rtol=1e-4)
    # larger than the sampling part alone: the per-cell spreads count
    assert (expected > mean_se(np.asarray(table.X, dtype=float), None)).all()


def test_mean_se_formula():
    values = np.array([[1.0], [3.0], [5.0]])
    std = np.array([[1.0], [2.0], [2.0]])
    np.testing.assert_allclose(mean_se(values, std), np.sqrt(4.0 / 3 + 9.0 / 9))


def test_spot_variance_by_the_delta_method():
    mean = torch.tensor([[1.0], [2.0]])
    log_var = torch.log(torch.tensor([[0.01], [0.04]]))
    spot_mean, spot_var = spot_variance(mean, log_var, torch.tensor([0, 0]), 1)
    counts = np.expm1([1.0, 2.0])
    np.testing.assert_allclose(spot_mean.numpy(), np.log1p(counts.sum()), rtol=1e-6)
    expected = ((1 + counts) ** 2 * [0.01, 0.04]).sum() / (1 + counts.sum()) ** 2
    np.testing.assert_allclose(spot_var.numpy(), expected, rtol=1e-5)
    # Monte Carlo check of the approximation for small spreads
    rng = np.random.default_rng(0)
    draws = np.log1p(np.expm1(rng.normal([1.0, 2.0], [0.1, 0.2], size=(200_000, 2))).sum(axis=1))
    assert draws.var() == pytest.approx(float(spot_var), rel=0.05)


@pytest.mark.slow
def test_spot_model_fills_the_std(tmp_path):
    sdata, tiles = spot_sample_and_tiles(tmp_path / "t.zarr")
    model = ghist.tl.fit(
        tiles,
        width=4,
        embed_dim=16,
        max_steps=30,
        batch_size=4,
        lr=1e-2,
        seed=0,
        precision="32-true",
        progress=False,
        accelerator="cpu",
        checkpoint_dir=tmp_path / "ckpt",
    )
    nll = model.history_["train/uncertainty_nll"].to_numpy()
    assert np.isfinite(nll).all()
    assert nll[-1] < nll[0]
    assert model.uncertainty_["level"] == "spot"
    assert model.uncertainty_["n"] > 0
    table = ghist.tl.predict(sdata, model, progress=False, accelerator="cpu")
    std = table.layers["ghist_std"]
    assert std.shape == table.X.shape
    assert np.isfinite(std).all()
    assert (std > 0).all()
    assert "ghist_cell_type_entropy" not in table.obs  # no cell types: no type distribution


# ---------------------------------------------------------------------------------------------- weighted survival
def _cohort(n: int = 150, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    t = rng.exponential(1 / (0.1 * np.exp(0.7 * x[:, 0])))
    obs = pd.DataFrame({"time": t, "event": (rng.random(n) < 0.8).astype(int)}, index=[f"s{i}" for i in range(n)])
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=["f0", "f1", "f2"]))
    se = np.abs(rng.normal(0.5, 0.2, size=(n, 3))) + 0.05
    se[:, 2] = np.nan  # a feature without standard errors
    adata.layers["ghist_se"] = se
    adata.obs["w"] = 1 / se[:, 0] ** 2
    return adata


def test_survival_weights_change_the_fit():
    adata = _cohort()
    kw = {"duration_key": "time", "event_key": "event", "progress": False}
    plain = ghist.tl.survival(adata, **kw)
    by_column = ghist.tl.survival(adata, weights="w", **kw)
    inverse = ghist.tl.survival(adata, weights="inverse_variance", **kw)
    assert by_column.loc["f0", "coef"] != pytest.approx(plain.loc["f0", "coef"], rel=1e-3)
    # the column holds f0's inverse variances: the same fit for f0
    assert inverse.loc["f0", "coef"] == pytest.approx(by_column.loc["f0", "coef"], rel=1e-6)
    # a feature without standard errors is fitted unweighted
    assert inverse.loc["f2", "coef"] == pytest.approx(plain.loc["f2", "coef"], rel=1e-6)
    assert inverse.attrs["params"]["weights"] == "inverse_variance"
    # equal weights: the point estimate of the unweighted fit (with robust standard errors)
    adata.obs["one"] = 2.0
    same = ghist.tl.survival(adata, weights="one", **kw)
    assert same.loc["f0", "coef"] == pytest.approx(plain.loc["f0", "coef"], rel=1e-6)


@pytest.mark.parametrize(
    ("change", "weights", "err", "match"),
    [
        (None, "nope", KeyError, "'nope'"),
        (lambda a: a.obs.__setitem__("w", -a.obs["w"]), "w", ValueError, "finite numbers > 0"),
        (
            lambda a: a.obs.__setitem__("w", np.where(a.obs["w"] > 5, np.nan, a.obs["w"])),
            "w",
            ValueError,
            "finite numbers > 0",
        ),
        (lambda a: a.obs.__setitem__("w", "heavy"), "w", ValueError, "numeric"),
        (lambda a: a.layers.pop("ghist_se"), "inverse_variance", KeyError, "ghist_se"),
        (lambda a: a.layers["ghist_se"].__setitem__((0, 0), 0.0), "inverse_variance", ValueError, "'f0'.*s0"),
    ],
)
def test_survival_refuses_bad_weights(change, weights, err, match):
    adata = _cohort()
    if change is not None:
        change(adata)
    with pytest.raises(err, match=match):
        ghist.tl.survival(adata, duration_key="time", event_key="event", weights=weights, progress=False)
    with pytest.raises(TypeError, match="weights"):
        ghist.tl.survival(adata, duration_key="time", event_key="event", weights=1.0, progress=False)
