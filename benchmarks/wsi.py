"""Whole-slide cost: read -> detect tissue -> segment -> predict on synthetic pyramidal slides of growing size.

Each size is written once as a JPEG-compressed pyramidal TIFF (as scanners write SVS files): synthetic tissue
(`ghist.datasets.synthetic`, a few seeds tiled) covering about 30% of a glass-coloured canvas. Every size then runs in
its own subprocess (so peak memory is that size's alone) and prints wall time per phase, cells, cells/s end to end
and peak RSS; the summary gives the ratios the whole-slide issue asks for: peak RSS of the largest size over the
size 4x smaller, and time per cell across sizes (linear scaling means both stay near 1).

    python benchmarks/wsi.py                          # 2k, 4k, 8k, 16k px squares, width 16, CPU
    python benchmarks/wsi.py --sizes 2048 4096 --width 16
    python benchmarks/wsi.py --sizes 65536 --width 64 --accelerator gpu    # TCGA-sized, where a GPU is lent
    python benchmarks/wsi.py --sizes 5120 9216 --tissue 1 --model bundled --no-roi     # full tissue, 250 genes
    python benchmarks/wsi.py --sizes 8192 16384 --tissue 1 --model bundled --store     # store-backed SpatialData

By default the model is untrained (its weights do not change the cost), with ``--genes`` genes, at the slide's pixel
size (0.5 µm/px); ``--model bundled`` uses ghist's default model instead (250 genes, 2.75 µm/px). ``--store`` writes
the slide into a zarr store first and runs segment + predict on the SpatialData read back from it (labels and table
written to the store, the table chunk by chunk). ``--tissue`` is the fraction of the canvas covered by tissue.

Peak RSS is dominated by a fixed part (Python, torch, the model: about 1 GB) plus what grows with the cells: the
ratio between two sizes is near 1 only when the growing part is small next to the fixed one. Few genes, 30% tissue
and a region of interest (the defaults) keep it small whatever ghist does; compare slides with full tissue and a
real gene panel to see how memory follows the number of cells.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PIXEL_SIZE = 0.5


def write_slide(path: Path, size: int, *, seed: int = 0, tissue_fraction: float = 0.3) -> None:
    """A square pyramidal TIFF of ``size`` px: tissue blocks from a few synthetic slides on glass.

    The blocks' own nucleus labels (ids made unique per block) go beside it, ``<slide>.labels.npy``, for
    ``--labels synthetic``.
    """
    import tifffile

    import ghist

    block = 1024
    samples = [ghist.datasets.synthetic(image_size=block, n_genes=8, seed=s) for s in range(3)]
    tissue = [np.asarray(sample.images["he"]).transpose(1, 2, 0) for sample in samples]
    nuclei = [np.asarray(sample.labels["nuclei"]).astype(np.int32) for sample in samples]
    canvas = np.full((size, size, 3), 242, np.uint8)
    labels = np.lib.format.open_memmap(path.with_suffix(".labels.npy"), mode="w+", dtype=np.int32, shape=(size, size))
    rng = np.random.default_rng(seed)
    n_blocks = (size // block) ** 2
    chosen = rng.permutation(n_blocks)[: max(1, round(tissue_fraction * n_blocks))]
    per_row = size // block
    offset = 0
    for k, b in enumerate(chosen):
        r, c = divmod(int(b), per_row)
        canvas[r * block : (r + 1) * block, c * block : (c + 1) * block] = tissue[k % len(tissue)]
        own = nuclei[k % len(nuclei)]
        labels[r * block : (r + 1) * block, c * block : (c + 1) * block] = np.where(own > 0, own + offset, 0)
        offset += int(own.max())
    labels.flush()
    del labels
    levels = [canvas]
    while max(levels[-1].shape[:2]) > 1024:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        levels.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, level in enumerate(levels):
            res = 1e4 / (PIXEL_SIZE * 2**i)
            extra = {"subifds": len(levels) - 1} if i == 0 else {"subfiletype": 1}
            tif.write(level, resolution=(res, res), **extra, **opts)


def run_one(path: Path, args: argparse.Namespace) -> dict:
    """Read -> detect tissue -> segment -> predict one slide; phase times, cells and peak RSS."""
    import ghist

    times = {}
    start = time.perf_counter()
    sdata = ghist.io.read_wsi(path)
    if args.store:
        import spatialdata

        store = path.with_suffix(".zarr")
        sdata.write(store, overwrite=True)
        sdata = spatialdata.read_zarr(store)
    times["read"] = time.perf_counter() - start
    t = time.perf_counter()
    tissue = None if args.no_roi else ghist.pp.detect_tissue(sdata)  # without a ROI the tissue is not needed
    times["tissue"] = time.perf_counter() - t
    t = time.perf_counter()
    if args.labels == "synthetic":  # the blocks' own nuclei: predict's memory without segmentation's time
        import dask.array as da
        from spatialdata.models import Labels2DModel
        from spatialdata.transformations import get_transformation

        labels = da.from_array(np.load(path.with_suffix(".labels.npy"), mmap_mode="r"), chunks=2048)
        image = sdata.images["he"]["scale0"]["image"]
        transformations = get_transformation(image, get_all=True)
        sdata.labels["nuclei"] = Labels2DModel.parse(labels, dims=("y", "x"), transformations=transformations)
        if args.store:
            sdata.write_element("nuclei")
            sdata = spatialdata.read_zarr(store)
    else:
        ghist.pp.segment_nuclei(sdata, progress=False)
    times["segment"] = time.perf_counter() - t
    if args.model == "bundled":
        model = ghist.models.load(ghist.models.DEFAULT_MODEL)
    else:
        genes = [f"G{i}" for i in range(args.genes)]
        types = ["Malignant", "T", "B", "Fibroblast", "Endothelial", "Myeloid"]
        model = ghist.GHISTModel(
            genes, types, width=args.width, embed_dim=64, tile_size=args.tile_size, pixel_size=args.model_pixel_size
        )
    t = time.perf_counter()
    table = ghist.tl.predict(
        sdata,
        model,
        roi_key=None if args.no_roi else "tissue",
        accelerator=args.accelerator,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=False,
    )
    times["predict"] = time.perf_counter() - t
    total = time.perf_counter() - start
    image = sdata.images["he"]["scale0"]["image"]
    return {
        "size": int(image.shape[1]),
        "mpx": image.shape[1] * image.shape[2] / 1e6,
        "tissue_fraction": args.tissue
        if tissue is None
        else float(tissue.geometry.area.sum() / (image.shape[1] * image.shape[2])),
        "cells": int(table.n_obs),
        "genes": int(table.n_vars),
        "store": bool(args.store),
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "total_s": round(total, 2),
        "cells_per_s": table.n_obs / total,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's own peak resident size.

    Linux's ``ru_maxrss`` keeps the high-water mark of the memory image replaced by ``exec``: a subprocess forked from
    the parent that just wrote a 16k slide (about 2.7 GB resident) reported that as its own peak. ``VmHWM`` is the
    high-water mark of the current image only.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--genes", type=int, default=50, help="genes of the untrained model")
    parser.add_argument("--model", choices=["untrained", "bundled"], default="untrained")
    parser.add_argument("--model-pixel-size", type=float, default=PIXEL_SIZE, help="µm/px of the untrained model")
    parser.add_argument("--tile-size", type=int, default=256, help="tile size of the untrained model")
    parser.add_argument("--tissue", type=float, default=0.3, help="fraction of the canvas covered by tissue")
    parser.add_argument("--no-roi", action="store_true", help="predict every nucleus, not only those in tissue")
    parser.add_argument("--store", action="store_true", help="segment + predict a SpatialData backed by a zarr store")
    parser.add_argument(
        "--labels", choices=["segment", "synthetic"], default="segment", help="segment the slide, or use its own nuclei"
    )
    parser.add_argument("--dir", default=None, help="where to keep the slides (reused; default: a temporary folder)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one slide, in this process
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(Path(args.run), args)))
        return

    with tempfile.TemporaryDirectory(prefix="ghist_wsi_") as scratch:
        folder = Path(args.dir or scratch)
        results = []
        for size in args.sizes:
            path = folder / f"slide_{size}_tissue{args.tissue:g}.tif"
            if not path.exists():
                t = time.perf_counter()
                write_slide(path, size, tissue_fraction=args.tissue)
                print(f"wrote {path.name} ({os.path.getsize(path) / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
            cmd = [sys.executable, __file__, "--run", str(path), "--width", str(args.width)]
            cmd += ["--accelerator", args.accelerator, "--batch-size", str(args.batch_size)]
            cmd += ["--num-workers", str(args.num_workers), "--genes", str(args.genes), "--model", args.model]
            cmd += ["--model-pixel-size", str(args.model_pixel_size), "--tile-size", str(args.tile_size)]
            cmd += ["--tissue", str(args.tissue)]
            cmd += ["--no-roi"] * args.no_roi + ["--store"] * args.store + ["--labels", args.labels]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            s = result["seconds"]
            print(
                f"{result['size']:>6} px  {result['mpx']:7.1f} Mpx  tissue {100 * result['tissue_fraction']:4.0f}%  "
                f"{result['cells']:>8} cells  read {s['read']:.1f} s  tissue {s['tissue']:.1f} s  "
                f"segment {s['segment']:.1f} s  predict {s['predict']:.1f} s  {result['cells_per_s']:.0f} cells/s  "
                f"peak RSS {result['peak_rss_mb']:.0f} MB ({result['genes']} genes"
                f"{', store-backed' if result['store'] else ''}; load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    by_size = {r["size"]: r for r in results}
    largest = max(by_size)
    if len(by_size) > 1:
        smaller = by_size[max(s for s in by_size if s < largest)]
        ratio = by_size[largest]["peak_rss_mb"] / smaller["peak_rss_mb"]
        cells = by_size[largest]["cells"] / max(smaller["cells"], 1)
        print(f"peak RSS {largest} px / {smaller['size']} px: {ratio:.2f} (cells x{cells:.1f})")
    per_cell = {r["size"]: r["total_s"] / max(r["cells"], 1) for r in results}
    base = per_cell[min(per_cell)]
    print("time per cell relative to the smallest size:", {k: round(v / base, 2) for k, v in per_cell.items()})


if __name__ == "__main__":
    main()
