"""The one writer (`ghist._write`): nothing replaced without `overwrite`, in memory or on disk; all or nothing."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import threading
import time
import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import spatialdata
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel, TableModel

from ghist._write import SCRATCH_PREFIX, check_writable, write_element


def _table(n: int, value: float = 1.0, region: str = "nuclei", n_genes: int = 6) -> AnnData:
    obs = pd.DataFrame(
        {"region": pd.Categorical([region] * n), "cell_id": np.arange(1, n + 1)}, index=[f"c{i}" for i in range(n)]
    )
    table = AnnData(np.full((n, n_genes), value, dtype=np.float32), obs=obs)
    return TableModel.parse(table, region=region, region_key="region", instance_key="cell_id")


def _labels(value: int = 1, size: int = 32) -> object:
    return Labels2DModel.parse(np.full((size, size), value, dtype=np.int32), dims=("y", "x"))


@pytest.fixture
def store(tmp_path):
    """A zarr store with labels `nuclei` and the user's measured table `table` (5 cells of ones)."""
    path = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SpatialData(labels={"nuclei": _labels()}, tables={"table": _table(5)}).write(path)
    return path


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata.read_zarr(path)


def _consolidated_elements(path) -> set[str]:
    meta = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    return {k for k in meta if k.count("/") == 1}


def _assert_clean(path) -> None:
    """No scratch store left and the consolidated metadata names exactly the elements on disk."""
    assert not [p for p in os.listdir(path) if p.startswith(SCRATCH_PREFIX)]
    on_disk = {
        f"{kind}/{name}"
        for kind in ("images", "labels", "shapes", "points", "tables")
        if (path / kind).is_dir()
        for name in os.listdir(path / kind)
        if (path / kind / name).is_dir()
    }
    assert _consolidated_elements(path) == on_disk


# ------------------------------------------------------------------------------------------------ overwrite rules
def test_refuses_table_on_disk_not_loaded(store):
    """Read with `selection=` the table is not in memory; the default `overwrite=False` must still refuse it."""
    part = spatialdata.read_zarr(store, selection=("labels",))
    assert "table" not in part.tables
    with pytest.raises(ValueError, match=r"not loaded in `sdata`.*overwrite=True"):
        write_element(part, "table", _table(3, 7.0))
    assert _read(store)["table"].n_obs == 5
    assert "table" not in part.tables
    _assert_clean(store)


def test_refuses_table_deleted_from_memory_only(store):
    sdata = _read(store)
    del sdata.tables["table"]
    with pytest.raises(ValueError, match="not loaded"):
        check_writable(sdata, "table", "tables")
    with pytest.raises(ValueError, match="not loaded"):
        write_element(sdata, "table", _table(3, 7.0))
    np.testing.assert_array_equal(_read(store)["table"].X, 1.0)


def test_refuses_name_of_other_kind_on_disk(store):
    part = spatialdata.read_zarr(store, selection=("tables",))
    with pytest.raises(ValueError, match="labels element in the zarr store"):
        write_element(part, "nuclei", _table(3), overwrite=True)


def test_refuses_bad_names_before_writing(store):
    sdata = _read(store)
    for bad in ("", ".hidden", "a/b", "__x"):
        with pytest.raises(ValueError, match="key_added"):
            write_element(sdata, bad, _table(3))
    with pytest.raises(TypeError, match="SpatialData element"):
        write_element(sdata, "x", np.zeros(3))


def test_overwrite_replaces_on_disk_and_in_memory(store):
    part = spatialdata.read_zarr(store, selection=("labels",))
    new = _table(3, 7.0)
    out = write_element(part, "table", new, overwrite=True)
    assert out is new
    assert part.tables["table"] is new
    back = _read(store)["table"]
    assert back.n_obs == 3
    np.testing.assert_array_equal(back.X, 7.0)
    _assert_clean(store)


def test_new_element_and_labels(store):
    sdata = _read(store)
    write_element(sdata, "pred", _table(4, 2.0))
    write_element(sdata, "nuclei", _labels(3), overwrite=True)
    write_element(sdata, "nuclei2", _labels(4))
    back = _read(store)
    assert set(back.tables) == {"table", "pred"}
    assert set(back.labels) == {"nuclei", "nuclei2"}
    assert int(back.labels["nuclei"].max()) == 3
    assert int(back.labels["nuclei2"].max()) == 4
    # the in-memory labels read from the written store, not from an array that was moved away
    assert int(sdata.labels["nuclei"].max()) == 3
    attrs = json.loads((store / "labels" / "zarr.json").read_text())["attributes"]
    assert sorted(attrs["ome"]["labels"]) == ["nuclei", "nuclei2"]
    _assert_clean(store)


def test_in_memory_only():
    sdata = SpatialData(labels={"nuclei": _labels()})
    table = _table(3)
    assert write_element(sdata, "t", table) is table
    assert sdata.tables["t"] is table
    with pytest.raises(ValueError, match="already exists"):
        write_element(sdata, "t", _table(2))
    write_element(sdata, "t", _table(2), overwrite=True)
    assert sdata.tables["t"].n_obs == 2


def test_failed_write_leaves_old_element(store):
    sdata = _read(store)
    bad = _table(3, 9.0)
    bad.uns["unwritable"] = object()  # anndata cannot write it: fails in the middle of the write
    with pytest.raises(Exception):  # noqa: B017  (anndata's own error type)
        write_element(sdata, "table", bad, overwrite=True)
    back = _read(store)["table"]
    assert back.n_obs == 5
    np.testing.assert_array_equal(back.X, 1.0)
    assert sdata.tables["table"].n_obs == 5
    _assert_clean(store)


def test_other_element_reading_old_files_is_protected(store):
    sdata = _read(store)
    sdata.labels["view"] = sdata.labels["nuclei"] + 0  # lazily reads labels/nuclei on disk
    with pytest.raises(ValueError, match="reads its data from the files"):
        write_element(sdata, "nuclei", _labels(5), overwrite=True)
    assert int(_read(store).labels["nuclei"].max()) == 1


# ------------------------------------------------------------------------------------------------ memory
def test_dask_table_written_chunk_by_chunk(store):
    """Dask X and layers are written block by block (each computed once, none whole), then read from the store."""
    n, g, rows = 4000, 50, 250
    calls: list[int] = []
    lock = threading.Lock()

    def block(b, block_info=None):
        if b.size:  # dask also calls it on empty arrays to learn the output type
            with lock:
                calls.append(b.shape[0])
        (r0, _), _ = block_info[None]["array-location"]
        return np.arange(r0, r0 + b.shape[0], dtype=np.float32)[:, None] + np.zeros((1, g), np.float32)

    x = da.zeros((n, g), chunks=(rows, g), dtype=np.float32).map_blocks(block, dtype=np.float32)
    table = _table(n, n_genes=g)
    table.X = x
    table.layers["std"] = da.zeros((n, g), chunks=(rows, g), dtype=np.float32).map_blocks(block, dtype=np.float32) * 2
    sdata = _read(store)
    out = write_element(sdata, "pred", table)
    assert len(calls) == 2 * (n // rows)  # X and the layer
    assert max(calls) == rows
    assert out is table
    for written in (table.X, table.layers["std"]):
        assert isinstance(written, da.Array)
        assert written.chunks == x.chunks
    back = _read(store)["pred"]
    np.testing.assert_array_equal(np.asarray(back.X)[:, 0], np.arange(n))
    np.testing.assert_array_equal(np.asarray(back.layers["std"])[:, 0], 2 * np.arange(n))
    np.testing.assert_array_equal(table.X[n - 1].compute(), n - 1)
    np.testing.assert_array_equal(table.layers["std"][n - 1].compute(), 2 * (n - 1))
    assert len(calls) == 2 * (n // rows)  # read from the store now, nothing recomputed from the old graphs


# ------------------------------------------------------------------------------------------------ crashes
def _write_forever(path: str, n_big: int, first: int, started) -> None:
    """Child process: write the two tables in turn, from ``first``, forever (the parent kills it with SIGKILL)."""
    warnings.simplefilter("ignore")
    sdata = spatialdata.read_zarr(path, selection=("labels",))
    tables = [_table(n_big, 2.0, n_genes=64), _table(5, 1.0, n_genes=64)]
    started.set()
    i = first
    while True:
        write_element(sdata, "table", tables[i % 2], overwrite=True)
        i += 1


def _killed_at(path: str, stage: str) -> None:
    """Child process: one overwrite of the table, killed with SIGKILL right after ``stage``."""
    import ghist._write as w

    warnings.simplefilter("ignore")

    def then_die(func):
        def wrapped(*args, **kwargs):
            out = func(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return out

        return wrapped

    setattr(w, stage, then_die(getattr(w, stage)))
    sdata = spatialdata.read_zarr(path, selection=("labels",))
    write_element(sdata, "table", _table(9, 3.0), overwrite=True)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("_remove_stale_scratch", 5),
        ("_write_scratch", 5),
        ("_ensure_kind_group", 5),
        ("_exchange", 9),
        ("_consolidate", 9),
    ],
)
def test_killed_after_each_stage(store, stage, expected):
    """A writer killed right after each stage leaves a store that opens with the old or the new table, complete."""
    child = multiprocessing.get_context("fork").Process(target=_killed_at, args=(str(store), stage))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    table = _read(store)["table"]
    assert table.n_obs == expected
    np.testing.assert_array_equal(np.asarray(table.X), 1.0 if expected == 5 else 3.0)


def _killed_after_first_rename(path: str, key: str, exchange: bool) -> None:
    """Child process: one write of ``key``, killed right after its first ``os.rename``."""
    import ghist._write as w

    warnings.simplefilter("ignore")
    rename = os.rename

    def rename_then_die(*args):
        rename(*args)
        os.kill(os.getpid(), signal.SIGKILL)

    w.os.rename = rename_then_die
    if not exchange:
        w._exchange = lambda a, b: False
    sdata = spatialdata.read_zarr(path, selection=("labels",))
    write_element(sdata, key, _table(9, 3.0), overwrite=True)


def _run(target, *args) -> None:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL


def test_killed_new_element_before_consolidation_still_counts(store):
    """A new element moved in but not yet in the consolidated metadata: the store opens as before, and the element
    is not overwritten later without `overwrite=True`."""
    _run(_killed_after_first_rename, str(store), "pred", True)
    assert set(_read(store).tables) == {"table"}
    with pytest.raises(ValueError, match="not loaded"):
        check_writable(spatialdata.read_zarr(store, selection=("labels",)), "pred", "tables")


def test_fallback_swap_and_its_recovery(store, monkeypatch):
    """Without an atomic exchange the old folder is renamed aside first; a writer killed right then leaves it in its
    scratch store, and the next write puts it back before anything else."""
    import ghist._write as w

    _run(_killed_after_first_rename, str(store), "table", False)
    assert not (store / "tables" / "table").exists()  # the window the exchange closes
    part = spatialdata.read_zarr(store, selection=("labels",))
    write_element(part, "other", _table(2))  # any later write recovers the old table first
    back = _read(store)
    assert back["table"].n_obs == 5
    np.testing.assert_array_equal(back["table"].X, 1.0)
    _assert_clean(store)
    monkeypatch.setattr(w, "_exchange", lambda a, b: False)  # and the fallback itself replaces
    write_element(part, "table", _table(3, 4.0), overwrite=True)
    assert _read(store)["table"].n_obs == 3
    _assert_clean(store)


@pytest.mark.slow
def test_sigkill_during_writes_leaves_an_openable_store(tmp_path):
    """Kill a writer at random points, 12 times: the store opens, and holds the old or the new table, complete."""
    path = tmp_path / "s.zarr"
    n_big = 20000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SpatialData(labels={"nuclei": _labels()}, tables={"table": _table(5, 1.0, n_genes=64)}).write(path)
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    seen = set()
    on_disk = 5
    for _ in range(12):
        started = ctx.Event()
        child = ctx.Process(target=_write_forever, args=(str(path), n_big, int(on_disk == n_big), started))
        child.start()
        assert started.wait(60)
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        back = _read(path)  # must open
        table = back.tables["table"]
        assert table.n_obs in (5, n_big)
        np.testing.assert_array_equal(np.asarray(table.X), 1.0 if table.n_obs == 5 else 2.0)
        seen.add(table.n_obs)
        on_disk = table.n_obs
    assert seen == {5, n_big}  # the kills landed in both tables' writes
    # a later write removes what the killed writers left and leaves the store clean
    sdata = spatialdata.read_zarr(path, selection=("labels",))
    write_element(sdata, "table", _table(7), overwrite=True)
    assert _read(path)["table"].n_obs == 7
    _assert_clean(path)


# ------------------------------------------------------------------------------------------------ nothing else touched
def test_leaves_everything_else_in_the_store(store):
    """Only the writer's own scratch stores of dead processes are removed; the user's files and live writers' stay."""
    dead = multiprocessing.get_context("fork").Process(target=os.getpid)
    dead.start()
    dead.join()
    stale = store / f"{SCRATCH_PREFIX}{dead.pid}-{'a' * 32}"
    live = store / f"{SCRATCH_PREFIX}{os.getppid()}-{'b' * 32}"
    for folder in (stale, live, store / ".mine", store / f"{SCRATCH_PREFIX}notes"):
        folder.mkdir()
        (folder / "f.txt").write_text("x")
    (store / "notes.txt").write_text("mine")
    (store / "tables" / "README").write_text("mine")
    sdata = _read(store)
    write_element(sdata, "table", _table(3, 5.0), overwrite=True)
    assert not stale.exists()
    for kept in (live, store / ".mine", store / f"{SCRATCH_PREFIX}notes"):
        assert (kept / "f.txt").read_text() == "x"
    assert (store / "notes.txt").read_text() == "mine"
    assert (store / "tables" / "README").read_text() == "mine"
    assert int(_read(store).labels["nuclei"].max()) == 1


# ------------------------------------------------------------------------------------------------ public functions
@pytest.fixture
def slide_store(tmp_path):
    """A small synthetic slide (H&E, the user's labels "nuclei", the measured "table") written to a zarr store."""
    import ghist

    path = tmp_path / "slide.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ghist.datasets.synthetic(image_size=256, seed=0).write(path)
    return path


def test_segment_nuclei_over_a_selection_keeps_the_labels_on_disk(slide_store):
    """`segment_nuclei` on a store read without its labels refuses to replace them; `overwrite=True` swaps them."""
    import ghist

    theirs = np.asarray(_read(slide_store).labels["nuclei"])
    part = spatialdata.read_zarr(slide_store, selection=("images",))
    with pytest.raises(ValueError, match="not loaded"):
        ghist.pp.segment_nuclei(part, key_added="nuclei", num_workers=1, progress=False)
    np.testing.assert_array_equal(np.asarray(_read(slide_store).labels["nuclei"]), theirs)
    assert "nuclei" not in part.labels
    ours = ghist.pp.segment_nuclei(part, key_added="nuclei", num_workers=1, progress=False, overwrite=True)
    assert ours is part.labels["nuclei"]
    back = np.asarray(_read(slide_store).labels["nuclei"])
    np.testing.assert_array_equal(back, np.asarray(ours))
    assert not np.array_equal(back, theirs)
    assert set(_read(slide_store).tables) == {"table"}  # the measured table is untouched
    _assert_clean(slide_store)


def test_detect_tissue_and_aggregate_over_a_selection(slide_store):
    import ghist

    part = spatialdata.read_zarr(slide_store, selection=("images",))
    ghist.pp.detect_tissue(part, key_added="tissue", min_area_um2=10)
    part = spatialdata.read_zarr(slide_store, selection=("images",))
    with pytest.raises(ValueError, match="not loaded"):
        ghist.pp.detect_tissue(part, key_added="tissue", min_area_um2=10)
    with pytest.raises(ValueError, match="labels element in the zarr store"):
        ghist.pp.detect_tissue(part, key_added="nuclei", overwrite=True)
    assert set(_read(slide_store).shapes) == {"tissue"}
    full = _read(slide_store)
    full.tables["pred"] = full.tables["table"]  # stands in for a prediction table
    with pytest.raises(ValueError, match="not loaded"):
        ghist.tl.aggregate_to_spots(
            spatialdata.read_zarr(slide_store, selection=("shapes",)),
            pred_key="pred",
            spots_key="tissue",
            key_added="table",
        )


def test_predict_over_a_selection_keeps_the_measured_table(slide_store):
    """`tl.predict(..., key_added=K)` on a store read without table K refuses it (before predicting); the user's
    measured table stays, on disk and complete."""
    import ghist

    theirs = _read(slide_store).tables["table"]
    part = spatialdata.read_zarr(slide_store, selection=("images", "labels"))
    with pytest.raises(ValueError, match="not loaded"):
        ghist.tl.predict(part, key_added="table", progress=False)
    back = _read(slide_store).tables["table"]
    assert back.n_obs == theirs.n_obs
    np.testing.assert_array_equal(
        back.X.toarray() if hasattr(back.X, "toarray") else back.X,
        theirs.X.toarray() if hasattr(theirs.X, "toarray") else theirs.X,
    )
    assert "table" not in part.tables
    _assert_clean(slide_store)


@pytest.mark.parametrize("user_choice", [None, True])
def test_tables_unsharded_without_anndata_warnings_unless_the_user_chose(store, user_choice):
    import anndata

    part = spatialdata.read_zarr(store, selection=("labels",))
    with anndata.settings.override(auto_shard_zarr_v3=user_choice), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        write_element(part, "pred", _table(4, 2.0))
        assert anndata.settings.auto_shard_zarr_v3 is user_choice  # ghist's choice ends with the write
    assert not [w for w in seen if "autosharding" in str(w.message)]
    x_meta = json.loads((store / "tables" / "pred" / "X" / "zarr.json").read_text())
    sharded = any(c.get("name") == "sharding_indexed" for c in x_meta.get("codecs", []))
    assert sharded is bool(user_choice)
    np.testing.assert_array_equal(_read(store)["pred"].X, 2.0)
