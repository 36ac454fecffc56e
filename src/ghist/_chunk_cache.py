"""Windows of dask-backed rasters read through a cache of their decoded chunks.

Tiles are much smaller than storage chunks (a 256-px tile, a 2048-px zarr chunk), and every dask slice decodes
each whole chunk it touches: cut one by one on an overlapping grid, a slide's chunks are each decoded again for
every tile over them (about 100 times for predict's 256-px tiles at its default 30-px overlap on 2048-px chunks).
Reading through :class:`ChunkCachedArray` decodes a chunk once and keeps the most recently used ones up to a byte
budget, so a row-major sweep of tiles decodes each chunk about once per row of tiles over it, with memory that
does not grow with the slide. The values are those of the array: only when chunks are decoded changes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

import numpy as np

#: Bytes of decoded chunks kept per array: four chunks of 2048-px int32 labels (five of a 2048-px RGB level), the
#: most a tile smaller than a chunk straddles, so a row of tiles decodes each chunk under it about once. Keeping a
#: whole row of chunks would also spare decoding them again for the next row of tiles, but made predict's peak memory
#: grow with the slide's width (the benchmarks page of the docs has both costs).
CHUNK_CACHE_BYTES = 4 * 2048 * 2048 * 4


class ChunkCachedArray:
    """A dask array read by basic slices (step 1) through a least-recently-used cache of its decoded chunks.

    Offers what window reads need of an array: ``shape``, ``dtype``, ``ndim`` and ``array[slices]`` (a numpy
    array). Picklable: a copy (e.g. for a DataLoader worker process) starts with an empty cache.

    Parameters
    ----------
    data
        The dask array.
    max_bytes
        Budget of decoded chunks kept; the most recently used chunk is always kept, whatever its size.

    Examples
    --------
    >>> cached = ChunkCachedArray(sdata.labels["nuclei"].data)
    >>> window = cached[1000:1256, 2000:2256]  # decodes the chunks under the window once

    """

    def __init__(self, data: Any, max_bytes: int = CHUNK_CACHE_BYTES):
        self.data = data
        self.shape = tuple(int(s) for s in data.shape)
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.max_bytes = int(max_bytes)
        self._edges = [np.cumsum((0, *sizes)) for sizes in data.chunks]
        self._blocks: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self.decoded = 0  # chunks decoded so far: what the cache saves is visible in benchmarks and tests

    def __getitem__(self, key: Any) -> np.ndarray:
        bounds = self._bounds(key)
        out = np.empty([stop - start for start, stop in bounds], dtype=self.dtype)
        if out.size == 0:
            return out
        blocks = [
            range(int(np.searchsorted(edges, start, side="right")) - 1, int(np.searchsorted(edges, stop, side="left")))
            for edges, (start, stop) in zip(self._edges, bounds, strict=True)
        ]
        for index in itertools.product(*blocks):
            source, target = [], []
            for edges, (start, stop), i in zip(self._edges, bounds, index, strict=True):
                lo, hi = max(start, int(edges[i])), min(stop, int(edges[i + 1]))
                source.append(slice(lo - int(edges[i]), hi - int(edges[i])))
                target.append(slice(lo - start, hi - start))
            out[tuple(target)] = self._block(index)[tuple(source)]
        return out

    def _bounds(self, key: Any) -> list[tuple[int, int]]:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim or not all(isinstance(k, slice) for k in key):
            raise TypeError(f"ChunkCachedArray takes up to {self.ndim} slices, got {key!r}.")
        bounds = []
        for k, size in zip((*key, *[slice(None)] * (self.ndim - len(key))), self.shape, strict=True):
            start, stop, step = k.indices(size)
            if step != 1:
                raise TypeError(f"ChunkCachedArray takes slices of step 1, got {k!r}.")
            bounds.append((start, max(start, stop)))
        return bounds

    def _block(self, index: tuple[int, ...]) -> np.ndarray:
        block = self._blocks.get(index)
        if block is not None:
            self._blocks.move_to_end(index)
            return block
        block = np.asarray(self.data.blocks[index])
        self.decoded += 1
        self._blocks[index] = block
        self._bytes += block.nbytes
        while self._bytes > self.max_bytes and len(self._blocks) > 1:
            self._bytes -= self._blocks.popitem(last=False)[1].nbytes
        return block

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_blocks": OrderedDict(), "_bytes": 0}

    def __repr__(self) -> str:
        return (
            f"ChunkCachedArray(shape={self.shape}, dtype={self.dtype}, {len(self._blocks)} chunks cached, "
            f"{self._bytes / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MiB)"
        )


def chunk_cached(array: Any, max_bytes: int | None = None) -> Any:
    """``array`` (a DataArray or array) read through a :class:`ChunkCachedArray` when it is dask-backed.

    A dask-backed DataArray is wrapped by its data; numpy-backed arrays (already decoded) and anything under a budget
    of 0 (``CHUNK_CACHE_BYTES = 0``: no cache) are returned as they are. Not thread-safe: one reader per copy.
    """
    from xarray import DataArray

    data = array.data if isinstance(array, DataArray) else array
    max_bytes = CHUNK_CACHE_BYTES if max_bytes is None else max_bytes
    if max_bytes <= 0 or not hasattr(data, "blocks") or not hasattr(data, "chunks"):
        return array
    return ChunkCachedArray(data, max_bytes)
