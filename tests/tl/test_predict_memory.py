"""predict keeps one row per cell, in memory once, or on disk chunk by chunk when the SpatialData has a store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import spatialdata
import torch

import ghist
from ghist._memory import release_freed_memory
from ghist._model._data import SlideTileDataset, collate_slide_tiles
from ghist._model._inference import Predictor
from ghist._spatial import element_affine
from ghist.tl._predict_rows import best_rows


@pytest.fixture(scope="module")
def sdata():
    return ghist.datasets.synthetic(image_size=256, n_genes=8, seed=0)


@pytest.fixture(scope="module")
def model(sdata):
    torch.manual_seed(0)
    return ghist.GHISTModel(list(sdata["table"].var_names), ["A", "B", "C"], width=4, embed_dim=16, tile_size=64)


KWARGS = {"tile_overlap": 31, "batch_size": 2, "progress": False}  # every cell in many tiles


def test_the_table_is_the_best_row_of_all_tiles(sdata, model):
    """The streamed keeper gives what concatenating every tile's rows and choosing afterwards gives."""
    table = ghist.tl.predict(sdata, model, key_added="streamed", **KWARGS)
    origins = ghist._tiling.plan_grid((256, 256), 64, overlap=31, edge="inside").origins
    ds = SlideTileDataset(
        sdata.images["he"],
        sdata.labels["nuclei"],
        origins,
        scale=1.0,
        to_labels=element_affine(sdata, "he", "nuclei"),
        tile_size=64,
        mean=model.mean,
        std=model.std,
    )
    predictor = Predictor(model, seed=0)
    ids, visible, margin, expr, types = [], [], [], [], []
    for batch in torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_slide_tiles):
        if batch is None:
            continue
        out = predictor(batch)
        ids.append(batch["cell_id"].numpy())
        visible.append(batch["visible"].numpy())
        margin.append(batch["margin"].numpy())
        expr.append(out.expr)
        types.append(out.cell_type)
    ids, visible, margin = np.concatenate(ids), np.concatenate(visible), np.concatenate(margin)
    assert ids.size > 2 * table.n_obs  # cells were seen by several tiles
    best = best_rows(ids, visible, margin)
    assert table.obs["cell_id"].tolist() == ids[best].tolist()
    np.testing.assert_array_equal(table.X, np.concatenate(expr)[best])
    np.testing.assert_array_equal(table.obs["ghist_cell_type"].cat.codes, np.concatenate(types)[best])


def test_a_backed_sdata_gets_the_same_table_written_chunk_by_chunk(sdata, model, tmp_path):
    memory = ghist.tl.predict(spatialdata.deepcopy(sdata), model, key_added="m", **KWARGS)
    path = tmp_path / "s.zarr"
    spatialdata.deepcopy(sdata).write(path)
    backed = spatialdata.read_zarr(path)
    table = ghist.tl.predict(backed, model, key_added="m", **KWARGS)
    assert hasattr(table.X, "dask")  # never in memory as a whole
    np.testing.assert_array_equal(np.asarray(table.X), memory.X)
    for name in memory.layers:
        np.testing.assert_array_equal(np.asarray(table.layers[name]), memory.layers[name])
    pd.testing.assert_frame_equal(table.obs, memory.obs)
    np.testing.assert_array_equal(table.obsm["spatial"], memory.obsm["spatial"])
    reread = spatialdata.read_zarr(path)["m"]
    np.testing.assert_array_equal(np.asarray(reread.X), memory.X)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ghist_predict_")]  # temporary rows gone


def test_release_freed_memory_asks_the_allocator_and_is_safe_without_one(monkeypatch):
    import ghist._memory as memory

    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    release_freed_memory()
    assert calls == [0]  # malloc_trim(0): give back every freed page it can
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)  # not glibc
    release_freed_memory()
    assert calls == [0]


@pytest.mark.parametrize("block", [1, 3, 4096])
def test_compact_rows_equals_a_mask_without_a_second_copy(block):
    from ghist.tl._predict_rows import compact_rows

    rng = np.random.default_rng(0)
    array = rng.normal(size=(1000, 7)).astype(np.float32)
    keep = rng.random(1000) < 0.7
    expected = array[keep].copy()
    out = compact_rows(array, keep, block=block)
    np.testing.assert_array_equal(out, expected)
    assert np.shares_memory(out, array)  # the kept rows live where the matrix was: no second (cells x genes) copy
