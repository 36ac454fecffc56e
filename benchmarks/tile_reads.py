"""Reading a slide's tiles for predict: through the cache of decoded chunks against plain dask slicing.

A synthetic pyramidal slide (as `benchmarks/wsi.py` writes it) is opened with `ghist.io.read_wsi`, segmented with
`ghist.pp.segment_nuclei`, written to zarr and read back (so the image, like the labels, is stored in 2048-px chunks,
as any SpatialData written to disk is). Then, with the cache and without it (`ghist._chunk_cache.CHUNK_CACHE_BYTES =
0`, the reads as they were before it), in the same run: every predict tile read alone (image and labels, no network;
wall time and chunks decoded), and a whole `ghist.tl.predict` with an untrained width-16 model (the weights do not
change the cost), whose tables must be identical.

    python benchmarks/tile_reads.py                  # 8192 px, 256-px tiles, overlap 30 (predict's default)
    python benchmarks/tile_reads.py --size 4096 --repeats 3
    python benchmarks/tile_reads.py --cache-mb 256 64 32    # budgets other than the package's (MiB per array)

Prints one line per setting and LAST with the ratios (uncached over cached: > 1 means the cache is faster), one pair
per budget.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import spatialdata
from wsi import PIXEL_SIZE, write_slide

import ghist
from ghist import _chunk_cache
from ghist._chunk_cache import ChunkCachedArray


def sweep(sdata, model, tile_overlap: int) -> tuple[float, int, int]:
    """Read every tile of predict's grid once, in predict's order: seconds, tiles, decoded chunks."""
    from ghist._model._data import SlideTileDataset
    from ghist._validation import get_image, get_labels, raster_levels
    from ghist.tl._predict import _SlideGrid

    image, labels = get_image(sdata, "he"), get_labels(sdata, "nuclei")
    grid = _SlideGrid.build(sdata, image, "he", "nuclei", model, tile_overlap)
    dataset = SlideTileDataset(
        image,
        labels,
        grid.origins,
        scale=grid.scale,
        to_labels=grid.to_labels,
        tile_size=grid.tile_size,
        mean=model.mean,
        std=model.std,
        levels=raster_levels(sdata.images["he"]),
    )
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset.read(i)
    seconds = time.perf_counter() - start
    windows = dataset.windows
    arrays = [windows.labels, *(level for _, _, level in windows.levels)]
    decoded = sum(a.decoded for a in arrays if isinstance(a, ChunkCachedArray))
    return seconds, len(dataset), decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="side of the square slide, px at 0.5 µm/px")
    parser.add_argument("--tile-overlap", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many sweeps per setting")
    parser.add_argument(
        "--cache-mb",
        type=float,
        nargs="+",
        default=[_chunk_cache.CHUNK_CACHE_BYTES / 2**20],
        help="cache budgets to compare, MiB of decoded chunks per array (default: the package's)",
    )
    args = parser.parse_args()

    genes = [f"G{i}" for i in range(50)]
    model = ghist.GHISTModel(genes, ["A", "B", "C"], width=16, embed_dim=64, tile_size=256, pixel_size=PIXEL_SIZE)
    budget = _chunk_cache.CHUNK_CACHE_BYTES
    with tempfile.TemporaryDirectory() as folder:
        slide = Path(folder) / "slide.tiff"
        write_slide(slide, args.size)
        sdata = ghist.io.read_wsi(slide)
        ghist.pp.segment_nuclei(sdata, progress=False)
        sdata.write(Path(folder) / "slide.zarr")
        sdata = spatialdata.read_zarr(Path(folder) / "slide.zarr")
        chunks = sdata.labels["nuclei"].data.chunksize
        print(f"slide={args.size}px labels_chunks={chunks} tile=256 overlap={args.tile_overlap}", flush=True)

        results = {}
        settings = [("plain", 0)] + [(f"cached_{mb:g}MiB", int(mb * 2**20)) for mb in args.cache_mb]
        for name, cache_bytes in settings:
            _chunk_cache.CHUNK_CACHE_BYTES = cache_bytes
            runs = [sweep(sdata, model, args.tile_overlap) for _ in range(args.repeats)]
            seconds, n_tiles, decoded = min(runs)
            start = time.perf_counter()
            table = ghist.tl.predict(
                sdata, model, key_added=f"pred_{name}", tile_overlap=args.tile_overlap, progress=False
            )
            predict_s = time.perf_counter() - start
            results[name] = {"sweep_s": seconds, "predict_s": predict_s, "table": table}
            print(
                f"{name}: tiles={n_tiles} sweep_s={seconds:.2f} chunks_decoded={decoded if cache_bytes else 'n/a'} "
                f"predict_s={predict_s:.2f} cells={table.n_obs}",
                flush=True,
            )
        _chunk_cache.CHUNK_CACHE_BYTES = budget
    plain = results.pop("plain")
    ratios = []
    for name, result in results.items():
        np.testing.assert_array_equal(plain["table"].X, result["table"].X)
        ratios.append(
            f"{name}: sweep_speedup={plain['sweep_s'] / result['sweep_s']:.2f} "
            f"predict_speedup={plain['predict_s'] / result['predict_s']:.2f}"
        )
    print("LAST", "; ".join(ratios), "identical_tables=True")


if __name__ == "__main__":
    main()
