"""Property-based checks of the public entry points: random argument types and values, garbled files.

Whatever a caller passes, a ghist entry point either works or raises one of ghist's documented errors
(:data:`ALLOWED`, listed in the README's "Reliability" section), raised by ghist itself (not a library's error
passing through), and a call that fails leaves every file it was given or could have written unchanged (the
folder is hashed before and after). Examples are bounded and derandomised, so CI runs the same ones every time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import spatialdata as sd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatialdata.models import ShapesModel, TableModel

import ghist

#: The errors a ghist entry point may raise on bad input. ghist's own classes derive from these:
#: ``ValidationError``, ``ResourceError``, ``SettingError``, ``ReadoutError``, ``TrainingDivergedError``,
#: ``io.SlideReadError`` (all ValueError) and ``NotOurFolderError`` (a FileExistsError: a folder ghist will not
#: replace).
ALLOWED = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError)

GHIST_SRC = str(Path(ghist.__file__).parent)

#: ``GHIST_PROPERTY_EXAMPLES=500 pytest tests/test_properties.py`` hunts longer, with fresh random examples.
HUNT = int(os.environ.get("GHIST_PROPERTY_EXAMPLES", "0"))
PROPS = settings(
    max_examples=HUNT or 12,
    deadline=None,
    derandomize=not HUNT,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Any value a careless caller could pass for any argument.
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 7, 8, 31, 64, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e-9, 1e9, -0.5, math.nan, math.inf]),
    st.text(max_size=6),
    st.sampled_from(["", "a/b", "..", "he", "nuclei", "table", "ghist", "cell_type", "spots", "otsu", "all"]),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.binary(max_size=4),
)


def _kwargs(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """One to three of the named arguments, each with any value."""
    return st.dictionaries(st.sampled_from(names), ANY, min_size=1, max_size=3)


# ---------------------------------------------------------------- helpers


def _folder_hash(folder: Path) -> str:
    """Names, sizes and contents of every file under ``folder`` (empty folders included)."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        digest.update(root.encode())
        for name in sorted(files):
            path = Path(root) / name
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _innermost_file(error: BaseException) -> str:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def outcome(call: Callable[[], Any], folder: Path) -> BaseException | None:
    """Run ``call``: it works, or raises an allowed error raised by ghist itself and leaves ``folder`` unchanged.

    Any other error propagates (the test fails on it, with its traceback).
    """
    before = _folder_hash(folder)
    failure: BaseException | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except ALLOWED as error:
            failure = error
    if failure is None:
        return None
    where = _innermost_file(failure)
    assert where.startswith(GHIST_SRC), f"raw {type(failure).__name__} raised by {where}, not by ghist: {failure}"
    assert str(failure), f"{type(failure).__name__} without a message"
    assert _folder_hash(folder) == before, f"files changed by a call that failed with: {failure}"
    return failure


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slide() -> sd.SpatialData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ghist.datasets.synthetic(image_size=64, n_genes=4, seed=0)


@pytest.fixture(scope="module")
def genes(slide) -> list[str]:
    return list(slide["table"].var_names)


@pytest.fixture(scope="module")
def model(slide, genes) -> ghist.GHISTModel:
    types = sorted(slide["table"].obs["cell_type"].astype(str).unique())
    return ghist.GHISTModel(genes, types, width=4, embed_dim=8, tile_size=32)


@pytest.fixture(scope="module")
def predicted(slide, model) -> sd.SpatialData:
    """The slide with a prediction table and three spots with a raw-count table."""
    sdata = sd.deepcopy(slide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ghist.tl.predict(sdata, model, tile_overlap=4, progress=False)
    centres = np.array([[16.0, 16.0], [48.0, 16.0], [32.0, 48.0]])
    sdata.shapes["spots"] = ShapesModel.parse(centres, geometry=0, radius=np.full(3, 14.0))
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * 3), "spot_id": np.arange(3)}, index=["0", "1", "2"])
    counts = ad.AnnData(np.random.default_rng(0).poisson(20, (3, len(model.genes))).astype(np.float32), obs=obs)
    counts.var_names = model.genes
    sdata.tables["spot_counts"] = TableModel.parse(counts, region="spots", region_key="region", instance_key="spot_id")
    return sdata


@pytest.fixture(scope="module")
def backed(slide, tmp_path_factory) -> tuple[sd.SpatialData, Path]:
    """The slide written to a zarr store and read back: entry points that write also write to disk."""
    folder = tmp_path_factory.mktemp("backed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.deepcopy(slide).write(folder / "slide.zarr")
        return sd.read_zarr(folder / "slide.zarr"), folder


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "m"
    model.save(folder)
    return folder


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    """A small tiled, zlib-compressed TIFF with a pyramid level and 0.5 µm/px resolution tags."""
    import tifffile

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("slides") / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (64, 64), "compression": "zlib", "photometric": "rgb"}
        tif.write(rgb, subifds=1, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **options)
        tif.write(rgb[::2, ::2], subfiletype=1, **options)
    return path


# ---------------------------------------------------------------- pp


MAKE_TILES_ARGS = [
    "image_key", "labels_key", "table_key", "cell_type_key", "spots_key", "genes", "layer", "tile_size", "n_folds",
    "fold", "key_added", "tiling", "spot_coverage", "spot_target_sum", "spot_scaling", "pixel_size",
]  # fmt: skip


@given(kwargs=_kwargs(MAKE_TILES_ARGS))
@PROPS
def test_make_tiles_any_arguments(kwargs, slide, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiles")
    call = {"tile_size": 32, "n_folds": 2, "progress": False, "path": folder / "t", **kwargs}
    error = outcome(lambda: ghist.pp.make_tiles(sd.deepcopy(slide), **call), folder)
    if error is not None:
        assert not (folder / "t").exists()


SEGMENT_ARGS = [
    "image_key", "key_added", "method", "pixel_size", "min_area_um2", "max_area_um2", "chunk_size", "halo",
    "overwrite", "roi_key", "num_workers",
]  # fmt: skip


@given(kwargs=_kwargs(SEGMENT_ARGS))
@PROPS
def test_segment_nuclei_any_arguments(kwargs, backed):
    sdata, folder = backed
    call = {"key_added": "nuclei_p", "progress": False, "num_workers": 1, "overwrite": True, **kwargs}
    outcome(lambda: ghist.pp.segment_nuclei(sdata, **call), folder)


DETECT_ARGS = ["image_key", "key_added", "resolution", "threshold", "min_area_um2", "closing_um", "overwrite"]


@given(kwargs=_kwargs(DETECT_ARGS))
@PROPS
def test_detect_tissue_any_arguments(kwargs, backed):
    sdata, folder = backed
    call = {"key_added": "tissue_p", "overwrite": True, **kwargs}
    outcome(lambda: ghist.pp.detect_tissue(sdata, **call), folder)


@given(kwargs=_kwargs(["groupby", "genes", "layer"]), values=st.sampled_from(["counts", "zero", "nan", "negative"]))
@PROPS
def test_reference_profiles_any_arguments(kwargs, values, slide, tmp_path):
    adata = slide["table"].copy()
    X = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float32)
    adata.X = {"counts": X, "zero": 0 * X, "nan": np.where(X > 0, np.nan, X), "negative": -X - 1}[values]
    call = {"groupby": "cell_type", **kwargs}
    outcome(lambda: ghist.pp.reference_profiles(adata, **call), tmp_path)


# ---------------------------------------------------------------- tl

EVALUATE_ARGS = [
    "pred_key", "table_key", "cell_type_key", "layer", "genes", "n_svg", "spots_key", "target_sum", "library",
    "panel_share", "key_added",
]  # fmt: skip


@given(kwargs=_kwargs(EVALUATE_ARGS))
@PROPS
def test_evaluate_any_arguments(kwargs, predicted, tmp_path):
    outcome(lambda: ghist.tl.evaluate(sd.deepcopy(predicted), **kwargs), tmp_path)


@given(kwargs=_kwargs(["pred_key", "spots_key", "spots_table_key", "key_added", "overwrite"]))
@PROPS
def test_aggregate_to_spots_any_arguments(kwargs, predicted, tmp_path):
    outcome(lambda: ghist.tl.aggregate_to_spots(sd.deepcopy(predicted), **kwargs), tmp_path)


PREDICT_ARGS = [
    "image_key", "labels_key", "key_added", "alpha", "refine_types", "tile_overlap", "batch_size", "roi_key", "tta",
    "overwrite", "seed", "num_workers",
]  # fmt: skip


@given(kwargs=_kwargs(PREDICT_ARGS))
@settings(PROPS, max_examples=HUNT or 8)  # a call that works predicts the whole slide: fewer examples
def test_predict_any_arguments(kwargs, backed, model):
    sdata, folder = backed
    call = {"key_added": "ghist_p", "tile_overlap": 4, "progress": False, "overwrite": True, **kwargs}
    outcome(lambda: ghist.tl.predict(sdata, model, **call), folder)


FIT_ARGS = [
    "reference", "reference_groupby", "cell_type_groups", "resume", "encoder", "encoder_weights", "encoder_options",
    "width", "embed_dim", "pixel_size", "context_neighbours", "output_activation", "morphometrics", "cell_offset",
    "max_epochs", "max_time", "early_stopping", "patience", "batch_size", "lr", "weight_decay", "augment",
    "color_jitter", "stain_jitter", "loss_weights", "readout", "seed", "accelerator", "devices", "strategy",
    "precision", "num_workers", "trainer_kwargs",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiles(slide, tmp_path_factory) -> ghist.pp.TileSet:
    path = tmp_path_factory.mktemp("fit_tiles") / "t"
    return ghist.pp.make_tiles(sd.deepcopy(slide), cell_type_key="cell_type", tile_size=16, n_folds=2, path=path)


@pytest.mark.slow  # a call that works trains (one step)
@given(kwargs=_kwargs(FIT_ARGS))
@settings(PROPS, max_examples=HUNT or 8)
def test_fit_any_arguments(kwargs, tiles, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit")
    call = {"width": 4, "embed_dim": 8, "max_steps": 1, "progress": False, "checkpoint_dir": folder / "ckpt", **kwargs}
    outcome(lambda: ghist.tl.fit(tiles, **call), folder)


# ---------------------------------------------------------------- files


@st.composite
def _garbled(draw, size: int) -> tuple[str, int, bytes]:
    """How to damage a file of ``size`` bytes: truncate it at, or overwrite bytes from, a position."""
    how = draw(st.sampled_from(["truncate", "overwrite"]))
    at = draw(st.integers(min_value=0, max_value=size - 1))
    return how, at, draw(st.binary(min_size=1, max_size=64))


def _damage(data: bytes, how: str, at: int, junk: bytes) -> bytes:
    if how == "truncate":
        return data[:at]
    return data[:at] + junk + data[at + len(junk) :]


@given(data=st.data(), pixel_size=st.sampled_from([None, 0.5]))
@PROPS
def test_read_wsi_garbled_file(data, pixel_size, slide_file, tmp_path_factory):
    original = slide_file.read_bytes()
    how, at, junk = data.draw(_garbled(len(original)))
    folder = tmp_path_factory.mktemp("garbled")
    path = folder / "slide.tif"
    path.write_bytes(_damage(original, how, at, junk))

    def read() -> None:
        image = ghist.io.read_wsi(path, pixel_size=pixel_size)["he"]
        for level in image.children:  # decode every tile: damage may lie in any of them
            np.asarray(next(iter(image[level].ds.data_vars.values())).data)

    outcome(read, folder)


@given(data=st.data())
@PROPS
def test_model_load_garbled_folder(data, model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("garbled_model")
    target = folder / "m"
    target.mkdir()
    for f in model_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    name = data.draw(st.sampled_from([*sorted(f.name for f in target.iterdir()), "<json value>"]))
    if name == "<json value>":  # a well-formed model.json with one setting of any type or value
        settings_ = json.loads((target / "model.json").read_text())
        key = data.draw(st.sampled_from(sorted(k for k, v in settings_.items() if not isinstance(v, dict | list))))
        settings_[key] = data.draw(ANY.filter(lambda v: not isinstance(v, bytes)))
        (target / "model.json").write_text(json.dumps(settings_))
    else:
        raw = (target / name).read_bytes()
        (target / name).write_bytes(_damage(raw, *data.draw(_garbled(max(len(raw), 1)))))
    outcome(lambda: ghist.GHISTModel.load(target), folder)


# ---------------------------------------------------------------- the checker itself


def test_outcome_flags_raw_errors_and_files_changed_by_a_failure(tmp_path):
    with pytest.raises(AssertionError, match="raw TypeError"):
        outcome(lambda: {}[[]], tmp_path)  # unhashable key: raised by Python, not by ghist

    def fails_after_writing() -> None:
        (tmp_path / "half-written").write_text("x")
        ghist._validation.check_seed(-1)

    with pytest.raises(AssertionError, match="files changed"):
        outcome(fails_after_writing, tmp_path)
    assert isinstance(outcome(lambda: ghist._validation.check_seed(-1), tmp_path), ValueError)
    assert outcome(lambda: ghist._validation.check_seed(1), tmp_path) is None
