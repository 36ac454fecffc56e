"""Does ghist learn more than cell types? Scores on the synthetic slide with within-type signals.

``ghist.datasets.synthetic(signals="all")`` adds per-cell latents that the H&E shows (proliferation: nucleus size
and chromatin; hypoxia: depth into a tumour nest and cytoplasm; neighbourhood: immune cells around) and that drive a
few genes each. On its test band (the spatial fold ``make_tiles`` holds out) this compares:

(a) the type-mean oracle: each test cell predicted by its TRUE type's mean ``log1p`` expression over training cells
    (the best a model that only knows types can do);
(b) ridge: the oracle plus, on the driven genes, per true type, a ridge regression on a dozen features measured
    from the image and the nuclei (nucleus area, shape and stain, the stain around it, small dark nuclei around it,
    distance to elongated nuclei), a check that the signals are visible to a very simple reader;
(c) ghist: ``make_tiles`` + ``fit`` as in the README quick start (``width=32, max_time="00:10:00"``) on the same
    slide, ``predict``; its cell types are its own;
(d) the same trained model without its residual readout (``fit``'s ``readout``; the network's ``readout`` set to
    ``None`` for a second ``predict``), so the readout is measured on the very same network.

Each is scored by ``ghist.tl.evaluate`` (mean Pearson over genes, test cells only; a gene predicted constant counts
as 0), over all genes and over the signal-driven genes, and the ratios to the oracle are printed. Public API
only, but for (d).

Example::

    python benchmarks/synthetic_signals.py                       # 10-minute fit, as in the README
    python benchmarks/synthetic_signals.py --max-time 00:01:00   # a quick look
    python benchmarks/synthetic_signals.py --no-fit              # oracle and ridge only
    python benchmarks/synthetic_signals.py --max-steps 216 --context-neighbours 8  # with neighbourhood context
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import without_readout
from anndata import AnnData
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import regionprops
from sklearn.linear_model import Ridge

import ghist


def split_cells(tiles) -> tuple[np.ndarray, np.ndarray]:
    """Cell ids of the test tiles, and of the training tiles minus any cell also in a validation or test tile."""
    ids = {split: set() for split in ("train", "val", "test")}
    for split in ids:
        for tile in tiles.indices(split):
            ids[split].update(int(c) for c in tiles.read(tile, standardise=False)["cell_id"])
    train = ids["train"] - ids["val"] - ids["test"]
    return np.array(sorted(ids["test"])), np.array(sorted(train))


def image_features(sdata) -> pd.DataFrame:
    """A dozen per-nucleus features read from the H&E and the nuclei (identity transform assumed), indexed by id."""
    he = np.asarray(sdata["he"].values).transpose(1, 2, 0).astype(np.float32)
    labels = np.asarray(sdata["nuclei"].values)
    gray = he.mean(-1)
    props = regionprops(labels, intensity_image=gray)
    ids = np.array([p.label for p in props])
    area = np.array([p.area for p in props], float)
    ecc = np.array([p.eccentricity for p in props])
    mean = np.array([p.intensity_mean for p in props])
    std = np.array([p.image_intensity[p.image].std() for p in props])
    cy, cx = np.array([p.centroid for p in props]).T
    per = {}
    for ch, name in enumerate("rgb"):
        per[f"nuc_{name}"] = ndi.mean(he[..., ch], labels, ids)
    ring = ndi.grey_dilation(labels, size=7) * (labels == 0)  # the 3 px around each nucleus, outside all nuclei
    for ch, name in enumerate("rgb"):
        per[f"ring_{name}"] = ndi.mean(he[..., ch], ring, ids)
    xy = np.column_stack([cx, cy])
    tree = cKDTree(xy)
    small_dark = (area < np.quantile(area, 0.35)) & (mean < np.quantile(mean, 0.5))
    near = tree.query_ball_point(xy, 30.0)
    n_small_dark = np.array([small_dark[v].sum() - small_dark[i] for i, v in enumerate(near)], float)
    n_near = np.array([len(v) - 1 for v in near], float)
    long = ecc > 0.95
    d_long = cKDTree(xy[long]).query(xy)[0] if long.any() else np.full(len(xy), 100.0)
    feats = pd.DataFrame(
        {"area": area, "ecc": ecc, "mean": mean, "std": std, **per, "n_small_dark": n_small_dark, "n_near": n_near,
         "d_long": np.minimum(d_long, 100.0)},
        index=ids,
    )  # fmt: skip
    return feats.fillna(feats.mean())  # a nucleus without free pixels around it has no ring


def as_table(sdata, name: str, cell_ids: np.ndarray, X: np.ndarray, genes: list[str]) -> None:
    """Write predictions (``log1p`` scale) of ``cell_ids`` as ``sdata.tables[name]``, annotating the nuclei."""
    from spatialdata.models import TableModel

    obs = pd.DataFrame(
        {"cell_id": cell_ids.astype(np.int64), "region": pd.Categorical(["nuclei"] * len(cell_ids))},
        index=pd.Index([f"c{i}" for i in cell_ids]),
    )
    table = AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    sdata.tables[name] = TableModel.parse(table, region="nuclei", region_key="region", instance_key="cell_id")


def score(sdata, pred_key: str, groups: dict[str, list[str]]) -> dict[str, float]:
    """Mean Pearson of ``pred_key`` over all genes, over the signal-driven ones and over each signal's genes.

    A gene predicted constant though measured varying has no Pearson (``evaluate`` leaves it out of its means): here
    it counts as 0, so that a model cannot gain by giving up on genes.
    """

    def mean(frame: pd.DataFrame) -> float:
        finite = frame["pearson"].dropna()
        return float(finite.sum() / (len(finite) + frame.attrs["n_constant_predictions"]))

    every = ghist.tl.evaluate(sdata, pred_key=pred_key)
    res = {"all": mean(every), "n_cells": every.attrs["n_cells"]}
    for name, genes in {"signal": [g for v in groups.values() for g in v], **groups}.items():
        res[name] = mean(ghist.tl.evaluate(sdata, pred_key=pred_key, genes=genes))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--signals", default="all")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument(
        "--max-time",
        default=None,
        help="fit's time budget, DD:HH:MM:SS or HH:MM:SS (default: 00:10:00, or none when --max-steps is given)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="a step budget instead of time (load-independent; the README's 10 min are ~216 steps)",
    )
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument(
        "--context-neighbours", type=int, default=0, help="fit's neighbourhood context (k nearest cells; 0: none)"
    )
    parser.add_argument(
        "--output-activation", choices=["softplus", "relu"], default=None, help="see fit (default: fit's default)"
    )
    parser.add_argument(
        "--loss-weight",
        action="append",
        default=[],
        type=lambda text: (text.split("=")[0], float(text.split("=")[1])),
        metavar="TERM=WEIGHT",
        help="fit's loss_weights, e.g. --loss-weight expr_pearson=1 (repeatable)",
    )
    parser.add_argument("--morphometrics", action="store_true", help="see fit")
    parser.add_argument("--cell-offset", action="store_true", help="see fit")
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="fit without reference profiles (the expression head predicts genes)",
    )
    parser.add_argument("--no-readout", action="store_true", help="fit with readout=False")
    parser.add_argument("--progress", action="store_true", help="fit's progress bar (one line per step in a log)")
    parser.add_argument("--save-model", default=None, help="also save the fitted model into this directory")
    parser.add_argument("--load-model", default=None, help="score this saved model instead of fitting one")
    parser.add_argument("--no-fit", action="store_true", help="oracle and ridge only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.max_time is None and args.max_steps is None:
        args.max_time = "00:10:00"

    import torch

    torch.set_num_threads(args.threads)
    signals = args.signals.split(",") if "," in args.signals else args.signals
    sdata = ghist.datasets.synthetic(seed=args.seed, signals=signals, signal_strength=args.strength)
    table = sdata["table"]
    genes = list(table.var_names)
    record = table.uns["synthetic"]["signals"]
    groups = {name: list(rec["genes"]) for name, rec in record.items()}
    driven = [g for v in groups.values() for g in v]
    print(f"slide: seed {args.seed}, {table.n_obs} cells, {len(genes)} genes; signals {list(record)}; driven {driven}")

    with tempfile.TemporaryDirectory() as tmp:
        tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type", path=Path(tmp) / "tiles.zarr", progress=False)
        test_ids, train_ids = split_cells(tiles)
        print(f"tiles: {len(tiles)}; test cells {len(test_ids)}, training cells {len(train_ids)}")

        obs = table.obs.set_index("cell_id")
        types = obs["cell_type"].astype(str)
        expr = pd.DataFrame(np.log1p(table.X.toarray()), index=obs.index, columns=genes)
        means = expr.loc[train_ids].groupby(types.loc[train_ids].to_numpy()).mean()
        oracle = means.loc[types.loc[test_ids].to_numpy()].to_numpy()
        as_table(sdata, "oracle", test_ids, oracle, genes)
        results = {"oracle": score(sdata, "oracle", groups)}

        feats = image_features(sdata)
        ridge = oracle.copy()  # the other genes keep the oracle's values
        cols = [genes.index(g) for g in driven]
        for t in types.unique():
            tr, te = train_ids[types.loc[train_ids] == t], test_ids[types.loc[test_ids] == t]
            if len(tr) < 20 or not len(te):
                continue
            f_tr, f_te = feats.loc[tr].to_numpy(), feats.loc[te].to_numpy()
            mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-9
            y = expr.loc[tr, driven].to_numpy() - means.loc[t, driven].to_numpy()
            model = Ridge(alpha=10.0).fit((f_tr - mu) / sd, y)
            ridge[np.ix_(np.isin(test_ids, te), cols)] += model.predict((f_te - mu) / sd)
        as_table(sdata, "ridge", test_ids, np.clip(ridge, 0, None), genes)
        results["ridge"] = score(sdata, "ridge", groups)

        if args.load_model:
            model = ghist.GHISTModel.load(args.load_model)
        elif not args.no_fit:
            ref = (
                None
                if args.no_reference
                else ghist.pp.reference_profiles(ghist.datasets.synthetic_reference(), "cell_type")
            )
            start = time.perf_counter()
            model = ghist.tl.fit(
                tiles,
                reference=ref,
                width=args.width,
                max_time=args.max_time,
                max_steps=args.max_steps,
                context_neighbours=args.context_neighbours,
                **({"output_activation": args.output_activation} if args.output_activation else {}),
                loss_weights=dict(args.loss_weight) or None,
                **({"morphometrics": True} if args.morphometrics else {}),
                **({"cell_offset": True} if args.cell_offset else {}),
                **({"readout": False} if args.no_readout else {}),
                progress=args.progress,
            )
            fit_s = time.perf_counter() - start
            hist = model.history_
            print(f"fit: {fit_s:.0f} s, best epoch {model.best_epoch_}; history columns {list(hist.columns)}")
            print(hist.tail(3).to_string())
            if model.readout_:
                print("readout:", {k: v for k, v in model.readout_.items() if k != "penalty"})
            if args.save_model:
                model.save(args.save_model, overwrite=True)
        if args.load_model or not args.no_fit:

            def score_model(name: str, model) -> None:
                pred = ghist.tl.predict(sdata, model, key_added=f"{name}_all", progress=False)
                sdata.tables[f"{name}_test"] = pred[pred.obs["cell_id"].isin(test_ids)].copy()
                results[name] = score(sdata, f"{name}_test", groups)

            score_model("ghist", model)
            if model.network.readout is not None:
                with without_readout(model):
                    score_model("no_readout", model)

    print(f"load: {os.getloadavg()}")
    base = results["oracle"]
    for name, res in results.items():
        ratio_all, ratio_signal = res["all"] / base["all"], res["signal"] / base["signal"]
        print(
            f"{name:10s} cells {res['n_cells']:5d}  mean Pearson all genes {res['all']:.4f} (x{ratio_all:.3f})"
            f"  signal genes {res['signal']:.4f} (x{ratio_signal:.3f})"
        )
        print("           " + "  ".join(f"{g} {res[g]:.4f} (x{res[g] / base[g]:.3f})" for g in groups))


if __name__ == "__main__":
    main()
