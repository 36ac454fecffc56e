"""Windows read through a cache of decoded chunks: the array's values, each chunk decoded about once per sweep."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import ghist
from ghist import _chunk_cache
from ghist._chunk_cache import ChunkCachedArray, chunk_cached


@pytest.fixture
def values() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 200, 300)).astype(np.uint8)


def test_windows_hold_the_arrays_values(values):
    cached = ChunkCachedArray(da.from_array(values, chunks=(3, 64, 64)))
    rng = np.random.default_rng(1)
    for _ in range(50):
        y0, x0 = rng.integers(0, 200), rng.integers(0, 300)
        y1, x1 = y0 + rng.integers(0, 150), x0 + rng.integers(0, 150)  # past the edge too: clipped as numpy does
        np.testing.assert_array_equal(cached[:, y0:y1, x0:x1], values[:, y0:y1, x0:x1])
    np.testing.assert_array_equal(cached[1:3], values[1:3])  # fewer slices than axes
    np.testing.assert_array_equal(cached[:, -10:, :5], values[:, -10:, :5])
    assert cached[:, 50:50, :].shape == (3, 0, 300)
    labels = np.arange(200 * 300, dtype=np.int64).reshape(200, 300)
    cached_labels = ChunkCachedArray(da.from_array(labels, chunks=70))
    np.testing.assert_array_equal(cached_labels[65:141, 139:281], labels[65:141, 139:281])


def test_a_sweep_of_overlapping_tiles_decodes_each_chunk_once(values):
    data = da.from_array(values, chunks=(3, 100, 100))  # 2 x 3 chunks
    cached = ChunkCachedArray(data)
    windows = [(y, x) for y in range(0, 200, 16) for x in range(0, 300, 16)]
    for y, x in windows:
        cached[:, y : y + 32, x : x + 32]
    assert cached.decoded == 6  # sliced directly, each window decodes every chunk under it: 1-4 per window
    one_chunk = ChunkCachedArray(data, max_bytes=1)  # keeps only the newest chunk: still right, decoded more often
    for y, x in windows:
        np.testing.assert_array_equal(one_chunk[:, y : y + 32, x : x + 32], values[:, y : y + 32, x : x + 32])
    assert one_chunk.decoded > 2 * len(windows) // 3
    assert len(one_chunk._blocks) == 1


def test_least_recently_used_chunks_go_first(values):
    data = da.from_array(values, chunks=(3, 100, 100))
    cached = ChunkCachedArray(data, max_bytes=2 * 3 * 100 * 100)  # two chunks
    cached[:, :10, :10]  # chunk (0, 0, 0)
    cached[:, :10, 150:160]  # (0, 0, 1)
    cached[:, :10, :10]  # (0, 0, 0) again: now the most recent
    cached[:, :10, 250:260]  # (0, 0, 2) evicts (0, 0, 1)
    assert list(cached._blocks) == [(0, 0, 0), (0, 0, 2)]
    assert cached.decoded == 3


def test_only_basic_slices_are_taken(values):
    cached = ChunkCachedArray(da.from_array(values, chunks=64))
    with pytest.raises(TypeError, match="step 1"):
        cached[:, ::2]
    with pytest.raises(TypeError, match="up to 3 slices"):
        cached[0]
    with pytest.raises(TypeError, match="up to 3 slices"):
        cached[:, :, :, :]


def test_a_pickled_copy_starts_empty_and_reads_the_same(values):
    cached = ChunkCachedArray(da.from_array(values, chunks=64))
    cached[:, :100, :100]
    copy = pickle.loads(pickle.dumps(cached))
    assert not copy._blocks
    assert copy._bytes == 0
    np.testing.assert_array_equal(copy[:, 30:90, 40:99], values[:, 30:90, 40:99])


def test_only_dask_arrays_are_wrapped(values, monkeypatch):
    assert chunk_cached(values) is values
    array = xr.DataArray(values, dims=("c", "y", "x"))
    assert chunk_cached(array) is array  # numpy-backed: already decoded
    lazy = xr.DataArray(da.from_array(values, chunks=64), dims=("c", "y", "x"))
    assert isinstance(chunk_cached(lazy), ChunkCachedArray)
    monkeypatch.setattr(_chunk_cache, "CHUNK_CACHE_BYTES", 0)
    assert chunk_cached(lazy) is lazy  # a budget of 0: no cache


def test_predict_gives_the_same_table_with_and_without_the_cache(monkeypatch):
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=8, seed=0)
    image = sdata.images["he"]
    # stored in chunks larger than the tiles and not aligned to them, as a slide written to zarr is
    sdata.images["he"] = image.copy(data=da.from_array(np.asarray(image), chunks=(3, 96, 96)))
    sdata.labels["nuclei"] = sdata.labels["nuclei"].copy(data=da.from_array(np.asarray(sdata.labels["nuclei"]), 96))
    torch.manual_seed(0)
    model = ghist.GHISTModel(list(sdata["table"].var_names), ["A", "B", "C"], width=4, embed_dim=16, tile_size=64)
    kwargs = {"tile_overlap": 31, "batch_size": 2, "progress": False}
    decoded = []
    block = ChunkCachedArray._block

    def counting(self, index):
        decoded.append((self.shape, index))
        return block(self, index)

    monkeypatch.setattr(ChunkCachedArray, "_block", counting)
    cached = ghist.tl.predict(sdata, model, key_added="cached", **kwargs)
    n_reads = len(decoded)
    assert {shape for shape, _ in decoded} == {(3, 256, 256), (256, 256)}  # image and labels read through it
    monkeypatch.setattr(_chunk_cache, "CHUNK_CACHE_BYTES", 0)
    direct = ghist.tl.predict(sdata, model, key_added="direct", **kwargs)
    assert len(decoded) == n_reads  # not read through the cache
    np.testing.assert_array_equal(cached.X, direct.X)
    np.testing.assert_array_equal(cached.layers["ghist_std"], direct.layers["ghist_std"])
    np.testing.assert_array_equal(cached.obs.index, direct.obs.index)
