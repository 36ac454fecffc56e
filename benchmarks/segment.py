"""Throughput of ``ghist.pp.segment_nuclei`` (watershed) for several ``n_workers`` on the same image, in one run.

Example::

    python benchmarks/segment.py --size 4096 --chunk-size 1024 --workers 1 2

The image is a ``--size`` square mosaic of one ``ghist.datasets.synthetic`` slide (1024 px tiles, 0.5 µm/px), held
as a dask array in 2048 px chunks like a slide read lazily. Each ``n_workers`` value runs ``--repeats`` times, the
values taking turns, so a change of machine load hits them alike. Prints one line per run (seconds, Mpx/s), checks
that all runs give the same labels, then LAST a summary line with the best Mpx/s of each value and its ratio to the
first one. Quote it with the ``uptime`` load of the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale

import ghist

TILE = 1024
PIXEL_SIZE = 0.5


def mosaic(size: int, seed: int) -> sd.SpatialData:
    tile = np.asarray(ghist.datasets.synthetic(image_size=TILE, n_genes=5, seed=seed).images["he"].data)
    reps = -(-size // TILE)
    image = np.tile(tile, (1, reps, reps))[:, :size, :size]
    element = Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        chunks=(3, 2048, 2048),
        transformations={"global": Identity(), "microns": Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("y", "x"))},
    )
    return sd.SpatialData(images={"he": element})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="side of the mosaic, pixels")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("ghist").setLevel(logging.WARNING)

    sdata = mosaic(args.size, args.seed)
    mpx = args.size**2 / 1e6
    print(f"image={args.size}x{args.size} ({mpx:.1f} Mpx) chunk_size={args.chunk_size} load={os.getloadavg()}")
    best: dict[int, float] = {}
    reference = None
    for repeat in range(args.repeats):
        for n_workers in args.workers:
            key = f"nuclei_{n_workers}"
            start = time.perf_counter()
            ghist.pp.segment_nuclei(
                sdata, key_added=key, chunk_size=args.chunk_size, n_workers=n_workers, overwrite=True, progress=False
            )
            seconds = time.perf_counter() - start
            labels = np.asarray(sdata.labels[key].data.compute())
            if reference is None:
                reference = labels
            same = np.array_equal(labels, reference)
            best[n_workers] = max(best.get(n_workers, 0.0), mpx / seconds)
            print(
                f"repeat={repeat} num_workers={n_workers} nuclei={labels.max()} seconds={seconds:.1f} "
                f"mpx_per_s={mpx / seconds:.3f} same_labels_as_first={same}",
                flush=True,
            )
            if not same:
                raise SystemExit(f"num_workers={n_workers} gave other labels than num_workers={args.workers[0]}")
    first = best[args.workers[0]]
    print(
        " ".join(f"num_workers={n}: mpx_per_s={rate:.3f} ratio={rate / first:.2f}" for n, rate in best.items())
        + f" load={os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
