"""Training throughput of the GHIST network: tiles per second for forward, all losses, backward and an AdamW step.

Example::

    python benchmarks/train_step.py --batch 8 --tile 256 --width 16 --device cpu

Prints ``params=<n>``, optionally ``baseline_tiles_per_s=`` (``--baseline``: the same network pooling nuclei with
a per-cell Python loop), and LAST ``tiles_per_s=<x>`` (median of ``--repeats`` steps after ``--warmup``).
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

from ghist._model._losses import ghist_losses
from ghist._model._network import GHISTNetwork


def _steps(net, batch, device, amp, warmup, repeats, dtype=None) -> float:
    net.train()
    dtype = amp_dtype(device, dtype)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    autocast = torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda" and dtype == torch.float16)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = net(batch["image"], batch["labels"], batch["cell_batch"], batch["n_cells"])
            losses = ghist_losses(out, batch, net)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--cells-per-tile", type=int, default=60)
    parser.add_argument("--genes", type=int, default=280)
    parser.add_argument("--types", type=int, default=9)
    parser.add_argument("--ref-profiles", type=int, default=63, help="0: no reference")
    parser.add_argument("--groups", type=int, default=2, help="number of specialist groups")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 + scaler on CUDA)")
    parser.add_argument("--amp-dtype", choices=["bfloat16", "float16"], help="autocast dtype override")
    parser.add_argument("--baseline", action="store_true", help="also time per-cell loop pooling")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = torch.rand(args.ref_profiles, args.genes) * 20 if args.ref_profiles else None
    groups = {f"group{g}": [g] for g in range(min(args.groups, args.types))}
    kwargs = {"reference": reference, "groups": groups, "width": args.width}
    image, labels, cell_batch, n_cells = disk_batch(args.batch, args.tile, args.cells_per_tile, seed=1)
    gen = torch.Generator().manual_seed(0)
    cell_type = torch.randint(-1, args.types, (n_cells,), generator=gen) if args.types else torch.full((n_cells,), -1)
    expr = torch.rand(n_cells, args.genes, generator=gen) * 20
    expr[::7] = float("nan")
    batch = {
        "image": image,
        "labels": labels,
        "cell_batch": cell_batch,
        "n_cells": n_cells,
        "cell_type": cell_type,
        "expr": expr,
    }
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if args.channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    def build(cls):
        torch.manual_seed(0)
        net = cls(args.genes, args.types, **kwargs).to(device)
        return net.to(memory_format=torch.channels_last) if args.channels_last else net

    net = build(GHISTNetwork)
    print(f"params={sum(p.numel() for p in net.parameters())}")
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} tile={args.tile} cells={n_cells} "
        f"width={args.width} channels_last={args.channels_last} amp={args.amp} amp_dtype={args.amp_dtype}"
    )
    if args.baseline:
        seconds = _steps(build(LoopPoolingNetwork), batch, device, args.amp, args.warmup, args.repeats, args.amp_dtype)
        print(f"baseline_tiles_per_s={args.batch / seconds:.3f}")
    seconds = _steps(net, batch, device, args.amp, args.warmup, args.repeats, args.amp_dtype)
    print(f"s_per_step={seconds:.3f}")
    print(f"tiles_per_s={args.batch / seconds:.3f}")


if __name__ == "__main__":
    main()
