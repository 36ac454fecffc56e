"""Hostile inputs to every public entry point: each must raise a clear error that names the culprit.

Every test asserts the exception type *and* that the message names the argument, element, key, gene or path at
fault (and, for a missing key, the keys that exist). Inputs are tiny and nothing is trained: the model is an
untrained ``GHISTModel`` (``predict`` warns about that, which is fine here).
"""

from __future__ import annotations

import math
import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

import ghist

HYP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BAD_NUMBERS = [0, -1, float("nan"), True]  # bool is an int to Python but never a count of anything
NOT_SDATA = ["adata", "string", None]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base() -> sd.SpatialData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ghist.datasets.synthetic(image_size=128, n_genes=8, seed=0)


@pytest.fixture(scope="module")
def genes(base) -> list[str]:
    return list(base["table"].var_names)


@pytest.fixture(scope="module")
def cell_types(base) -> list[str]:
    return sorted(base["table"].obs["cell_type"].astype(str).unique())


@pytest.fixture(scope="module")
def model(genes, cell_types) -> ghist.GHISTModel:
    return ghist.GHISTModel(genes, cell_types, width=4, embed_dim=8, tile_size=32)


@pytest.fixture(scope="module")
def predicted(base, model, genes) -> sd.SpatialData:
    """The base slide with a `ghist` prediction table and Visium-like spots with a raw-count spot table."""
    sdata = sd.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False)
    centres = np.array([[x, y] for x in (24.0, 64.0, 104.0) for y in (24.0, 64.0, 104.0)])
    sdata.shapes["spots"] = ShapesModel.parse(
        centres, geometry=0, radius=np.full(len(centres), 18.0), transformations={"global": Identity()}
    )
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * len(centres)), "spot_id": np.arange(len(centres))})
    obs.index = obs.index.astype(str)
    counts = ad.AnnData(rng.poisson(20, (len(centres), len(genes))).astype(np.float32), obs=obs)
    counts.var_names = genes
    sdata.tables["spot_counts"] = TableModel.parse(counts, region="spots", region_key="region", instance_key="spot_id")
    return sdata


@pytest.fixture
def sdata(base) -> sd.SpatialData:
    return sd.deepcopy(base)


@pytest.fixture
def pred(predicted) -> sd.SpatialData:
    return sd.deepcopy(predicted)


@pytest.fixture(scope="module")
def reference(genes) -> ad.AnnData:
    return ghist.datasets.synthetic_reference(n_cells_per_type=6, genes=genes)


@pytest.fixture(scope="module")
def tiles(base, tmp_path_factory) -> ghist.pp.TileSet:
    return ghist.pp.make_tiles(
        sd.deepcopy(base),
        cell_type_key="cell_type",
        tile_size=32,
        n_folds=2,
        progress=False,
        path=tmp_path_factory.mktemp("tiles") / "t",
    )


@pytest.fixture(scope="module")
def cohort_adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    n = 30
    obs = pd.DataFrame(
        {"time": rng.uniform(1, 100, n), "event": rng.integers(0, 2, n)}, index=[f"P{i}" for i in range(n)]
    )
    return ad.AnnData(rng.normal(size=(n, 3)), obs=obs, var=pd.DataFrame(index=["f0", "f1", "f2"]))


def _not_sdata(kind: str, base: sd.SpatialData):
    return {"adata": base["table"].copy(), "string": "slide.zarr", "None": None}.get(str(kind))


def _dense(matrix) -> np.ndarray:
    return np.array(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float64)


def _replace_table(sdata: sd.SpatialData, X, key: str = "table") -> None:
    table = sdata.tables[key].copy()
    table.X = X
    del sdata.tables[key]
    sdata.tables[key] = table


def _with_image(sdata: sd.SpatialData, array: np.ndarray, c_coords=None) -> None:
    del sdata.images["he"]
    sdata.images["he"] = Image2DModel.parse(array, dims=("c", "y", "x"), c_coords=c_coords)


def _with_labels(sdata: sd.SpatialData, array: np.ndarray) -> None:
    del sdata.labels["nuclei"]
    sdata.labels["nuclei"] = Labels2DModel.parse(array, dims=("y", "x"))


def _quick_tiles(sdata, tmp_path, **kwargs):
    kwargs = {"tile_size": 32, "n_folds": 2, "progress": False, "path": tmp_path / "t", **kwargs}
    return ghist.pp.make_tiles(sdata, **kwargs)


# ---------------------------------------------------------------- pp.make_tiles


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_make_tiles_not_sdata(kind, base, tmp_path):
    with pytest.raises(TypeError, match="SpatialData"):
        _quick_tiles(_not_sdata(kind, base), tmp_path)


@pytest.mark.parametrize(
    ("arg", "key", "existing"),
    [("image_key", "hne", "he"), ("labels_key", "cells", "nuclei"), ("table_key", "counts", "table")],
)
def test_make_tiles_missing_key_lists_existing(arg, key, existing, sdata, tmp_path):
    with pytest.raises(KeyError) as err:
        _quick_tiles(sdata, tmp_path, **{arg: key})
    assert key in str(err.value)
    assert existing in str(err.value)


def test_make_tiles_missing_cell_type_column(sdata, tmp_path):
    with pytest.raises(KeyError, match=r"celltype.*cell_type"):
        _quick_tiles(sdata, tmp_path, cell_type_key="celltype")


def test_make_tiles_unknown_gene(sdata, tmp_path, genes):
    with pytest.raises(KeyError, match="NOTAGENE"):
        _quick_tiles(sdata, tmp_path, genes=[genes[0], "NOTAGENE"])


def test_make_tiles_empty_genes(sdata, tmp_path):
    with pytest.raises(ValueError, match="genes"):
        _quick_tiles(sdata, tmp_path, genes=[])


@pytest.mark.parametrize(
    ("value", "words"),
    [(np.nan, "NaN"), (-1.0, "negative"), (0.5, "non-integer")],
)
def test_make_tiles_bad_counts(value, words, sdata, tmp_path):
    X = _dense(sdata["table"].X)
    X[0, 0] = value
    _replace_table(sdata, X)
    with pytest.raises(ValueError, match=words):
        _quick_tiles(sdata, tmp_path)


def test_make_tiles_log1p_normalised_table(sdata, tmp_path):
    _replace_table(sdata, np.log1p(_dense(sdata["table"].X)))
    with pytest.raises(ValueError, match=r"(?i)non-integer|normalised"):
        _quick_tiles(sdata, tmp_path)


def test_make_tiles_duplicate_gene_names(sdata, tmp_path, genes):
    table = sdata["table"].copy()
    table.var_names = [genes[0], genes[0], *genes[2:]]
    del sdata.tables["table"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about non-unique names, which is the point
        sdata.tables["table"] = table
    with pytest.raises(ValueError, match=re.escape(genes[0])):
        _quick_tiles(sdata, tmp_path)


def test_make_tiles_float_image(sdata, tmp_path):
    _with_image(sdata, np.asarray(sdata["he"]).astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"'he'.*float32.*uint8"):
        _quick_tiles(sdata, tmp_path)


def test_make_tiles_four_channel_image(sdata, tmp_path):
    rgb = np.asarray(sdata["he"])
    _with_image(sdata, np.concatenate([rgb, rgb[:1]]), c_coords=["r", "g", "b", "a"])
    with pytest.raises(ValueError, match=r"'he'.*4 channels"):
        _quick_tiles(sdata, tmp_path)


def _with_float_labels(sdata: sd.SpatialData, dtype: type) -> None:
    """Float labels, as a store written by another tool can hold them; spatialdata >= 0.8 refuses to parse them, so
    the parsed integer labels get float data in place (what is tested is ghist's own check)."""
    labels = sdata.labels["nuclei"]
    labels.data = labels.data.astype(dtype)


def test_make_tiles_float_labels(sdata, tmp_path):
    _with_float_labels(sdata, np.float32)
    with pytest.raises(ValueError, match=r"'nuclei'.*float32.*integer"):
        _quick_tiles(sdata, tmp_path)


def test_make_tiles_labels_half_the_image_extent(sdata, tmp_path):
    """Labels at half the H&E resolution but with an identity transform cover a quarter of the image."""
    _with_labels(sdata, np.asarray(sdata["nuclei"])[::2, ::2].copy())
    with pytest.raises(ValueError, match=r"(?i)extent"):
        _quick_tiles(sdata, tmp_path)


@pytest.mark.parametrize("arg", ["tile_size", "n_folds", "spot_coverage", "spot_target_sum"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_make_tiles_bad_numbers(arg, value, sdata, tmp_path):
    with pytest.raises((ValueError, TypeError), match=arg):
        _quick_tiles(sdata, tmp_path, **{arg: value})


@pytest.mark.parametrize(("arg", "value"), [("tiling", "hexagons"), ("spot_scaling", "global")])
def test_make_tiles_unknown_option(arg, value, sdata, tmp_path):
    with pytest.raises(ValueError, match=rf"{arg}.*{value}"):
        _quick_tiles(sdata, tmp_path, **{arg: value})


def test_make_tiles_fold_out_of_range(sdata, tmp_path):
    with pytest.raises(ValueError, match="fold"):
        _quick_tiles(sdata, tmp_path, fold=7)


def test_make_tiles_empty_cohort(tmp_path):
    with pytest.raises(ValueError, match=r"(?i)no sample|empty"):
        _quick_tiles([], tmp_path)


def test_make_tiles_leaves_no_temp_folder_on_error(sdata, tmp_path):
    with pytest.raises(KeyError):
        _quick_tiles(sdata, tmp_path, genes=["NOTAGENE"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- pp.segment_nuclei


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_segment_not_sdata(kind, base):
    with pytest.raises(TypeError, match="SpatialData"):
        ghist.pp.segment_nuclei(_not_sdata(kind, base), progress=False)


def test_segment_missing_image(sdata):
    with pytest.raises(KeyError, match=r"'hne'.*'he'"):
        ghist.pp.segment_nuclei(sdata, image_key="hne", progress=False)


def test_segment_existing_labels(sdata):
    with pytest.raises(ValueError, match=r"'nuclei'.*overwrite"):
        ghist.pp.segment_nuclei(sdata, progress=False)


def test_segment_unknown_method(sdata):
    with pytest.raises(ValueError, match=r"method.*'magic'"):
        ghist.pp.segment_nuclei(sdata, key_added="seg", method="magic", progress=False)


def test_segment_float_image(sdata):
    _with_image(sdata, np.asarray(sdata["he"]).astype(np.float32))
    with pytest.raises(ValueError, match=r"'he'.*float32"):
        ghist.pp.segment_nuclei(sdata, key_added="seg", progress=False)


@pytest.mark.parametrize("arg", ["pixel_size", "min_area_um2", "max_area_um2", "chunk_size"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_segment_bad_numbers(arg, value, sdata):
    if arg == "min_area_um2" and value == 0:
        return  # no minimum area is a valid choice
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.pp.segment_nuclei(sdata, key_added="seg", progress=False, **{arg: value})


# ---------------------------------------------------------------- pp.reference_profiles


@pytest.mark.parametrize("bad", ["spatialdata", "string", None])
def test_reference_profiles_not_anndata(bad, base):
    value = base if bad == "spatialdata" else ("ref.h5ad" if bad == "string" else None)
    with pytest.raises(TypeError, match="AnnData"):
        ghist.pp.reference_profiles(value, "cell_type")


def test_reference_profiles_missing_groupby_lists_columns(reference):
    with pytest.raises(KeyError, match=r"'celltype'.*'cell_type'"):
        ghist.pp.reference_profiles(reference, "celltype")


def test_reference_profiles_unknown_gene(reference):
    with pytest.raises(KeyError, match="NOTAGENE"):
        ghist.pp.reference_profiles(reference, "cell_type", genes=["NOTAGENE"])


def test_reference_profiles_missing_layer(reference):
    with pytest.raises(KeyError, match=r"'counts'"):
        ghist.pp.reference_profiles(reference, "cell_type", layer="counts")


def test_reference_profiles_empty(reference):
    with pytest.raises(ValueError, match="no cells"):
        ghist.pp.reference_profiles(reference[:0].copy(), "cell_type")


@pytest.mark.parametrize(("value", "words"), [(np.nan, "NaN"), (-3.0, "negative")])
def test_reference_profiles_bad_counts(value, words, reference):
    ref = reference.copy()
    ref.X = _dense(ref.X)
    ref.X[0, 0] = value
    with pytest.raises(ValueError, match=words):
        ghist.pp.reference_profiles(ref, "cell_type")


def test_reference_profiles_non_numeric_matrix(reference):
    ref = reference.copy()
    ref.X = _dense(ref.X).astype(str).astype(object)
    with pytest.raises(ValueError, match=r"(?i)numeric"):
        ghist.pp.reference_profiles(ref, "cell_type")


def test_reference_profiles_groupby_not_string(reference):
    with pytest.raises((TypeError, KeyError), match="groupby"):
        ghist.pp.reference_profiles(reference, ["cell_type"])


# ---------------------------------------------------------------- pp.annotate_cell_types


@pytest.mark.parametrize("bad", ["spatialdata", "string", None])
def test_annotate_not_anndata(bad, base, reference):
    value = base if bad == "spatialdata" else ("x.h5ad" if bad == "string" else None)
    with pytest.raises(TypeError, match="adata"):
        ghist.pp.annotate_cell_types(value, reference, groupby="cell_type")
    with pytest.raises(TypeError, match="reference"):
        ghist.pp.annotate_cell_types(base["table"].copy(), value, groupby="cell_type")


def test_annotate_missing_groupby(base, reference):
    with pytest.raises(KeyError, match=r"'celltype'.*'cell_type'"):
        ghist.pp.annotate_cell_types(base["table"].copy(), reference, groupby="celltype")


@pytest.mark.parametrize(("arg", "value"), [("method", "knn"), ("correlation", "kendall")])
def test_annotate_unknown_option(arg, value, base, reference):
    with pytest.raises(ValueError, match=rf"{arg}.*{value}"):
        ghist.pp.annotate_cell_types(base["table"].copy(), reference, groupby="cell_type", **{arg: value})


@pytest.mark.parametrize("arg", ["n_neighbors", "n_comps", "target_sum"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_annotate_bad_numbers(arg, value, base, reference):
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.pp.annotate_cell_types(
            base["table"].copy(), reference, groupby="cell_type", key_added="ct", **{arg: value}
        )


def test_annotate_no_shared_gene(base, reference):
    ref = reference.copy()
    ref.var_names = [f"X{i}" for i in range(ref.n_vars)]
    with pytest.raises(ValueError, match=r"share no gene"):
        ghist.pp.annotate_cell_types(base["table"].copy(), ref, groupby="cell_type", key_added="ct")


def test_annotate_unknown_gene(base, reference):
    with pytest.raises(KeyError, match="NOTAGENE"):
        ghist.pp.annotate_cell_types(
            base["table"].copy(), reference, groupby="cell_type", key_added="ct", genes=["NOTAGENE"]
        )


def test_annotate_existing_column(base, reference):
    with pytest.raises(ValueError, match=r"'cell_type'.*overwrite"):
        ghist.pp.annotate_cell_types(base["table"].copy(), reference, groupby="cell_type")


@pytest.mark.parametrize(("value", "words"), [(np.nan, "NaN"), (-2.0, "negative")])
def test_annotate_bad_counts(value, words, base, reference):
    adata = base["table"].copy()
    adata.X = _dense(adata.X)
    adata.X[0, 0] = value
    with pytest.raises(ValueError, match=words):
        ghist.pp.annotate_cell_types(adata, reference, groupby="cell_type", key_added="ct")


def test_annotate_empty(base, reference):
    with pytest.raises(ValueError, match="no cells"):
        ghist.pp.annotate_cell_types(base["table"][:0].copy(), reference, groupby="cell_type", key_added="ct")


# ---------------------------------------------------------------- pp.prepare_xenium


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_prepare_xenium_not_sdata(kind, base):
    with pytest.raises(TypeError, match="SpatialData"):
        ghist.pp.prepare_xenium(_not_sdata(kind, base))


def test_prepare_xenium_missing_labels_lists_existing(sdata):
    with pytest.raises(KeyError, match=r"'nucleus_labels'.*'nuclei'"):
        ghist.pp.prepare_xenium(sdata)


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_prepare_xenium_bad_pixel_size(value, sdata):
    with pytest.raises((ValueError, TypeError), match="pixel_size"):
        ghist.pp.prepare_xenium(sdata, labels_key="nuclei", pixel_size=value)


# ---------------------------------------------------------------- pp.TileSet


@pytest.mark.parametrize("bad", [None, 3])
def test_tileset_open_wrong_type(bad):
    with pytest.raises(TypeError, match="path"):
        ghist.pp.TileSet.open(bad)


def test_tileset_open_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        ghist.pp.TileSet.open(tmp_path / "nope")


def test_tileset_open_not_a_tileset(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises((FileNotFoundError, ValueError), match="junk"):
        ghist.pp.TileSet.open(tmp_path / "junk")


@pytest.mark.parametrize("fold", [0, -1, 3, True, 1.5])
def test_tileset_with_fold_bad(fold, tiles):
    with pytest.raises((ValueError, TypeError), match="fold"):
        tiles.with_fold(fold)


@pytest.mark.parametrize("n_folds", [0, 1, -2, True])
def test_tileset_with_fold_bad_n_folds(n_folds, tiles):
    with pytest.raises((ValueError, TypeError), match="n_folds"):
        tiles.with_fold(1, n_folds=n_folds)


def test_tileset_loader_unknown_split(tiles):
    with pytest.raises(ValueError, match=r"split.*'training'"):
        tiles.loader("training")


@pytest.mark.parametrize(("arg", "value"), [("batch_size", 0), ("batch_size", -3), ("num_workers", -1)])
def test_tileset_loader_bad_numbers(arg, value, tiles):
    with pytest.raises((ValueError, TypeError), match=arg):
        tiles.loader("train", **{arg: value})


# ---------------------------------------------------------------- tl.fit


@pytest.mark.parametrize("bad", ["sdata", "string", None])
def test_fit_not_tileset(bad, base):
    value = {"sdata": base, "string": "tiles/", "None": None}[str(bad)]
    with pytest.raises(TypeError, match="TileSet"):
        ghist.tl.fit(value, width=4, embed_dim=8, max_epochs=1, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"width": 0}, "width"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"lr": 0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"precision": "garbage"}, "garbage"),
        ({"accelerator": "tpu"}, "tpu"),
        ({"max_time": 30}, "max_time"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"color_jitter": -0.5}, "color_jitter"),
        ({"stain_jitter": 1.5}, "stain_jitter"),
        ({"num_workers": -1}, "num_workers"),
        ({"width": True}, "width"),
    ],
)
def test_fit_bad_settings_name_the_value(kwargs, culprit, tiles):
    kwargs = {"width": 4, "embed_dim": 8, "max_epochs": 1, "progress": False, **kwargs}
    with pytest.raises((ValueError, TypeError), match=re.escape(culprit)):
        ghist.tl.fit(tiles, **kwargs)


def test_fit_reference_missing_groupby(tiles, reference):
    with pytest.raises(KeyError, match=r"'celltype'"):
        ghist.tl.fit(
            tiles, reference=reference, reference_groupby="celltype", width=4, embed_dim=8, max_epochs=1, progress=False
        )


# ---------------------------------------------------------------- tl.predict


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_predict_not_sdata(kind, base, model):
    with pytest.raises(TypeError, match="SpatialData"):
        ghist.tl.predict(_not_sdata(kind, base), model, tile_overlap=4, progress=False)


@pytest.mark.parametrize("bad", [3, {"genes": ["EPCAM"]}])
def test_predict_model_not_a_model(bad, sdata):
    with pytest.raises(TypeError, match="GHISTModel"):
        ghist.tl.predict(sdata, bad, tile_overlap=4, progress=False)


def test_predict_model_path_that_does_not_exist(sdata, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        ghist.tl.predict(sdata, tmp_path / "model", tile_overlap=4, progress=False)


@pytest.mark.parametrize(("arg", "key", "existing"), [("image_key", "hne", "he"), ("labels_key", "cells", "nuclei")])
def test_predict_missing_key_lists_existing(arg, key, existing, sdata, model):
    with pytest.raises(KeyError) as err:
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False, **{arg: key})
    assert key in str(err.value)
    assert existing in str(err.value)


@pytest.mark.parametrize(
    ("arg", "value"),
    [("batch_size", 0), ("batch_size", -3), ("num_workers", -1), ("tile_overlap", -1), ("alpha", float("nan"))],
)
def test_predict_bad_numbers_name_the_argument(arg, value, sdata, model):
    kwargs = {"tile_overlap": 4, "progress": False, arg: value}
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.tl.predict(sdata, model, **kwargs)


def test_predict_existing_table(pred, model):
    with pytest.raises(ValueError, match=r"'ghist'.*overwrite"):
        ghist.tl.predict(pred, model, tile_overlap=4, progress=False)


def test_predict_unknown_refine_type(sdata, model):
    with pytest.raises((KeyError, ValueError), match="Unicorn"):
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False, refine_types=["Unicorn"])


def test_predict_negative_label_ids(sdata, model):
    labels = np.asarray(sdata["nuclei"]).astype(np.int32)
    labels[0, 0] = -5
    _with_labels(sdata, labels)
    with pytest.raises(ValueError, match=r"(?i)negative"):
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False)


def test_predict_float_labels(sdata, model):
    _with_float_labels(sdata, np.float64)
    with pytest.raises(ValueError, match=r"'nuclei'.*float64"):
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False)


def test_predict_four_channel_image(sdata, model):
    rgb = np.asarray(sdata["he"])
    _with_image(sdata, np.concatenate([rgb, rgb[:1]]), c_coords=["r", "g", "b", "a"])
    with pytest.raises(ValueError, match=r"'he'.*4 channels"):
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False)


def test_predict_labels_half_the_image_extent(sdata, model):
    _with_labels(sdata, np.asarray(sdata["nuclei"])[::2, ::2].copy())
    with pytest.raises(ValueError, match=r"(?i)extent"):
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False)


# ---------------------------------------------------------------- tl.predict_cohort


@pytest.mark.parametrize("bad", ["sdata", "string", None, "empty"])
def test_predict_cohort_bad_slides(bad, base, model):
    value = {"sdata": base, "string": "slides/", "None": None, "empty": {}}[str(bad)]
    with pytest.raises((TypeError, ValueError), match="slides"):
        ghist.tl.predict_cohort(value, model, segment=False, progress=False, tile_overlap=4)


def test_predict_cohort_missing_path(tmp_path, model):
    missing = tmp_path / "p1.zarr"
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(missing))):
        ghist.tl.predict_cohort({"p1": missing}, model, segment=False, progress=False, tile_overlap=4)


def test_predict_cohort_unknown_gene_set_gene(base, model):
    with pytest.raises(KeyError, match="NOTAGENE"):
        ghist.tl.predict_cohort(
            {"p1": sd.deepcopy(base)},
            model,
            gene_sets={"sig": ["NOTAGENE"]},
            segment=False,
            progress=False,
            tile_overlap=4,
        )


# ---------------------------------------------------------------- tl.evaluate


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_evaluate_not_sdata(kind, base):
    with pytest.raises(TypeError, match="SpatialData"):
        ghist.tl.evaluate(_not_sdata(kind, base))


@pytest.mark.parametrize(("arg", "key"), [("pred_key", "preds"), ("table_key", "measured")])
def test_evaluate_missing_table_lists_existing(arg, key, pred):
    with pytest.raises(KeyError, match=rf"'{key}'.*'ghist'.*'spot_counts'.*'table'"):
        ghist.tl.evaluate(pred, **{arg: key})


def test_evaluate_missing_cell_type_column(pred):
    with pytest.raises(KeyError, match=r"'celltype'.*'cell_type'"):
        ghist.tl.evaluate(pred, cell_type_key="celltype")


def test_evaluate_unknown_gene(pred, genes):
    with pytest.raises(KeyError, match="NOTAGENE"):
        ghist.tl.evaluate(pred, genes=[genes[0], "NOTAGENE"])


def test_evaluate_missing_layer(pred):
    with pytest.raises(KeyError, match=r"'counts'"):
        ghist.tl.evaluate(pred, layer="counts")


@pytest.mark.parametrize(("value", "words"), [(np.nan, "NaN"), (-1.0, "negative"), (0.25, "non-integer")])
def test_evaluate_bad_measured_counts(value, words, pred):
    X = _dense(pred["table"].X)
    X[0, 0] = value
    _replace_table(pred, X)
    with pytest.raises(ValueError, match=words):
        ghist.tl.evaluate(pred)


@pytest.mark.parametrize("n_svg", [[0], [-5], [float("nan")], [True], 20, "20"])
def test_evaluate_bad_n_svg(n_svg, pred):
    with pytest.raises((ValueError, TypeError), match="n_svg"):
        ghist.tl.evaluate(pred, n_svg=n_svg)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True])
def test_evaluate_spots_bad_target_sum(value, pred):
    with pytest.raises((ValueError, TypeError), match="target_sum"):
        ghist.tl.evaluate(pred, table_key="spot_counts", spots_key="spots", target_sum=value)


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), True])
def test_evaluate_spots_bad_panel_share(value, pred):
    with pytest.raises((ValueError, TypeError), match="panel_share"):
        ghist.tl.evaluate(pred, table_key="spot_counts", spots_key="spots", library="all", panel_share=value)


def test_evaluate_spots_unknown_library(pred):
    with pytest.raises(ValueError, match=r"library.*'genome'"):
        ghist.tl.evaluate(pred, table_key="spot_counts", spots_key="spots", library="genome")


def test_evaluate_spots_missing_spots_lists_existing(pred):
    with pytest.raises(KeyError, match=r"'visium'.*'spots'"):
        ghist.tl.evaluate(pred, table_key="spot_counts", spots_key="visium")


def test_evaluate_spots_table_of_other_element(pred):
    with pytest.raises(ValueError, match=r"'table'.*'spots'"):
        ghist.tl.evaluate(pred, table_key="table", spots_key="spots")


def test_evaluate_spots_existing_key_added(pred):
    with pytest.raises(ValueError, match=r"'table'.*already"):
        ghist.tl.evaluate(pred, table_key="spot_counts", spots_key="spots", key_added="table")


def test_evaluate_cell_only_option_in_spot_mode(pred):
    with pytest.raises(ValueError, match="cell_type_key"):
        ghist.tl.evaluate(pred, table_key="spot_counts", spots_key="spots", cell_type_key="cell_type")


def test_evaluate_spot_only_option_in_cell_mode(pred):
    with pytest.raises(ValueError, match="library"):
        ghist.tl.evaluate(pred, library="all")


def test_evaluate_is_quiet(pred, recwarn):
    """ghist's own calls into squidpy must not hand the user deprecation warnings (squidpy 1.8.2 and later)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        ghist.tl.evaluate(pred)
        ghist.tl.evaluate(pred, table_key="spot_counts", spots_key="spots")
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning | DeprecationWarning)]


# ---------------------------------------------------------------- tl.aggregate_to_spots


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_aggregate_not_sdata(kind, base):
    with pytest.raises(TypeError, match="SpatialData"):
        ghist.tl.aggregate_to_spots(_not_sdata(kind, base))


def test_aggregate_missing_spots_lists_existing(pred):
    with pytest.raises(KeyError, match=r"'visium'.*'spots'"):
        ghist.tl.aggregate_to_spots(pred, spots_key="visium")


def test_aggregate_missing_table_lists_existing(pred):
    with pytest.raises(KeyError, match=r"'preds'.*'ghist'"):
        ghist.tl.aggregate_to_spots(pred, pred_key="preds")


def test_aggregate_missing_spots_table_lists_existing(pred):
    with pytest.raises(KeyError, match=r"'counts'.*'spot_counts'"):
        ghist.tl.aggregate_to_spots(pred, spots_table_key="counts")


def test_aggregate_existing_key_added(pred):
    with pytest.raises(ValueError, match=r"'table'.*already"):
        ghist.tl.aggregate_to_spots(pred, key_added="table")


@pytest.mark.parametrize("key_added", ["", 3])
def test_aggregate_bad_key_added(key_added, pred):
    with pytest.raises(ValueError, match="key_added"):
        ghist.tl.aggregate_to_spots(pred, key_added=key_added)


def test_aggregate_nan_predictions(pred):
    X = _dense(pred["ghist"].X)
    X[0, 0] = np.nan
    _replace_table(pred, X, key="ghist")
    with pytest.raises(ValueError, match=r"'ghist'.*NaN"):
        ghist.tl.aggregate_to_spots(pred)


# ---------------------------------------------------------------- tl.survival


@pytest.mark.parametrize("bad", ["spatialdata", "string", None])
def test_survival_not_anndata(bad, base):
    value = base if bad == "spatialdata" else ("x" if bad == "string" else None)
    with pytest.raises(TypeError, match="AnnData"):
        ghist.tl.survival(value, duration_key="time", event_key="event", progress=False)


@pytest.mark.parametrize("arg", ["duration_key", "event_key"])
def test_survival_missing_column_lists_existing(arg, cohort_adata):
    kwargs = {"duration_key": "time", "event_key": "event", arg: "nope"}
    with pytest.raises(KeyError, match=r"'nope'.*'time'"):
        ghist.tl.survival(cohort_adata, progress=False, **kwargs)


def test_survival_unknown_feature(cohort_adata):
    with pytest.raises(KeyError, match="NOTAFEATURE"):
        ghist.tl.survival(cohort_adata, duration_key="time", event_key="event", features=["NOTAFEATURE"])


def test_survival_empty_features(cohort_adata):
    with pytest.raises(ValueError, match="features"):
        ghist.tl.survival(cohort_adata, duration_key="time", event_key="event", features=[], progress=False)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "0.1"])
def test_survival_bad_penalizer(value, cohort_adata):
    with pytest.raises((ValueError, TypeError), match="penalizer"):
        ghist.tl.survival(cohort_adata, duration_key="time", event_key="event", penalizer=value, progress=False)


def test_survival_negative_durations(cohort_adata):
    adata = cohort_adata.copy()
    adata.obs["time"] = -adata.obs["time"]
    with pytest.raises(ValueError, match="time"):
        ghist.tl.survival(adata, duration_key="time", event_key="event", progress=False)


def test_survival_events_not_binary(cohort_adata):
    adata = cohort_adata.copy()
    adata.obs["event"] = adata.obs["event"] * 3
    with pytest.raises(ValueError, match="event"):
        ghist.tl.survival(adata, duration_key="time", event_key="event", progress=False)


def test_survival_empty(cohort_adata):
    with pytest.raises(ValueError, match=r"(?i)no sample|sample"):
        ghist.tl.survival(cohort_adata[:0].copy(), duration_key="time", event_key="event", progress=False)


# ---------------------------------------------------------------- pl.*


@pytest.fixture(scope="module")
def scores(predicted) -> pd.DataFrame:
    return ghist.tl.evaluate(sd.deepcopy(predicted))


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_pl_expression_not_sdata(kind, base, genes):
    with pytest.raises(TypeError, match="SpatialData"):
        ghist.pl.expression(_not_sdata(kind, base), genes[0], show=False)


def test_pl_expression_unknown_gene(pred, genes):
    with pytest.raises(KeyError, match="NOTAGENE"):
        ghist.pl.expression(pred, [genes[0], "NOTAGENE"], show=False)


def test_pl_expression_empty_genes(pred):
    with pytest.raises(ValueError, match="genes"):
        ghist.pl.expression(pred, [], show=False)


def test_pl_expression_missing_table_lists_existing(pred, genes):
    with pytest.raises(KeyError, match=r"'preds'.*'ghist'"):
        ghist.pl.expression(pred, genes[0], pred_key="preds", show=False)


@pytest.mark.parametrize(("arg", "value"), [("panel_size", 0), ("panel_size", -1.0), ("size", 0), ("size", np.nan)])
def test_pl_expression_bad_numbers(arg, value, pred, genes):
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.pl.expression(pred, genes[0], show=False, **{arg: value})


def test_pl_expression_bad_crop(pred, genes):
    with pytest.raises(ValueError, match="crop"):
        ghist.pl.expression(pred, genes[0], crop=(10, 0, 0, 10), show=False)


@pytest.mark.parametrize("kind", NOT_SDATA)
def test_pl_cell_types_not_sdata(kind, base):
    with pytest.raises(TypeError, match="SpatialData"):
        ghist.pl.cell_types(_not_sdata(kind, base), show=False)


def test_pl_cell_types_missing_column(pred):
    with pytest.raises(KeyError, match=r"'celltype'.*'cell_type'"):
        ghist.pl.cell_types(pred, table_key="table", cell_type_key="celltype", show=False)


@pytest.mark.parametrize("bad", ["string", None])
def test_pl_composition_wrong_type(bad):
    with pytest.raises(TypeError, match=r"SpatialData|AnnData"):
        ghist.pl.composition("x" if bad == "string" else None, show=False)


def test_pl_composition_missing_groupby(pred):
    with pytest.raises(KeyError, match="'sample'"):
        ghist.pl.composition(pred, groupby="sample", show=False)


@pytest.mark.parametrize("bad", ["string", None, "adata"])
def test_pl_gene_correlation_not_dataframe(bad, base):
    value = base["table"] if bad == "adata" else ("x" if bad == "string" else None)
    with pytest.raises(TypeError, match="DataFrame"):
        ghist.pl.gene_correlation(value, show=False)


def test_pl_gene_correlation_unknown_metric(scores):
    with pytest.raises(KeyError, match=r"'r2'.*'pearson'"):
        ghist.pl.gene_correlation(scores, metric="r2", show=False)


@pytest.mark.parametrize("top", [0, -2, True, float("nan")])
def test_pl_gene_correlation_bad_top(top, scores):
    with pytest.raises((ValueError, TypeError), match="top"):
        ghist.pl.gene_correlation(scores, top=top, show=False)


@pytest.fixture(scope="module")
def cox(cohort_adata) -> pd.DataFrame:
    return ghist.tl.survival(cohort_adata, duration_key="time", event_key="event", progress=False)


def test_pl_kaplan_meier_unknown_feature(cohort_adata):
    with pytest.raises(KeyError, match="NOTAFEATURE"):
        ghist.pl.kaplan_meier(cohort_adata, "NOTAFEATURE", duration_key="time", event_key="event", show=False)


def test_pl_kaplan_meier_missing_duration(cohort_adata):
    with pytest.raises(KeyError, match=r"'nope'.*'time'"):
        ghist.pl.kaplan_meier(cohort_adata, "f0", duration_key="nope", event_key="event", show=False)


@pytest.mark.parametrize("split", ["mode", float("nan"), True])
def test_pl_kaplan_meier_bad_split(split, cohort_adata):
    with pytest.raises((ValueError, TypeError), match="split"):
        ghist.pl.kaplan_meier(cohort_adata, "f0", duration_key="time", event_key="event", cutoff=split, show=False)


@pytest.mark.parametrize("bad", ["string", None])
def test_pl_hazard_ratios_not_dataframe(bad):
    with pytest.raises(TypeError, match="DataFrame"):
        ghist.pl.hazard_ratios("x" if bad == "string" else None, show=False)


@pytest.mark.parametrize(
    ("arg", "value"), [("top", 0), ("top", -1), ("q_highlight", 0), ("q_highlight", 1.5), ("q_highlight", np.nan)]
)
def test_pl_hazard_ratios_bad_numbers(arg, value, cox):
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.pl.hazard_ratios(cox, show=False, **{arg: value})


def test_pl_hazard_ratios_missing_columns(cox):
    with pytest.raises(KeyError, match=r"'hr'.*have \['p'\]"):
        ghist.pl.hazard_ratios(cox.drop(columns=[c for c in cox.columns if c != "p"]), show=False)


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize("arg", ["image_size", "n_genes", "pixel_size", "n_cells"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_synthetic_bad_numbers(arg, value):
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.datasets.synthetic(image_size=64, n_genes=8, **{arg: value})


@given(value=st.one_of(st.integers(max_value=0), st.floats(max_value=0.0), st.just(math.nan), st.booleans()))
@HYP
def test_synthetic_image_size_hypothesis(value):
    with pytest.raises((ValueError, TypeError), match="image_size"):
        ghist.datasets.synthetic(image_size=value, n_genes=8)


def test_synthetic_unknown_options():
    with pytest.raises(ValueError, match=r"image_transform.*'shear'"):
        ghist.datasets.synthetic(image_size=64, n_genes=8, image_transform="shear")
    with pytest.raises((KeyError, ValueError), match="Unicorn"):
        ghist.datasets.synthetic(image_size=64, n_genes=8, cell_types=["T", "Unicorn"])


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True])
def test_synthetic_bad_thinning(value):
    with pytest.raises((ValueError, TypeError), match="thinning"):
        ghist.datasets.synthetic(image_size=64, n_genes=8, thinning=value)


@pytest.mark.parametrize("seed", [-1, 1.5, "zero", True])
def test_synthetic_bad_seed(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        ghist.datasets.synthetic(image_size=64, n_genes=8, seed=seed)


@pytest.mark.parametrize("arg", ["n_cells_per_type", "library_size", "dispersion"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_synthetic_reference_bad_numbers(arg, value):
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.datasets.synthetic_reference(n_cells_per_type=5, **{arg: value})


def test_synthetic_reference_unknown_gene_and_type():
    with pytest.raises(KeyError, match="NOTAGENE"):
        ghist.datasets.synthetic_reference(n_cells_per_type=5, genes=["NOTAGENE"])
    with pytest.raises((KeyError, ValueError), match="Unicorn"):
        ghist.datasets.synthetic_reference(n_cells_per_type=5, cell_types=["Unicorn"])
    with pytest.raises(ValueError, match="genes"):
        ghist.datasets.synthetic_reference(n_cells_per_type=5, genes=[])


@pytest.mark.parametrize(
    "arg", ["n_patients", "image_size", "hazard_ratio", "composition_sd", "median_survival", "follow_up", "pixel_size"]
)
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_synthetic_cohort_bad_numbers(arg, value):
    if arg == "composition_sd" and value == 0:
        return  # documented as valid: every patient gets the same composition
    with pytest.raises((ValueError, TypeError), match=arg):
        ghist.datasets.synthetic_cohort(**{"n_patients": 3, "image_size": 64, "progress": False, arg: value})


def test_synthetic_cohort_unknown_causal_type():
    with pytest.raises((KeyError, ValueError), match="Unicorn"):
        ghist.datasets.synthetic_cohort(3, image_size=64, causal_type="Unicorn", progress=False)


# ---------------------------------------------------------------- GHISTModel


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"width": 0}, "width"),
        ({"width": -4}, "width"),
        ({"width": True}, "width"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"tile_size": 0}, "tile_size"),
        ({"tile_size": 30}, "tile_size"),
        ({"pixel_size": 0.0}, "pixel_size"),
        ({"pixel_size": float("nan")}, "pixel_size"),
        ({"expr_scale": 0.0}, "expr_scale"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
    ],
)
def test_model_bad_settings(kwargs, culprit, genes, cell_types):
    kwargs = {"width": 4, "embed_dim": 8, "tile_size": 32, **kwargs}
    with pytest.raises((ValueError, TypeError), match=re.escape(culprit)):
        ghist.GHISTModel(genes, cell_types, **kwargs)


def test_model_bad_genes(genes, cell_types):
    with pytest.raises(ValueError, match="genes"):
        ghist.GHISTModel([], cell_types, width=4, embed_dim=8, tile_size=32)
    with pytest.raises(ValueError, match=re.escape(genes[0])):
        ghist.GHISTModel([genes[0], genes[0]], cell_types, width=4, embed_dim=8, tile_size=32)
    with pytest.raises(TypeError, match="genes"):
        ghist.GHISTModel("CD3E", cell_types, width=4, embed_dim=8, tile_size=32)


def test_model_duplicate_cell_types(genes):
    with pytest.raises(ValueError, match="'T'"):
        ghist.GHISTModel(genes, ["T", "T"], width=4, embed_dim=8, tile_size=32)


def test_model_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        ghist.GHISTModel.load(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage_json"])
def test_model_load_damaged(damage, model, tmp_path):
    path = tmp_path / "m"
    model.save(path)
    if damage == "empty":
        (path / "weights.pt").write_bytes(b"")
    elif damage == "truncated":
        data = (path / "weights.pt").read_bytes()
        (path / "weights.pt").write_bytes(data[: len(data) // 2])
    else:
        (path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ghist.GHISTModel.load(path)


@given(garbage=st.binary(max_size=256))
@HYP
def test_model_load_garbage_bytes(garbage, model, tmp_path_factory):
    path = tmp_path_factory.mktemp("garbage") / "m"
    model.save(path)
    (path / "weights.pt").write_bytes(garbage)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ghist.GHISTModel.load(path)


def test_model_load_unknown_genes(model, tmp_path):
    model.save(tmp_path / "m")
    with pytest.raises((KeyError, ValueError), match="NOTAGENE"):
        ghist.GHISTModel.load(tmp_path / "m", genes=["NOTAGENE"])


# ---------------------------------------------------------------- hypothesis: numbers


@given(value=st.one_of(st.integers(max_value=0), st.booleans(), st.just(math.nan)))
@HYP
def test_predict_batch_size_hypothesis(value, base, model):
    with pytest.raises((ValueError, TypeError), match="batch_size"):
        ghist.tl.predict(sd.deepcopy(base), model, tile_overlap=4, progress=False, batch_size=value)


@given(value=st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.booleans()))
@HYP
def test_evaluate_spots_target_sum_hypothesis(value, predicted):
    with pytest.raises((ValueError, TypeError), match="target_sum"):
        ghist.tl.evaluate(predicted, table_key="spot_counts", spots_key="spots", target_sum=value)


# ---------------------------------------------------------------- issue 28: implausible sizes, resources, raw errors

EXTREME_PIXEL_SIZES = [1e-6, 0.01, 25.0, 1e30, float("inf")]


@pytest.mark.parametrize("value", EXTREME_PIXEL_SIZES)
def test_make_tiles_implausible_pixel_size(value, sdata, tmp_path):
    with pytest.raises(ValueError, match=r"`pixel_size`.*between 0\.05 and 20"):
        _quick_tiles(sdata, tmp_path, pixel_size=value)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("value", EXTREME_PIXEL_SIZES)
def test_segment_implausible_pixel_size(value, sdata):
    with pytest.raises(ValueError, match=r"`pixel_size`.*between 0\.05 and 20"):
        ghist.pp.segment_nuclei(sdata, key_added="nuclei2", pixel_size=value, progress=False)
    assert "nuclei2" not in sdata.labels


@pytest.mark.parametrize("value", EXTREME_PIXEL_SIZES)
def test_fit_implausible_pixel_size(value, tiles):
    with pytest.raises(ValueError, match=r"`pixel_size`.*between 0\.05 and 20"):
        ghist.tl.fit(tiles, width=4, embed_dim=8, max_steps=1, pixel_size=value, progress=False)


@pytest.mark.parametrize("value", [1e-6, 1e30])
def test_detect_tissue_implausible_resolution(value, sdata):
    with pytest.raises(ValueError, match=r"`resolution`.*between 0\.05 and 20"):
        ghist.pp.detect_tissue(sdata, resolution=value)
    assert "tissue" not in sdata.shapes


def test_make_tiles_tile_size_beyond_memory(sdata, tmp_path):
    # one padded 10^6-px tile alone is 7 TB: refused before anything is allocated or written
    with pytest.raises(ghist._validation.ResourceError, match=r"tile_size=1000000.*GB"):
        _quick_tiles(sdata, tmp_path, tile_size=10**6, fold=None)
    assert not (tmp_path / "t").exists()


def test_make_tiles_refused_by_the_memory_available(sdata, tmp_path, monkeypatch):
    # the estimate is compared with what the machine has: the same call passes with enough memory
    monkeypatch.setattr(ghist._validation, "available_memory", lambda: 10**5)
    with pytest.raises(ValueError, match=r"tile_size=32 .*more than the 0\.0001 GB available.*smaller `tile_size`"):
        _quick_tiles(sdata, tmp_path)
    monkeypatch.setattr(ghist._validation, "available_memory", lambda: 10**10)
    assert len(_quick_tiles(sdata, tmp_path)) > 0


def test_segment_chunk_beyond_memory(sdata, monkeypatch):
    monkeypatch.setattr(ghist._validation, "available_memory", lambda: 10**5)
    with pytest.raises(ghist._validation.ResourceError, match=r"chunk_size=2048.*`chunk_size`"):
        ghist.pp.segment_nuclei(sdata, key_added="nuclei2", progress=False, num_workers=1)
    assert "nuclei2" not in sdata.labels


def test_make_tiles_all_nan_cell_types(sdata, tmp_path):
    sdata["table"].obs["cell_type"] = np.nan
    with pytest.raises(ValueError, match=r"'cell_type'.*all \d+ cells are NaN.*cell_type_key=None"):
        _quick_tiles(sdata, tmp_path, cell_type_key="cell_type")
    assert not (tmp_path / "t").exists()


def test_make_tiles_some_nan_cell_types_still_accepted(sdata, tmp_path):
    types = sdata["table"].obs["cell_type"].astype(object)
    types.iloc[::2] = np.nan
    sdata["table"].obs["cell_type"] = types
    assert _quick_tiles(sdata, tmp_path, cell_type_key="cell_type").cell_types


def test_reference_profiles_all_zero(reference):
    zero = reference.copy()
    zero.X = np.zeros(zero.shape, dtype=np.float32)
    with pytest.raises(ValueError, match="all zero"):
        ghist.pp.reference_profiles(zero, "cell_type")


def test_fit_all_zero_reference(tiles, reference):
    profiles = ghist.pp.reference_profiles(reference, "cell_type")
    profiles.X = np.zeros(profiles.shape, dtype=np.float32)
    with pytest.raises(ValueError, match="all zero"):
        ghist.tl.fit(tiles, reference=profiles, width=4, embed_dim=8, max_steps=1, progress=False)


def test_evaluate_duplicate_cell_ids(pred):
    table = pred["table"]
    ids = table.obs["cell_id"].to_numpy().copy()
    ids[1] = ids[0]
    table.obs["cell_id"] = ids
    with pytest.raises(ValueError, match=rf"'table'.*cell ids \[{ids[0]}\].*more than once"):
        ghist.tl.evaluate(pred, cell_type_key="cell_type")


@pytest.mark.parametrize("value", [4.5, "4", None, -1, 16, True])
def test_predict_tile_overlap_not_an_integer_in_range(value, sdata, model):
    with pytest.raises(ValueError, match=r"`tile_overlap` must be an integer in \[0, 15\]"):
        ghist.tl.predict(sdata, model, tile_overlap=value, progress=False)
    assert "ghist" not in sdata.tables


@pytest.mark.parametrize("seed", [2**70, 2**32, -1, 1.0, "0", True])
def test_predict_seed_out_of_range(seed, sdata, model):
    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, 2\*\*32 - 1\]"):
        ghist.tl.predict(sdata, model, tile_overlap=4, seed=seed, progress=False)


@pytest.mark.parametrize("seed", [2**70, -1, True])
def test_fit_seed_out_of_range(seed, tiles):
    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, 2\*\*32 - 1\]"):
        ghist.tl.fit(tiles, width=4, embed_dim=8, max_steps=1, seed=seed, progress=False)


@pytest.mark.parametrize("key", ["a/b", "a b", "..", "__x", "t\\u"])
def test_key_added_spatialdata_cannot_store(key, sdata, model):
    # refused before any prediction or segmentation is computed
    with pytest.raises(ValueError, match="cannot name a SpatialData element"):
        ghist.tl.predict(sdata, model, key_added=key, tile_overlap=4, progress=False)
    with pytest.raises(ValueError, match="cannot name a SpatialData element"):
        ghist.pp.segment_nuclei(sdata, key_added=key, progress=False)
    with pytest.raises(ValueError, match="cannot name a SpatialData element"):
        ghist.pp.detect_tissue(sdata, key_added=key)


def test_key_added_differing_only_in_case(sdata, model):
    with pytest.raises(ValueError, match=r"differs only in case from `sdata.tables\['table'\]`"):
        ghist.tl.predict(sdata, model, key_added="TABLE", tile_overlap=4, progress=False)
    with pytest.raises(ValueError, match=r"differs only in case from `sdata.labels\['nuclei'\]`"):
        ghist.pp.segment_nuclei(sdata, key_added="Nuclei", progress=False)


@pytest.mark.parametrize("seed", [2**70, -1, "0"])
def test_tileset_loader_seed_out_of_range(seed, tiles):
    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, 2\*\*32 - 1\]"):
        tiles.loader("train", seed=seed)


@pytest.mark.parametrize("option", [{"min_distance_um": 1e5}, {"sigma_um": 1e9}, {"blob_sigma_um": (2.0, 1e6)}])
def test_segment_watershed_options_beyond_memory(option, sdata):
    with pytest.raises(ValueError, match=next(iter(option))):
        ghist.pp.segment_nuclei(sdata, key_added="nuclei2", progress=False, num_workers=1, **option)
