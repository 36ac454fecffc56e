"""Inputs that used to give silently wrong predictions, and writes that could lose the user's table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import spatialdata
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel
from spatialdata.transformations import Identity

import ghist


def _with_labels(sdata: SpatialData, labels: np.ndarray) -> SpatialData:
    return SpatialData(
        images={"he": sdata.images["he"]},
        labels={"nuclei": Labels2DModel.parse(labels, dims=("y", "x"), transformations={"global": Identity()})},
    )


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_labels_of_another_size_with_the_same_transform_are_refused(trained, test_sdata, factor):
    labels = np.asarray(test_sdata.labels["nuclei"])
    h, w = labels.shape
    ys = (np.arange(round(h * factor)) / factor).astype(int).clip(0, h - 1)
    xs = (np.arange(round(w * factor)) / factor).astype(int).clip(0, w - 1)
    sdata = _with_labels(test_sdata, labels[np.ix_(ys, xs)])
    with pytest.raises(ValueError, match=r"'he'.*'nuclei'.*same transformation"):
        ghist.tl.predict(sdata, trained, progress=False)
    assert "ghist" not in sdata.tables


def test_negative_label_ids_are_refused(trained, test_sdata):
    labels = np.asarray(test_sdata.labels["nuclei"]).astype(np.int32)
    labels[labels == 0] = -1  # background written as -1
    sdata = _with_labels(test_sdata, labels)
    with pytest.raises(ValueError, match=r"'nuclei'.*-1"):
        ghist.tl.predict(sdata, trained, progress=False)
    assert "ghist" not in sdata.tables


def test_a_negative_id_in_one_tile_is_refused_by_the_tile_reader():
    from ghist._model._data import SlideTileDataset

    image = np.full((3, 64, 64), 200, dtype=np.uint8)
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[40:50, 40:50] = -7
    labels[5:9, 5:9] = 3
    import xarray as xr

    ds = SlideTileDataset(
        xr.DataArray(image, dims=("c", "y", "x")),
        xr.DataArray(labels, dims=("y", "x")),
        np.array([[0, 0], [32, 32]]),
        scale=1.0,
        to_labels=np.eye(3),
        tile_size=32,
        mean=[0, 0, 0],
        std=[1, 1, 1],
        labels_key="cells",
    )
    assert ds.read(0)["cell_id"].tolist() == [3]
    with pytest.raises(ValueError, match=r"'cells'.*-7"):
        ds.read(1)


def test_anndata_instead_of_spatialdata(trained, test_sdata):
    adata = test_sdata.tables["table"]
    with pytest.raises(TypeError, match=r"SpatialData.*AnnData"):
        ghist.tl.predict(adata, trained, progress=False)
    with pytest.raises(TypeError, match=r"'b'.*SpatialData.*AnnData"):
        ghist.tl.predict_cohort({"a": test_sdata, "b": adata}, trained, progress=False)


# ---------------------------------------------------------------------------------------------- atomic write
@pytest.fixture
def backed(test_sdata, trained, tmp_path):
    sdata = SpatialData(images={"he": test_sdata.images["he"]}, labels={"nuclei": test_sdata.labels["nuclei"]})
    path = tmp_path / "s.zarr"
    sdata.write(path)
    sdata = spatialdata.read_zarr(path)
    old = ghist.tl.predict(sdata, trained, alpha=0, progress=False)
    return sdata, old.copy()


def _same(a: AnnData, b: AnnData) -> None:
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(b.X))
    assert a.uns["ghist"]["params"]["alpha"] == b.uns["ghist"]["params"]["alpha"]


def test_overwrite_replaces_the_table_on_disk(backed, trained):
    sdata, _ = backed
    new = ghist.tl.predict(sdata, trained, alpha=2.0, overwrite=True, progress=False)
    assert new.uns["ghist"]["params"]["alpha"] == 2.0
    assert sdata.tables["ghist"] is new
    reread = spatialdata.read_zarr(sdata.path)
    assert sorted(reread.tables) == ["ghist"]
    _same(reread.tables["ghist"], new)
    assert not any("tmp" in p or "old" in p for p in sdata.elements_paths_on_disk())
    assert not list(Path(sdata.path).parent.glob(".ghist_predict_*"))  # the streamed rows are gone too


@pytest.mark.parametrize("partial", [False, True])
def test_a_failed_overwrite_keeps_the_old_table(backed, trained, monkeypatch, partial):
    import ghist._write

    sdata, old = backed
    real_write = ghist._write._write_scratch

    def failing_write(*args, **kwargs):
        if partial:
            real_write(*args, **kwargs)  # written, then the disk fills up or the job is killed
        raise OSError("No space left on device")

    monkeypatch.setattr(ghist._write, "_write_scratch", failing_write)
    with pytest.raises(OSError, match="No space"):
        ghist.tl.predict(sdata, trained, alpha=2.0, overwrite=True, progress=False)
    monkeypatch.undo()
    assert sorted(sdata.tables) == ["ghist"]
    _same(sdata.tables["ghist"], old)
    reread = spatialdata.read_zarr(sdata.path)
    assert sorted(reread.tables) == ["ghist"]
    _same(reread.tables["ghist"], old)


def test_a_failed_first_write_leaves_no_table(test_sdata, trained, tmp_path, monkeypatch):
    sdata = SpatialData(images={"he": test_sdata.images["he"]}, labels={"nuclei": test_sdata.labels["nuclei"]})
    sdata.write(tmp_path / "s.zarr")
    sdata = spatialdata.read_zarr(tmp_path / "s.zarr")

    import ghist._write

    def failing_write(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ghist._write, "_write_scratch", failing_write)
    with pytest.raises(OSError, match="No space"):
        ghist.tl.predict(sdata, trained, progress=False)
    monkeypatch.undo()
    assert list(sdata.tables) == []
    assert list(spatialdata.read_zarr(sdata.path).tables) == []
