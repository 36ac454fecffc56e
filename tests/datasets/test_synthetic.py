import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import spatialdata
from scipy.ndimage import binary_dilation
from scipy.spatial import cKDTree
from skimage.measure import regionprops
from sklearn.ensemble import RandomForestClassifier
from spatialdata.models import get_table_keys
from spatialdata.transformations import Affine, Identity, Scale, get_transformation

import ghist
from ghist._centroids import label_centroids
from ghist._constants import XENIUM_BREAST_CELL_TYPES
from ghist._validation import get_image, get_labels, table_annotation
from ghist.datasets._profiles import load_profiles


@pytest.fixture(scope="module")
def default_sdata():
    return ghist.datasets.synthetic()


@pytest.fixture(scope="module")
def small_sdata():
    return ghist.datasets.synthetic(image_size=160, n_genes=40, seed=3)


def _arrays(sdata):
    table = sdata["table"]
    return (
        np.asarray(sdata["he"].values),
        np.asarray(sdata["nuclei"].values),
        table.X.toarray(),
        table.obs["cell_type"].astype(str).to_numpy(),
        table.obsm["spatial"],
    )


def _transform_matrix(element, cs="global"):
    return get_transformation(element, cs).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


# --------------------------------------------------------------------------------------------------------------------
# package data
# --------------------------------------------------------------------------------------------------------------------


def test_package_profiles():
    prof = load_profiles()
    assert prof.counts.shape == (5508, 280)
    assert len(prof.genes) == 280
    assert len(set(prof.genes)) == 280
    assert prof.cell_type_names == tuple(XENIUM_BREAST_CELL_TYPES)
    assert set(np.unique(prof.cell_type)) == set(range(9))
    assert prof.counts.data.min() > 0
    assert prof.nucleus_area.shape == (5508,)
    assert prof.nucleus_area.min() > 0


# --------------------------------------------------------------------------------------------------------------------
# synthetic(): contract
# --------------------------------------------------------------------------------------------------------------------


def test_default_contract(default_sdata):
    sdata = default_sdata
    he = get_image(sdata, "he")
    labels = get_labels(sdata, "nuclei")
    assert he.dims == ("c", "y", "x")
    assert he.dtype == np.uint8
    assert he.sizes["c"] == 3
    assert he.sizes["y"] == he.sizes["x"] == 1024
    assert labels.dims == ("y", "x")
    assert labels.dtype == np.int32
    assert labels.shape == (1024, 1024)

    table = sdata["table"]
    assert table_annotation(sdata, "table", "nuclei") == ("region", "cell_id")
    regions, region_key, instance_key = get_table_keys(table)
    assert regions == "nuclei"
    assert region_key == "region"
    assert instance_key == "cell_id"
    assert table.n_obs >= 3000
    assert table.n_vars == 280
    assert list(table.var_names) == list(load_profiles().genes)

    # every labelled nucleus is in the table and vice versa; ids are 1..n
    ids = np.unique(np.asarray(labels.values))
    assert ids[0] == 0
    assert np.array_equal(np.sort(table.obs["cell_id"].to_numpy()), ids[1:])
    assert np.array_equal(ids[1:], np.arange(1, table.n_obs + 1))

    assert isinstance(table.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert list(table.obs["cell_type"].cat.categories) == list(XENIUM_BREAST_CELL_TYPES)
    assert set(table.obs["cell_type"]) == set(XENIUM_BREAST_CELL_TYPES)  # every type occurs at default size

    # coordinate systems on every element
    for name in ("he", "nuclei"):
        assert set(spatialdata.transformations.get_transformation(sdata[name], get_all=True)) == {"global", "microns"}
    assert isinstance(get_transformation(sdata["nuclei"], "global"), Identity)
    assert np.allclose(_transform_matrix(sdata["nuclei"], "microns"), np.diag([0.5, 0.5, 1]))

    meta = table.uns["synthetic"]
    assert json.loads(json.dumps(meta)) == meta
    assert meta["seed"] == 0
    assert meta["pixel_size"] == 0.5


def test_counts_are_sparse_raw_integers(default_sdata):
    X = default_sdata["table"].X
    assert sp.issparse(X)
    assert X.format == "csr"
    assert X.data.min() >= 0
    assert np.array_equal(X.data, np.round(X.data))
    density = X.nnz / np.prod(X.shape)
    assert 0.05 < density < 0.5
    assert (np.asarray(X.sum(axis=1)).ravel() > 0).mean() > 0.95


def test_centroids_match_spatialdata(small_sdata):
    table = small_sdata["table"]
    cent = spatialdata.get_centroids(small_sdata["nuclei"], coordinate_system="global").compute()
    cent = cent.loc[table.obs["cell_id"].to_numpy()]
    assert np.allclose(table.obsm["spatial"], cent[["x", "y"]].to_numpy())
    # computed by the one centroid rule, not a copy of it
    np.testing.assert_array_equal(table.obsm["spatial"], label_centroids(small_sdata["nuclei"]).xy)


def test_expression_follows_real_type_means(default_sdata):
    table = default_sdata["table"]
    prof = load_profiles()
    real = np.log1p(prof.type_mean())
    X = table.X.tocsr()
    types = table.obs["cell_type"].astype(str).to_numpy()
    corr = {}
    for t, name in enumerate(XENIUM_BREAST_CELL_TYPES):
        sel = types == name
        assert sel.sum() >= 20, name
        syn = np.log1p(np.asarray(X[sel].mean(axis=0)).ravel())
        r = [np.corrcoef(syn, real[k])[0, 1] for k in range(len(real))]
        corr[name] = r[t]
        assert r[t] > 0.95, (name, r[t])
        assert r[t] == max(r), (name, r)  # closest to its own real type


def test_determinism(small_sdata):
    again = ghist.datasets.synthetic(image_size=160, n_genes=40, seed=3)
    for a, b in zip(_arrays(small_sdata), _arrays(again)):
        assert np.array_equal(a, b)
    other = ghist.datasets.synthetic(image_size=160, n_genes=40, seed=4)
    assert not np.array_equal(np.asarray(other["nuclei"].values), np.asarray(small_sdata["nuclei"].values))
    assert not np.array_equal(np.asarray(other["he"].values), np.asarray(small_sdata["he"].values))


def test_n_genes_picks_variable_genes(small_sdata):
    prof = load_profiles()
    genes = list(small_sdata["table"].var_names)
    assert len(genes) == 40
    order = [prof.genes.index(g) for g in genes]
    assert order == sorted(order)  # panel order
    top = {prof.genes[i] for i in prof.variable_genes()[:40]}
    assert set(genes) == top
    assert {"ERBB2", "PTPRC"} <= set(genes)


def test_cell_types_subset():
    sdata = ghist.datasets.synthetic(image_size=192, cell_types=["T", "Malignant", "Fibroblast"], seed=2)
    obs = sdata["table"].obs
    assert list(obs["cell_type"].cat.categories) == ["T", "Malignant", "Fibroblast"]
    assert set(obs["cell_type"]) <= {"T", "Malignant", "Fibroblast"}
    assert (obs["cell_type"] == "Malignant").sum() > 0
    assert (obs["cell_type"] == "T").sum() > 0


def test_n_cells():
    sdata = ghist.datasets.synthetic(image_size=128, n_cells=25, n_genes=12, seed=0)
    table = sdata["table"]
    assert table.n_obs == 25
    assert table.n_vars == 12
    labels = np.asarray(sdata["nuclei"].values)
    assert np.array_equal(np.unique(labels), np.arange(26))
    with pytest.warns(UserWarning, match="fit"):
        few = ghist.datasets.synthetic(image_size=64, n_cells=10_000, seed=0)
    assert few["table"].n_obs < 10_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 8}, "image_size"),
        ({"n_genes": 0}, "n_genes"),
        ({"n_genes": 281}, "n_genes"),
        ({"cell_types": ["T", "Neuron"]}, "Neuron"),
        ({"cell_types": []}, "empty"),
        ({"image_transform": "rotate"}, "image_transform"),
        ({"pixel_size": -1.0}, "pixel_size"),
        ({"n_cells": 0}, "n_cells"),
        ({"image_scale": 0.5}, "image_scale"),
        ({"image_transform": "scale", "image_scale": 10.0}, "image_scale"),
        ({"image_size": 48, "cell_types": ["Epithelial"], "seed": 1}, "No cell"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ghist.datasets.synthetic(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# synthetic(): the picture
# --------------------------------------------------------------------------------------------------------------------


def test_looks_like_he(small_sdata):
    he = np.asarray(small_sdata["he"].values).astype(float)
    labels = np.asarray(small_sdata["nuclei"].values)
    r, g, b = he
    nuc = labels > 0
    # nuclei: dark and blue-purple (hematoxylin)
    assert he[:, nuc].mean() < he[:, ~nuc].mean() - 40
    assert (b[nuc] > r[nuc] + 20).mean() > 0.9
    # around nuclei: pink (eosin: green absorbed most) and lighter
    tissue = ~nuc & (he.mean(0) < 225)
    assert (r[tissue] > g[tissue] + 20).mean() > 0.8
    # nucleus pixels are darker than a ring just outside them (labels match the painted nuclei)
    ring = binary_dilation(nuc, iterations=2) & ~binary_dilation(nuc, iterations=1)
    assert he.mean(0)[nuc].mean() < he.mean(0)[ring].mean() - 30


def test_spatial_organisation(default_sdata):
    table = default_sdata["table"]
    xy = table.obsm["spatial"]
    types = table.obs["cell_type"].astype(str).to_numpy()
    _, nn = cKDTree(xy).query(xy, k=7)
    # cells of a compartment cluster together: tumour nests, B-cell follicles, ducts, vessel walls
    for name in ("Malignant", "B", "Epithelial", "Endothelial"):
        sel = types == name
        same = (types[nn[sel, 1:]] == name).mean()
        assert same > 2.5 * sel.mean(), name
    # neighbourhoods carry information: the neighbours of malignant cells differ from those of T cells
    mal = (types[nn[types == "Malignant", 1:]] == "Malignant").mean()
    t_cells = (types[nn[types == "T", 1:]] == "Malignant").mean()
    assert mal > t_cells + 0.3


@pytest.mark.parametrize("he_transform", ["scale", "affine"])
def test_he_transformation_is_honoured(he_transform):
    sdata = ghist.datasets.synthetic(image_size=192, n_genes=10, image_transform=he_transform, seed=5)
    he = np.asarray(sdata["he"].values).astype(float).mean(0)
    tr = get_transformation(sdata["he"], "global")
    assert isinstance(tr, Scale if he_transform == "scale" else Affine)
    matrix = _transform_matrix(sdata["he"])
    assert not np.allclose(matrix, np.eye(3))
    # microns = global scaled by the pixel size
    assert np.allclose(_transform_matrix(sdata["he"], "microns"), np.diag([0.5, 0.5, 1]) @ matrix)

    xy = sdata["table"].obsm["spatial"]
    pix = np.linalg.inv(matrix) @ np.c_[xy, np.ones(len(xy))].T
    col, row = np.floor(pix[0]).astype(int), np.floor(pix[1]).astype(int)
    assert (col >= 0).all()
    assert (row >= 0).all()
    assert (col < he.shape[1]).all()
    assert (row < he.shape[0]).all()
    on_nuclei = (he[row, col] < 150).mean()
    assert on_nuclei > 0.9
    # ignoring the transformation misses the nuclei
    inside = (xy[:, 0] < he.shape[1]) & (xy[:, 1] < he.shape[0])
    naive = he[np.floor(xy[inside, 1]).astype(int), np.floor(xy[inside, 0]).astype(int)]
    assert (naive < 150).mean() < on_nuclei - 0.25


def _nucleus_features(sdata):
    he = np.asarray(sdata["he"].values).transpose(1, 2, 0).astype(float)
    labels = np.asarray(sdata["nuclei"].values)
    feats, ids = [], []
    for reg in regionprops(labels, intensity_image=np.dstack([he, he.mean(-1)])):
        px = reg.image_intensity[reg.image]
        feats.append([*px[:, :3].mean(0), reg.area, reg.eccentricity, reg.solidity, px[:, 3].std()])
        ids.append(reg.label)
    types = sdata["table"].obs.set_index("cell_id").loc[ids, "cell_type"].astype(str).to_numpy()
    return np.array(feats), types


def test_types_are_morphologically_separable():
    x_train, y_train = _nucleus_features(ghist.datasets.synthetic(image_size=384, n_genes=10, seed=0))
    x_test, y_test = _nucleus_features(ghist.datasets.synthetic(image_size=384, n_genes=10, seed=1))
    assert len(set(y_train)) == 9
    assert len(y_test) > 300
    clf = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1).fit(x_train, y_train)
    accuracy = (clf.predict(x_test) == y_test).mean()
    assert accuracy >= 0.85


# --------------------------------------------------------------------------------------------------------------------
# synthetic_reference()
# --------------------------------------------------------------------------------------------------------------------


def test_synthetic_reference():
    ref = ghist.datasets.synthetic_reference(n_cells_per_type=60, seed=1)
    prof = load_profiles()
    assert ref.shape == (60 * 9, 280)
    assert list(ref.var_names) == list(prof.genes)
    assert list(ref.obs["cell_type"].cat.categories) == list(XENIUM_BREAST_CELL_TYPES)
    assert (ref.obs["cell_type"].value_counts() == 60).all()
    X = ref.X
    assert sp.issparse(X)
    assert X.data.min() >= 0
    assert np.array_equal(X.data, np.round(X.data))
    # a different platform: larger libraries than Xenium ...
    lib = np.asarray(X.sum(axis=1)).ravel()
    assert np.median(lib) > 2 * np.median(np.asarray(prof.counts.sum(axis=1)).ravel())
    # ... but each type still resembles its own real type most
    real = np.log1p(prof.type_mean() / prof.type_mean().sum(1, keepdims=True) * 1e3)
    types = ref.obs["cell_type"].astype(str).to_numpy()
    for t, name in enumerate(XENIUM_BREAST_CELL_TYPES):
        m = np.asarray(X[types == name].mean(axis=0)).ravel()
        syn = np.log1p(m / m.sum() * 1e3)
        r = [np.corrcoef(syn, real[k])[0, 1] for k in range(len(real))]
        assert r[t] == max(r), (name, r)
        assert r[t] > 0.6, (name, r)

    again = ghist.datasets.synthetic_reference(n_cells_per_type=60, seed=1)
    assert np.array_equal(again.X.toarray(), X.toarray())
    assert not np.array_equal(ghist.datasets.synthetic_reference(n_cells_per_type=60, seed=2).X.toarray(), X.toarray())


def test_synthetic_reference_subsets():
    ref = ghist.datasets.synthetic_reference(n_cells_per_type=5, genes=["ERBB2", "CD3E"], cell_types=["T", "B"])
    assert ref.shape == (10, 2)
    assert list(ref.var_names) == ["ERBB2", "CD3E"]
    assert list(ref.obs["cell_type"].cat.categories) == ["T", "B"]
    with pytest.raises(KeyError, match="NOTAGENE"):
        ghist.datasets.synthetic_reference(genes=["NOTAGENE"])
    with pytest.raises(ValueError, match="n_cells_per_type"):
        ghist.datasets.synthetic_reference(n_cells_per_type=0)
