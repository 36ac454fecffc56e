"""Inference throughput of the GHIST network (cells per second), with a naive per-cell pooling baseline.

Example::

    python benchmarks/forward.py --batch 4 --tile 256 --cells-per-tile 60 --genes 280 --types 9 \
        --ref-profiles 63 --width 64 --device cpu --channels-last

Prints ``params=<n>``, the baseline (``baseline_cells_per_s=``: same weights, NCHW, float32, unfused batch norm,
per-cell Python pooling loop), the pooling step alone for both methods, and LAST ``cells_per_s=<x>`` for the
optimised settings (segment pooling, batch norm folded into the convolutions, plus the requested flags).
Each figure is the median of ``--repeats`` timed runs after ``--warmup`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import LoopPoolingNetwork, amp_dtype, disk_batch

from ghist._model._network import GHISTNetwork, segment_pool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--cells-per-tile", type=int, default=60)
    parser.add_argument("--genes", type=int, default=280)
    parser.add_argument("--types", type=int, default=9)
    parser.add_argument("--ref-profiles", type=int, default=63, help="0: no reference")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    parser.add_argument("--amp-dtype", choices=["bfloat16", "float16"], help="autocast dtype override")
    parser.add_argument("--no-fuse", action="store_true", help="keep batch norm separate from the convolutions")
    parser.add_argument("--upsample-first", action="store_true", help="original UNet3+ order: resample, then conv")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (slow first call)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = torch.rand(args.ref_profiles, args.genes) * 20 if args.ref_profiles else None
    kwargs = {"reference": reference, "width": args.width, "upsample_first": args.upsample_first}
    net = GHISTNetwork(args.genes, args.types, **kwargs).eval()
    image, labels, cell_batch, n_cells = disk_batch(args.batch, args.tile, args.cells_per_tile)
    image, labels, cell_batch = image.to(device), labels.to(device), cell_batch.to(device)
    print(f"params={sum(p.numel() for p in net.parameters())}")
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} tile={args.tile} cells={n_cells} "
        f"width={args.width} channels_last={args.channels_last} amp={args.amp} fuse={not args.no_fuse} "
        f"upsample_first={args.upsample_first} compile={args.compile}"
    )

    if not args.no_baseline:
        base = LoopPoolingNetwork(args.genes, args.types, **kwargs).eval()
        base.load_state_dict(net.state_dict())
        base.to(device)
        with torch.inference_mode():
            seconds = _time(lambda: base(image, labels, cell_batch, n_cells), device, args.warmup, args.repeats)
            print(f"baseline_s_per_batch={seconds:.3f}")
            print(f"baseline_cells_per_s={n_cells / seconds:.2f}")
            _, decoded, encoded = base.backbone(image)
            maps = (decoded, encoded)
            loop_s = _time(lambda: base.pool_cells(maps, labels, n_cells), device, 0, max(1, args.repeats // 2))
            seg_s = _time(lambda: segment_pool(maps, labels, n_cells), device, 1, args.repeats)
            print(f"pooling_loop_s={loop_s:.4f} pooling_segment_s={seg_s:.4f} pooling_speedup={loop_s / seg_s:.1f}")
        del base, maps, decoded, encoded

    if not args.no_fuse:
        net = net.fuse_for_inference(inplace=True)
    net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    if args.compile:
        net.backbone = torch.compile(net.backbone, dynamic=False)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype(device, args.amp_dtype)) if args.amp else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        seconds = _time(lambda: net(image, labels, cell_batch, n_cells), device, args.warmup, args.repeats)
    print(f"s_per_batch={seconds:.3f}")
    print(f"cells_per_s={n_cells / seconds:.2f}")


if __name__ == "__main__":
    main()
