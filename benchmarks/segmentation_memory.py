"""Peak memory and rate of the learned nucleus segmenter as the slide grows: is memory flat in slide size?

Example::

    python benchmarks/segmentation_memory.py --model /tmp/segmenter --sides 4 8

Each slide is a lazy dask mosaic of ``side x side`` held-out nuclei_dev images (1000 x 1000 px at 0.25 µm/px each,
repeated: the dask graph shares their arrays, so the input itself costs next to nothing), segmented by
``segment_nuclei(method="ghist", model=<folder>)`` with its defaults, each size in its own subprocess so its peak
resident memory is its own. Prints, per size: megapixels, nuclei, wall and CPU seconds, Mpx/s at the input's and the
model's working pixel size, and peak RSS; then the ratio of peak RSS of the largest size to the smallest. A model
comes from ``benchmarks/segmentation_real.py --save-model``. Quote the output with the machine's load (printed).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see segmentation_real.py

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(model: str, side: int, chunk_size: int | None) -> dict:
    import dask.array as da
    import numpy as np
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    sys.path.insert(0, str(HERE))
    from segmentation_real import HELD_OUT, PIXEL_SIZE, read_images

    import ghist

    images = read_images()
    tiles = [da.from_array(np.moveaxis(images[i][0], -1, 0), chunks=(3, 1000, 1000)) for i in HELD_OUT]
    rows = [[tiles[(r * side + c) % len(tiles)] for c in range(side)] for r in range(side)]
    mosaic = da.block(rows).rechunk((3, 2048, 2048))
    sdata = sd.SpatialData(
        images={
            "he": Image2DModel.parse(
                mosaic,
                dims=("c", "y", "x"),
                transformations={"global": Identity(), "microns": Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("y", "x"))},
            )
        }
    )
    working = ghist.pp.NucleusSegmenter.load(model).pixel_size
    start, cpu = time.perf_counter(), time.process_time()
    blocks = {} if chunk_size is None else {"chunk_size": chunk_size}  # segment_nuclei's own default otherwise
    labels = ghist.pp.segment_nuclei(
        sdata, method="ghist", model=model, pixel_size=PIXEL_SIZE, progress=False, **blocks
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    mpx = mosaic.shape[1] * mosaic.shape[2] / 1e6
    n = int(labels.data.max().compute())
    return {
        "side_px": int(mosaic.shape[1]),
        "mpx": mpx,
        "nuclei": n,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "mpx_per_s": mpx / seconds,
        "working_mpx_per_s": mpx * (PIXEL_SIZE / working) ** 2 / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved NucleusSegmenter folder")
    parser.add_argument("--sides", type=int, nargs="+", default=[4, 8], help="mosaic sides, in 1000-px images")
    parser.add_argument("--chunk-size", type=int, default=None, help="segment_nuclei's chunk_size (default: its own)")
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        print("RESULT " + json.dumps(run_one(args.model, args.run, args.chunk_size)))
        return
    print(f"load at start: {os.getloadavg()}")
    results = []
    for side in args.sides:
        out = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--run", str(side)]
            + ([] if args.chunk_size is None else ["--chunk-size", str(args.chunk_size)]),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        results.append(result)
        print(
            f"{result['side_px']} x {result['side_px']} px ({result['mpx']:.0f} Mpx): {result['nuclei']} nuclei in "
            f"{result['seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU-s), {result['mpx_per_s']:.2f} Mpx/s input, "
            f"{result['working_mpx_per_s']:.2f} Mpx/s at the working pixel size; "
            f"peak RSS {result['peak_rss_gb']:.2f} GB"
        )
    print(
        f"SUMMARY peak RSS {results[-1]['peak_rss_gb']:.2f} GB at {results[-1]['mpx']:.0f} Mpx over "
        f"{results[0]['peak_rss_gb']:.2f} GB at {results[0]['mpx']:.0f} Mpx: "
        f"x{results[-1]['peak_rss_gb'] / results[0]['peak_rss_gb']:.2f} for "
        f"x{results[-1]['mpx'] / results[0]['mpx']:.0f} the area; load at end {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
