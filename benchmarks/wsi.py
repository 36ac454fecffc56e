"""Whole-slide cost: read -> detect tissue -> segment -> predict on synthetic pyramidal slides of growing size.

Each size is written once as a JPEG-compressed pyramidal TIFF (as scanners write SVS files): synthetic tissue
(`ghist.datasets.synthetic`, a few seeds tiled) covering about 30% of a glass-coloured canvas. Every size then runs in
its own subprocess (so peak memory is that size's alone) and prints wall time per phase, cells, cells/s end to end
and peak RSS; the summary gives the ratios the whole-slide issue asks for: peak RSS of the largest size over the
size 4x smaller, and time per cell across sizes (linear scaling means both stay near 1).

    python benchmarks/wsi.py                          # 2k, 4k, 8k, 16k px squares, width 16, CPU
    python benchmarks/wsi.py --sizes 2048 4096 --width 16
    python benchmarks/wsi.py --sizes 65536 --width 64 --accelerator gpu    # TCGA-sized, where a GPU is lent

The model is untrained (its weights do not change the cost); its pixel size is the slide's (0.5 µm/px).
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
    """A square pyramidal TIFF of ``size`` px: tissue blocks from a few synthetic slides on glass."""
    import tifffile

    import ghist

    block = 1024
    tissue = [
        np.asarray(ghist.datasets.synthetic(image_size=block, n_genes=8, seed=s).images["he"]).transpose(1, 2, 0)
        for s in range(3)
    ]
    canvas = np.full((size, size, 3), 242, np.uint8)
    rng = np.random.default_rng(seed)
    n_blocks = (size // block) ** 2
    chosen = rng.permutation(n_blocks)[: max(1, round(tissue_fraction * n_blocks))]
    per_row = size // block
    for k, b in enumerate(chosen):
        r, c = divmod(int(b), per_row)
        canvas[r * block : (r + 1) * block, c * block : (c + 1) * block] = tissue[k % len(tissue)]
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


def run_one(path: Path, width: int, accelerator: str, batch_size: int, num_workers: int) -> dict:
    """Read -> detect tissue -> segment -> predict one slide; phase times, cells and peak RSS."""
    import ghist

    times = {}
    start = time.perf_counter()
    sdata = ghist.io.read_wsi(path)
    times["read"] = time.perf_counter() - start
    t = time.perf_counter()
    tissue = ghist.pp.detect_tissue(sdata)
    times["tissue"] = time.perf_counter() - t
    t = time.perf_counter()
    ghist.pp.segment_nuclei(sdata, progress=False)
    times["segment"] = time.perf_counter() - t
    genes = [f"G{i}" for i in range(50)]
    types = ["Malignant", "T", "B", "Fibroblast", "Endothelial", "Myeloid"]
    model = ghist.GHISTModel(genes, types, width=width, embed_dim=64, tile_size=256, pixel_size=PIXEL_SIZE)
    t = time.perf_counter()
    table = ghist.tl.predict(
        sdata,
        model,
        roi_key="tissue",
        accelerator=accelerator,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=False,
    )
    times["predict"] = time.perf_counter() - t
    total = time.perf_counter() - start
    image = sdata.images["he"]["scale0"]["image"]
    return {
        "size": int(image.shape[1]),
        "mpx": image.shape[1] * image.shape[2] / 1e6,
        "tissue_fraction": float(tissue.geometry.area.sum() / (image.shape[1] * image.shape[2])),
        "cells": int(table.n_obs),
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
    parser.add_argument("--dir", default=None, help="where to write the slides (default: a temporary folder)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one slide, in this process
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(Path(args.run), args.width, args.accelerator, args.batch_size, args.num_workers)))
        return

    with tempfile.TemporaryDirectory(prefix="ghist_wsi_", dir=args.dir) as folder:
        results = []
        for size in args.sizes:
            path = Path(folder) / f"slide_{size}.tif"
            t = time.perf_counter()
            write_slide(path, size)
            print(f"wrote {path.name} ({os.path.getsize(path) / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
            cmd = [sys.executable, __file__, "--run", str(path), "--width", str(args.width)]
            cmd += ["--accelerator", args.accelerator, "--batch-size", str(args.batch_size)]
            cmd += ["--num-workers", str(args.num_workers)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            s = result["seconds"]
            print(
                f"{result['size']:>6} px  {result['mpx']:7.1f} Mpx  tissue {100 * result['tissue_fraction']:4.0f}%  "
                f"{result['cells']:>8} cells  read {s['read']:.1f} s  tissue {s['tissue']:.1f} s  "
                f"segment {s['segment']:.1f} s  predict {s['predict']:.1f} s  {result['cells_per_s']:.0f} cells/s  "
                f"peak RSS {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    by_size = {r["size"]: r for r in results}
    largest = max(by_size)
    if largest // 2 in by_size or largest // 4 in by_size:
        # "4x smaller": a quarter of the pixels (half the side), else a quarter of the side
        smaller = by_size.get(largest // 2) or by_size[largest // 4]
        ratio = by_size[largest]["peak_rss_mb"] / smaller["peak_rss_mb"]
        print(f"peak RSS {largest} px / {smaller['size']} px: {ratio:.2f}")
    per_cell = {r["size"]: r["total_s"] / max(r["cells"], 1) for r in results}
    base = per_cell[min(per_cell)]
    print("time per cell relative to the smallest size:", {k: round(v / base, 2) for k, v in per_cell.items()})


if __name__ == "__main__":
    main()
