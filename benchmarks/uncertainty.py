"""Calibration of ghist's per-cell uncertainty (``layers["ghist_std"]``) on held-out cells.

Trains as the README quick start does (``make_tiles`` with cell types, a reference, ``fit(width=32,
max_time="00:10:00")``) on ``ghist.datasets.synthetic(seed=1)``, predicts the slide, and on the cells of the
test split's tiles (never trained on) reports

- coverage: the fraction of measured ``log1p`` values inside ``X +- 1.645 * ghist_std`` (nominal 90%);
- Spearman's rho between each cell's mean std over genes and its mean absolute error over genes;
- the post-hoc scale fitted on the validation split, steps trained and the load average;
- the mean Pearson over genes of the same cells (a gene predicted constant counts as 0), and that of the same model
  without its residual readout (``fit``'s ``readout``; the network's ``readout`` set to ``None``).

Public API only, but for the last figure.
Usage: ``python benchmarks/uncertainty.py [--max-time 00:10:00] [--image-size N]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-time", default=None, help="training budget, HH:MM:SS (default: 00:10:00, or none with --max-steps)"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="a step budget instead of time (load-independent; the README's 10 min are ~216 steps)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="smaller synthetic slide (default: the README's)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.max_time is None and args.max_steps is None:
        args.max_time = "00:10:00"
    # else a step budget alone: a busy machine must not stop the run short of it

    import torch
    from _common import without_readout
    from scipy.stats import spearmanr

    import ghist

    torch.manual_seed(0)
    kwargs = {} if args.image_size is None else {"image_size": args.image_size}
    sdata = ghist.datasets.synthetic(seed=args.seed, **kwargs)
    ref = ghist.pp.reference_profiles(ghist.datasets.synthetic_reference(), "cell_type")
    tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type", progress=False)
    load0 = os.getloadavg()
    start = time.perf_counter()
    model = ghist.tl.fit(
        tiles, reference=ref, width=args.width, max_time=args.max_time, max_steps=args.max_steps, progress=False
    )
    train_s = time.perf_counter() - start
    steps = int(model.history_["step"].max()) if model.history_ is not None and len(model.history_) else -1

    table = ghist.tl.predict(sdata, model, progress=False)
    # Held-out cells and their measured log1p counts: the cells of the test tiles (masked in every training tile).
    truth: dict[int, np.ndarray] = {}
    for t in tiles.indices("test"):
        item = tiles.read(int(t), standardise=False)
        for cid, row in zip(item["cell_id"], item["expr"], strict=True):
            if np.isfinite(row).all():
                truth[int(cid)] = row
    ids = table.obs["cell_id"].astype(int).to_numpy()
    keep = np.isin(ids, list(truth))
    y = np.stack([truth[i] for i in ids[keep]]).astype(np.float64)
    mu = np.asarray(table.X, dtype=np.float64)[keep]
    sd = np.asarray(table.layers["ghist_std"], dtype=np.float64)[keep]
    inside = np.abs(y - mu) <= 1.645 * sd
    coverage = float(inside.mean())
    per_gene = inside.mean(axis=0)
    rho = float(spearmanr(sd.mean(axis=1), np.abs(y - mu).mean(axis=1)).statistic)
    rho_gene = float(spearmanr(sd.mean(axis=0), np.abs(y - mu).mean(axis=0)).statistic)
    raw = coverage_at(y, mu, sd / np.asarray(model.uncertainty_["scale"]))
    entropy = table.obs["ghist_cell_type_entropy"].to_numpy()[keep]
    wrong = (table.obs["ghist_cell_type"].astype(str).to_numpy()[keep] != cell_types(sdata, ids[keep])).astype(float)
    rho_entropy = float(spearmanr(entropy, wrong).statistic)

    print(f"training: {steps} steps in {train_s:.0f} s, load average at start {load0}, at end {os.getloadavg()}")
    print(f"post-hoc scale (validation {model.uncertainty_['level']}s, n={model.uncertainty_['n']}):")
    scale = np.asarray(model.uncertainty_["scale"])
    print(f"  all genes {model.uncertainty_['global']:.3f}; per gene {scale.min():.3f}-{scale.max():.3f}")
    print(f"held-out test cells: {keep.sum()} x {y.shape[1]} genes")
    print(f"coverage of the nominal 90% interval: {coverage:.3f} (raw head, before the scale: {raw:.3f})")
    print(f"  per gene: min {per_gene.min():.3f}, median {np.median(per_gene):.3f}, max {per_gene.max():.3f}")
    print(f"Spearman(per-cell mean std, per-cell mean |error|): {rho:.3f}")
    print(f"Spearman(per-gene mean std, per-gene mean |error|): {rho_gene:.3f}")
    print(f"Spearman(cell-type entropy, type is wrong): {rho_entropy:.3f} (error rate {wrong.mean():.3f})")
    print(f"mean Pearson over genes, held-out cells: {mean_pearson(y, mu):.4f}")
    if model.network.readout is not None:
        with without_readout(model):
            plain = ghist.tl.predict(sdata, model, key_added="ghist_no_readout", progress=False)
        print(f"  without the residual readout: {mean_pearson(y, np.asarray(plain.X, dtype=np.float64)[keep]):.4f}")


def mean_pearson(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over genes of Pearson's r between ``pred`` and ``y`` (cells x genes); a constant column counts as 0.

    Written out here because this benchmark uses ghist's public API only (``tests/test_package_structure.py``).
    """
    yc, pc = y - y.mean(0), pred - pred.mean(0)
    denom = np.sqrt((yc**2).sum(0) * (pc**2).sum(0))
    return float(np.divide((yc * pc).sum(0), denom, out=np.zeros(y.shape[1]), where=denom > 0).mean())


def coverage_at(y: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> float:
    """Fraction of ``y`` inside ``mu +- 1.645 sd``."""
    return float((np.abs(y - mu) <= 1.645 * sd).mean())


def cell_types(sdata, ids: np.ndarray) -> np.ndarray:
    """Measured cell type of each cell id (from the measured table)."""
    table = sdata.tables["table"]
    lookup = dict(zip(table.obs["cell_id"].astype(int), table.obs["cell_type"].astype(str), strict=True))
    return np.array([lookup.get(int(i), "") for i in ids])


if __name__ == "__main__":
    main()
