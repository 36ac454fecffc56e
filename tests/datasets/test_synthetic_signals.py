"""``synthetic(signals=...)``: within-type latents that the H&E shows and that drive genes; the default is unchanged."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from scipy.stats import spearmanr
from skimage.measure import regionprops

import ghist
from ghist.datasets._signals import SIGNAL_GENES, SIGNALS

from ..test_regression import assert_images_close, block_means

# The default output (H&E, nuclei, counts, centroids, types) of three slides: turning the signals off must give the very
# same slides (the regression test trains on the first two). First pinned as one sha256 before the signals existed;
# the H&E's float kernels round differently on AVX-512 and AVX2 CPUs, so it is now pinned as 32-px block means and the
# rest exactly (`python -m tests.datasets.test_synthetic_signals --write`, 2026-12, on an AVX2 machine).
DEFAULT_PIN = Path(__file__).parents[1] / "data" / "synthetic_default.json"
DEFAULTS = [(0, 256, 24), (1, 192, 24), (1, 1024, None)]


def _pin_key(seed, size, n_genes) -> str:
    return f"seed={seed} size={size} n_genes={n_genes}"


def _pin(sdata) -> dict:
    h = hashlib.sha256()
    t = sdata["table"]
    for a in (sdata["nuclei"].values, t.X.data, t.X.indices, t.X.indptr, t.obsm["spatial"],
              t.obs["cell_type"].cat.codes.to_numpy()):  # fmt: skip
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return {"sha256": h.hexdigest(), "he_blocks": block_means(sdata["he"].values, block=32)}


@pytest.fixture(scope="module")
def sig_sdata():
    return ghist.datasets.synthetic(image_size=384, seed=2, signals="all")


@pytest.fixture(scope="module")
def features(sig_sdata):
    """Per-nucleus features measured from the rendered H&E and the labels only, in table order."""
    he = np.asarray(sig_sdata["he"].values).transpose(1, 2, 0).astype(float)
    labels = np.asarray(sig_sdata["nuclei"].values)
    props = regionprops(labels, intensity_image=he.mean(-1))
    ids = np.array([p.label for p in props])
    area = np.array([p.area for p in props], float)
    mean = np.array([p.intensity_mean for p in props])
    std = np.array([p.image_intensity[p.image].std() for p in props])
    ring = ndi.grey_dilation(labels, size=7) * (labels == 0)  # the 3 px around each nucleus, outside all nuclei
    ring_green = ndi.mean(he[..., 1], ring, ids)  # eosin absorbs green
    xy = np.array([p.centroid for p in props])[:, ::-1]
    small_dark = (area < np.quantile(area, 0.35)) & (mean < np.quantile(mean, 0.5))  # lymphocyte-like nuclei
    near = cKDTree(xy).query_ball_point(xy, 30.0)
    n_small_dark = np.array([small_dark[v].sum() - small_dark[i] for i, v in enumerate(near)], float)
    order = np.searchsorted(ids, sig_sdata["table"].obs["cell_id"].to_numpy())
    return {"area": area[order], "mean": mean[order], "std": std[order], "ring_green": ring_green[order],
            "n_small_dark": n_small_dark[order]}  # fmt: skip


@pytest.mark.parametrize(("seed", "size", "n_genes"), DEFAULTS)
def test_default_output_unchanged(seed, size, n_genes):
    sdata = ghist.datasets.synthetic(seed=seed, image_size=size, n_genes=n_genes)
    got, pinned = _pin(sdata), json.loads(DEFAULT_PIN.read_text())[_pin_key(seed, size, n_genes)]
    assert got["sha256"] == pinned["sha256"]
    assert_images_close(got["he_blocks"], pinned["he_blocks"])
    table = sdata["table"]
    assert "signals" not in table.uns["synthetic"]
    assert not set(SIGNALS) & set(table.obs.columns)


def test_signals_recorded(sig_sdata):
    table = sig_sdata["table"]
    meta = table.uns["synthetic"]
    assert json.loads(json.dumps(meta)) == meta
    assert list(meta["signals"]) == list(SIGNALS)
    assert meta["signal_strength"] == 1.0
    for name in SIGNALS:
        latent = table.obs[name].to_numpy()
        assert latent.dtype == np.float64
        assert latent.min() >= 0
        assert latent.max() <= 1
        assert latent.std() > 0.1, name
        rec = meta["signals"][name]
        assert rec["genes"] == list(SIGNAL_GENES[name])
        assert "Malignant" in rec["cell_types"]
    X = table.X
    assert np.array_equal(X.data, np.round(X.data))
    assert X.data.min() > 0


@pytest.mark.parametrize("name", SIGNALS)
def test_latent_drives_its_genes_within_type(sig_sdata, name):
    table = sig_sdata["table"]
    mal = (table.obs["cell_type"] == "Malignant").to_numpy()
    assert mal.sum() >= 50
    latent = table.obs[name].to_numpy()[mal]
    X = table[mal].X.toarray()
    genes = list(table.var_names)
    for gene in table.uns["synthetic"]["signals"][name]["genes"]:
        rho = spearmanr(latent, np.log1p(X[:, genes.index(gene)]))[0]
        assert rho > 0.5, (name, gene, rho)
    # genes no signal drives do not follow the latent
    free = [genes.index(g) for g in genes if not any(g in SIGNAL_GENES[s] for s in SIGNALS)]
    expressed = [g for g in free if (X[:, g] > 0).mean() > 0.3]
    rhos = [spearmanr(latent, np.log1p(X[:, g]))[0] for g in expressed]
    assert np.median(np.abs(rhos)) < 0.2


def test_proliferation_is_in_the_nucleus(sig_sdata, features):
    """Cycling cells have bigger, darker, coarser nuclei, measured from the image and labels within one type."""
    obs = sig_sdata["table"].obs
    for cell_type in ("Malignant", "T"):
        sel = (obs["cell_type"] == cell_type).to_numpy()
        p = obs["proliferation"].to_numpy()[sel]
        assert (p > 0).sum() >= 10, cell_type
        assert spearmanr(features["area"][sel], p)[0] > 0.3, cell_type
        assert spearmanr(features["mean"][sel], p)[0] < -0.4, cell_type  # darker


def test_context_signals_are_in_the_image(sig_sdata, features):
    obs = sig_sdata["table"].obs
    mal = (obs["cell_type"] == "Malignant").to_numpy()
    # hypoxic malignant cells: more eosinophilic cytoplasm around the nucleus
    assert spearmanr(features["ring_green"][mal], obs["hypoxia"].to_numpy()[mal], nan_policy="omit")[0] < -0.5
    # the neighbourhood latent follows the lymphocyte-like nuclei seen around a cell
    assert spearmanr(features["n_small_dark"][mal], obs["neighbourhood"].to_numpy()[mal])[0] > 0.5


def test_extra_counts_only_add_to_driven_genes():
    """Hypoxia alone changes no nucleus: the slide is the default one, plus counts of the hypoxia genes."""
    base = ghist.datasets.synthetic(image_size=256, seed=0)
    hyp = ghist.datasets.synthetic(image_size=256, seed=0, signals="hypoxia", signal_strength=2.0)
    assert np.array_equal(np.asarray(base["nuclei"].values), np.asarray(hyp["nuclei"].values))
    genes = list(base["table"].var_names)
    driven = [genes.index(g) for g in SIGNAL_GENES["hypoxia"]]
    Xb, Xh = base["table"].X.toarray(), hyp["table"].X.toarray()
    others = np.setdiff1d(np.arange(len(genes)), driven)
    assert np.array_equal(Xb[:, others], Xh[:, others])
    extra = Xh[:, driven] - Xb[:, driven]
    assert extra.min() >= 0
    mal = (hyp["table"].obs["cell_type"] == "Malignant").to_numpy()
    assert extra[~mal].sum() == 0  # only malignant cells respond
    assert extra[mal].sum() > 0
    assert hyp["table"].uns["synthetic"]["signals"]["hypoxia"]["extra_counts_at_1"]["NDUFA4L2"] == 10.0
    assert list(hyp["table"].uns["synthetic"]["signals"]) == ["hypoxia"]
    assert "proliferation" not in hyp["table"].obs


def test_signals_reproducible(sig_sdata):
    again = ghist.datasets.synthetic(image_size=384, seed=2, signals=list(reversed(SIGNALS)))
    assert np.array_equal(np.asarray(again["he"].values), np.asarray(sig_sdata["he"].values))
    assert np.array_equal(np.asarray(again["nuclei"].values), np.asarray(sig_sdata["nuclei"].values))
    assert np.array_equal(again["table"].X.toarray(), sig_sdata["table"].X.toarray())
    for name in SIGNALS:
        assert np.array_equal(again["table"].obs[name].to_numpy(), sig_sdata["table"].obs[name].to_numpy())
    other = ghist.datasets.synthetic(image_size=384, seed=3, signals="all")
    assert not np.array_equal(np.asarray(other["nuclei"].values), np.asarray(sig_sdata["nuclei"].values))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"signals": "mitosis"}, "unknown signals"),
        ({"signals": ["hypoxia", "hypoxia"]}, "more than once"),
        ({"signals": [1]}, "unknown signals"),
        ({"signals": "all", "signal_strength": 0}, "signal_strength"),
        ({"signals": "all", "signal_strength": -1.0}, "signal_strength"),
        ({"signals": "all", "signal_strength": float("nan")}, "signal_strength"),
        ({"signals": "all", "signal_strength": True}, "signal_strength"),
        ({"signals": "all", "signal_strength": "2"}, "signal_strength"),
        ({"signal_strength": 2.0}, "no effect without `signals`"),
        ({"signals": "neighbourhood", "n_genes": 3}, "CD274"),
    ],
)
def test_bad_signal_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ghist.datasets.synthetic(image_size=64, **kwargs)


if __name__ == "__main__" and "--write" in sys.argv:
    pins = {_pin_key(*k): _pin(ghist.datasets.synthetic(seed=k[0], image_size=k[1], n_genes=k[2])) for k in DEFAULTS}
    DEFAULT_PIN.write_text(json.dumps(pins) + "\n")
    print(f"wrote {DEFAULT_PIN}")
