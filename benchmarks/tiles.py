"""Cutting training tiles: `ghist.pp.make_tiles` against naive per-tile `spatialdata.bounding_box_query`.

The baseline is what spatialdata's ``ImageTilesDataset`` does for every tile it serves: a bounding-box query of the
image, the labels and the table around the tile, then reading the pixels. A training loop pays that cost for every
tile in every epoch; ``make_tiles`` pays it once (one pass over the image, writing a chunked zarr store) and every
epoch then reads tiles back from the store.

Example::

    python benchmarks/tiles.py --image-size 2048 --tile-size 256 --genes 50

Prints, for the same data in the same run: tiles/s and peak traced memory of ``make_tiles``, of one pass of the
naive cutting, and of one epoch of reads from the store (``TileSet.read``), then the ratios.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import spatialdata as sd

import ghist
from ghist.pp import TileSet, make_tiles


def _measure(fn: Callable[[], Any], *, memory: bool) -> tuple[float, float | None, Any]:
    """Seconds of one call, and (in a second call under tracemalloc) its peak traced memory in MiB."""
    gc.collect()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = None
    if memory:
        gc.collect()
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return seconds, peak, out


def naive_tiles(sdata: sd.SpatialData, tile_size: int, *, limit: int | None = None) -> int:
    """Cut the tile grid with one `bounding_box_query` per tile (image + labels + table), reading the pixels."""
    height, width = sdata.images["he"].shape[1:]
    n = 0
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            if limit is not None and n >= limit:
                return n
            box = sd.bounding_box_query(
                sdata,
                axes=("y", "x"),
                min_coordinate=[y0, x0],
                max_coordinate=[y0 + tile_size, x0 + tile_size],
                target_coordinate_system="global",
                filter_table=True,
            )
            image = np.asarray(box.images["he"])
            labels = np.asarray(box.labels["nuclei"])
            ids = np.unique(labels)
            table = box.tables["table"]
            expr = np.log1p(table[table.obs["cell_id"].isin(ids)].X.toarray())
            assert image.ndim == 3
            assert expr.ndim == 2
            n += 1
    return n


def read_epoch(tiles: TileSet) -> int:
    """Read every tile of the store once, as a training epoch does."""
    for t in range(len(tiles)):
        tiles.read(t)
    return len(tiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=2048)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    args = parser.parse_args()
    logging.getLogger("ghist").setLevel(logging.WARNING)
    memory = not args.no_memory

    start = time.perf_counter()
    sdata = ghist.datasets.synthetic(image_size=args.image_size, n_genes=args.genes, seed=args.seed)
    print(
        f"data: ghist.datasets.synthetic(image_size={args.image_size}, n_genes={args.genes}) "
        f"{sdata.tables['table'].n_obs} cells, made in {time.perf_counter() - start:.1f} s"
    )
    workdir = Path(tempfile.mkdtemp(prefix="ghist_bench_tiles_"))
    runs = iter(range(10**6))

    def cut() -> TileSet:
        return make_tiles(
            sdata,
            cell_type_key="cell_type",
            tile_size=args.tile_size,
            path=workdir / f"{next(runs)}.zarr",
            progress=False,
        )

    make_tiles(sdata, tile_size=args.tile_size, path=workdir / "warmup.zarr", progress=False)  # imports, caches
    naive_tiles(sdata, args.tile_size, limit=2)

    t_ghist, m_ghist, tiles = _measure(cut, memory=memory)
    n_grid = math.ceil(args.image_size / args.tile_size) ** 2
    t_naive, m_naive, n_naive = _measure(lambda: naive_tiles(sdata, args.tile_size), memory=memory)
    t_read, m_read, n_read = _measure(lambda: read_epoch(tiles), memory=memory)

    def line(name: str, n: int, seconds: float, peak: float | None) -> str:
        mem = f", peak {peak:.1f} MiB" if peak is not None else ""
        return (
            f"{name}: {n} tiles in {seconds:.3f} s = {n / seconds:.1f} tiles/s ({1e3 * seconds / n:.2f} ms/tile){mem}"
        )

    print(f"tile grid: {n_grid} tiles of {args.tile_size} px; kept {len(tiles)} with nuclei")
    print(line("ghist make_tiles (cut once, grid tiles)", n_grid, t_ghist, m_ghist))
    print(line("naive bounding_box_query per tile", n_naive, t_naive, m_naive))
    print(line("ghist TileSet.read (one epoch from the store)", n_read, t_read, m_read))
    print(f"ratio make_tiles vs naive (tiles/s): {(n_grid / t_ghist) / (n_naive / t_naive):.1f}x")
    print(f"ratio TileSet.read vs naive per epoch (tiles/s): {(n_read / t_read) / (n_naive / t_naive):.1f}x")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
