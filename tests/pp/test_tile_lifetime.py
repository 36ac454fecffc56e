"""A store that ``make_tiles`` writes to a temporary folder lives exactly as long as some ``TileSet`` of it."""

from __future__ import annotations

import gc
import logging
import pickle
import tempfile

import numpy as np
import pytest
import torch

from ghist.pp import TileSet, make_tiles


@pytest.fixture
def tmpdir_(tmp_path, monkeypatch):
    """A private temporary directory, so the folders made there can be counted."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _folders(root) -> list:
    return sorted(p for p in root.iterdir() if p.name.startswith("ghist_tiles_"))


def _tiles(sdata, **kwargs):
    return make_tiles(sdata, tile_size=16, progress=False, **kwargs)


def test_temporary_store_is_removed_with_its_last_tileset(sdata, tmpdir_, caplog):
    with caplog.at_level(logging.INFO, logger="ghist"):
        tiles = _tiles(sdata)
    (folder,) = _folders(tmpdir_)
    assert tiles.path.parent == folder
    assert any(str(tiles.path) in r.getMessage() and "MB" in r.getMessage() for r in caplog.records)
    len(tiles.train[0]["cell_id"])  # reading keeps it
    assert folder.exists()
    with caplog.at_level(logging.DEBUG, logger="ghist"):
        del tiles
        gc.collect()
    assert not folder.exists()
    assert _folders(tmpdir_) == []
    assert any(f"Removed the temporary tile store {folder}" in r.getMessage() for r in caplog.records)


def test_many_runs_leave_no_litter(sdata, tmpdir_):
    for _ in range(3):
        tiles = _tiles(sdata)
        assert len(tiles) > 0
    del tiles
    gc.collect()
    assert _folders(tmpdir_) == []


def test_derived_tilesets_and_datasets_keep_the_store(sdata, tmpdir_):
    tiles = _tiles(sdata, fold=1)
    path = tiles.path
    other = tiles.with_fold(2)
    train = tiles.with_fold(3).train  # a dataset alone keeps its TileSet, so its store
    reopened = TileSet.open(path)
    del tiles
    gc.collect()
    assert path.exists()
    assert other.fold == 2
    item = other.train[0]  # a tile of the derived TileSet reads whole: one id per local label
    assert len(item["cell_id"]) == int(item["labels"].max()) > 0
    del other
    gc.collect()
    assert path.exists()
    assert train[0]["image"].shape == (3, 16, 16)
    del train
    gc.collect()
    assert path.exists()
    assert len(reopened) > 0
    del reopened
    gc.collect()
    assert not path.parent.exists()


def test_stores_at_a_path_are_never_removed(sdata, tmp_path, tmpdir_):
    tiles = _tiles(sdata, path=tmp_path / "kept.zarr")
    del tiles
    gc.collect()
    assert (tmp_path / "kept.zarr" / "zarr.json").exists()
    assert _folders(tmpdir_) == []


def test_failed_make_tiles_removes_its_folder(sdata, tmpdir_, monkeypatch):
    import ghist.pp._tiles as tiles_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiles_module, "_cut_tiles", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _tiles(sdata)
    assert _folders(tmpdir_) == []


def test_pickled_copies_share_the_owner(sdata, tmpdir_):
    """In the creating process a pickled copy is the same owner: the store outlives the original."""
    tiles = _tiles(sdata)
    path = tiles.path
    clone = pickle.loads(pickle.dumps(tiles))
    del tiles
    gc.collect()
    assert path.exists()
    assert len(clone.read(0)["cell_id"]) > 0
    del clone
    gc.collect()
    assert not path.parent.exists()


@pytest.mark.slow  # starts DataLoader worker processes
def test_dataloader_workers_do_not_remove_the_store(sdata, tmpdir_):
    tiles = _tiles(sdata, fold=None)
    path = tiles.path
    # the worker server's socket lives in the system temporary folder (a pytest path would exceed AF_UNIX's limit)
    tempfile.tempdir = None
    for _ in range(2):  # workers start and exit twice
        loader = tiles.loader("train", batch_size=2, num_workers=2, shuffle=False)
        seen = torch.cat([batch["tile"] for batch in loader])
        assert sorted(seen.tolist()) == tiles.indices("train").tolist()
        del loader
        gc.collect()
        assert (path / "zarr.json").exists()
    np.testing.assert_array_equal(tiles.read(0)["labels"], TileSet.open(path).read(0)["labels"])
    del tiles
    gc.collect()
    assert not path.parent.exists()


def test_a_forked_child_dropping_the_tileset_does_not_remove_the_store(sdata, tmpdir_):
    """A forked worker holds a copy of the owner, with its finalizer: collecting it there must not delete."""
    import os

    tiles = _tiles(sdata, fold=None)
    path = tiles.path
    pid = os.fork()
    if pid == 0:  # the child: drop every reference, collect, leave without running anything else
        try:
            del tiles
            gc.collect()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert (path / "zarr.json").exists()
    del tiles
    gc.collect()
    assert not path.parent.exists()


def test_unpickled_in_another_process_does_not_remove_the_store(sdata, tmpdir_, tmp_path):
    """What a spawned DataLoader worker does: unpickle the dataset, read, drop it, exit."""
    import subprocess
    import sys

    tiles = _tiles(sdata, fold=None)
    (tmp_path / "train.pkl").write_bytes(pickle.dumps(tiles.train))
    code = (
        "import gc, pickle, sys; ds = pickle.load(open(sys.argv[1], 'rb')); "
        "assert ds.tiles.read(0)['labels'].size; del ds; gc.collect()"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "train.pkl")], check=True)
    assert (tiles.path / "zarr.json").exists()
    assert len(tiles.read(0)["cell_id"]) > 0


def test_segment_nuclei_leaves_no_temporary_files(tmpdir_):
    import ghist

    sdata = ghist.datasets.synthetic(image_size=96, n_genes=4, seed=0)
    del sdata.labels["nuclei"]
    ghist.pp.segment_nuclei(sdata, key_added="nuclei", progress=False)
    assert "nuclei" in sdata.labels
    gc.collect()
    assert list(tmpdir_.iterdir()) == []
