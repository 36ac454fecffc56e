"""Inputs ``make_tiles`` must refuse (or flag) before cutting: wrong extents, duplicate genes, non-SpatialData samples,
normalised counts, label ids out of range; every message names the sample and the element."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from spatialdata.models import Labels2DModel
from spatialdata.transformations import Identity, Scale, get_transformation, set_transformation

from ghist._validation import ValidationError
from ghist.pp import make_tiles

T = 16


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("ghist").setLevel(logging.WARNING)
    yield
    logging.getLogger("ghist").setLevel(logging.INFO)


def _tiles(sdata, tmp_path, **kwargs):
    kwargs = {"tile_size": T, "progress": False, "path": tmp_path / "tiles.zarr", **kwargs}
    return make_tiles(sdata, **kwargs)


def _same_transform_as_image(sdata):
    """Give the labels exactly the image's transformations (a forgotten ``Scale``)."""
    for cs, t in get_transformation(sdata.images["he"], get_all=True).items():
        set_transformation(sdata.labels["nuclei"], t, cs)
    return sdata


# ------------------------------------------------------------------------------------------------ extents
@pytest.mark.parametrize("labels_scale", [2.0, 0.5], ids=["labels_half", "labels_double"])
def test_labels_of_another_size_under_the_same_transform_are_refused(labels_scale, tmp_path, make_sdata):
    sdata = _same_transform_as_image(make_sdata(seed=0, labels_scale=labels_scale))
    with pytest.raises(ValueError, match=r"'he' and labels 'nuclei' have the same transformation.*different extents"):
        _tiles(sdata, tmp_path)
    assert not (tmp_path / "tiles.zarr").exists()


def test_extent_errors_name_the_sample(tmp_path, make_sdata):
    good = make_sdata(seed=1)
    half = _same_transform_as_image(make_sdata(seed=2, labels_scale=2.0))
    double = _same_transform_as_image(make_sdata(seed=3, labels_scale=0.5))
    with pytest.raises(ValueError, match=r"Sample 'b': .*same transformation"):
        _tiles({"a": good, "b": half}, tmp_path)
    with pytest.raises(ValidationError, match=r"(?s)sample 'a': .*same transformation.*sample 'b': .*same trans"):
        _tiles({"a": half, "b": double}, tmp_path)


def test_labels_reaching_beyond_the_image_warn(tmp_path, make_sdata, caplog):
    sdata = make_sdata(seed=4)
    # the labels, scaled right, reach 50% beyond the image in x and y
    set_transformation(sdata.labels["nuclei"], Scale([1.5, 1.5], axes=("y", "x")), "global")
    set_transformation(sdata.labels["nuclei"], Scale([0.75, 0.75], axes=("y", "x")), "microns")
    with caplog.at_level(logging.WARNING, logger="ghist"):
        _tiles(sdata, tmp_path, fold=None)
    assert any("covers" in r.getMessage() and "'nuclei'" in r.getMessage() for r in caplog.records)


def test_spot_samples_check_extents_too(tmp_path, make_sdata):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from spatialdata.models import ShapesModel, TableModel

    sdata = _same_transform_as_image(make_sdata(seed=5, labels_scale=2.0))
    sdata.shapes["spots"] = ShapesModel.parse(
        np.array([[20.0, 20.0], [60.0, 20.0]]), geometry=0, radius=np.array([15.0, 15.0])
    )
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * 2), "spot": np.arange(2)}, index=["s0", "s1"])
    counts = ad.AnnData(sp.csr_matrix(np.ones((2, 3), dtype=np.float32)), obs=obs)
    sdata.tables["spot_counts"] = TableModel.parse(counts, region="spots", region_key="region", instance_key="spot")
    with pytest.raises(ValueError, match="same transformation"):
        _tiles(sdata, tmp_path, spots_key="spots", table_key="spot_counts")


# ------------------------------------------------------------------------------------------------ tables
def test_duplicate_gene_names_are_named(tmp_path, make_sdata):
    names = ["G0", "G1", "G1", "G3", "G4", "G5", "G6", "G7"]
    with pytest.warns(UserWarning, match="not unique"):  # anndata's own warning when the table is built
        dup = make_sdata(seed=6, gene_names=names)
    with pytest.raises(ValueError, match=r"Table 'table' has duplicated gene names \['G1'\]"):
        _tiles(dup, tmp_path)
    with pytest.raises(ValueError, match=r"Sample 'b': Table 'table' has duplicated gene names \['G1'\]"):
        _tiles({"a": make_sdata(seed=7), "b": dup}, tmp_path)
    with pytest.raises(ValueError, match=r"duplicated gene names"):  # also when the genes are chosen
        _tiles(dup, tmp_path, genes=["G0", "G3"])
    assert not (tmp_path / "tiles.zarr").exists()


def test_anndata_instead_of_spatialdata(tmp_path, make_sdata):
    table = make_sdata(seed=8).tables["table"]
    with pytest.raises(TypeError, match=r"got an AnnData.*SpatialData"):
        _tiles(table, tmp_path)
    with pytest.raises(TypeError, match=r"Sample 'x' is an AnnData"):
        _tiles({"x": table}, tmp_path)
    with pytest.raises(TypeError, match=r"Sample '1' is a str"):
        _tiles([make_sdata(seed=8), "sample.zarr"], tmp_path)


def test_normalised_table_is_refused_naming_the_layer(tmp_path, make_sdata):
    sdata = make_sdata(seed=9)
    table = sdata.tables["table"]
    table.layers["counts"] = table.X.copy()
    table.X = np.log1p(table.X.toarray())
    with pytest.raises(ValueError, match=r"(?s)table 'table' `X` holds non-integer.*raw counts.*layer='counts'"):
        _tiles(sdata, tmp_path)
    assert not (tmp_path / "tiles.zarr").exists()
    tiles = _tiles(sdata, tmp_path, layer="counts")  # the raw layer is accepted
    assert len(tiles) > 0
    other = make_sdata(seed=10)
    other.tables["table"].X = np.log1p(other.tables["table"].X.toarray())
    with pytest.raises(ValueError, match=r"table 'table' of sample 'b' `X` holds non-integer"):
        _tiles({"a": make_sdata(seed=11), "b": other}, tmp_path / "two")


# ------------------------------------------------------------------------------------------------ label ids
def _with_labels(sdata, values):
    labels = np.asarray(sdata.labels["nuclei"]).astype(values.dtype)
    labels[labels > 0] = values[0]
    labels[0, 0] = values[1]
    t = get_transformation(sdata.labels["nuclei"], get_all=True)
    sdata.labels["nuclei"] = Labels2DModel.parse(labels, dims=("y", "x"), transformations=t)
    return sdata


@pytest.mark.parametrize(
    "values", [np.array([1, -3], dtype=np.int32), np.array([1, 2**31], dtype=np.uint32)], ids=["negative", "huge"]
)
def test_label_ids_out_of_range_name_the_sample(values, tmp_path, make_sdata):
    match = r"Labels 'nuclei' hold ids in \[.*\]; expected ids in \[0, 2147483647\]"
    with pytest.raises(ValueError, match=match):
        _tiles(_with_labels(make_sdata(seed=12), values), tmp_path)
    with pytest.raises(ValueError, match="Sample 'patient7': " + match):
        _tiles({"patient7": _with_labels(make_sdata(seed=12), values)}, tmp_path)
    with pytest.raises(ValueError, match="Sample 'b': " + match):
        _tiles({"a": make_sdata(seed=13), "b": _with_labels(make_sdata(seed=12), values)}, tmp_path)


def test_identity_labels_of_the_image_size_still_pass(tmp_path, make_sdata):
    """The extent check must not refuse the usual case: labels and image in one pixel space."""
    sdata = make_sdata(seed=14)
    set_transformation(sdata.labels["nuclei"], Identity(), "global")
    assert len(_tiles(sdata, tmp_path)) > 0
