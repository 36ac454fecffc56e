"""Spot-level training on HER2ST (legacy ST): GHIST trained on B4, C2, C3, evaluated on the held-out C4.

Example::

    python benchmarks/her2st.py --max-time 00:25:00 --width 16 --out her2st_run

For every section the H&E (about 9920 x 9280 px at 0.688 µm/px) is segmented with ``ghist.pp.segment_nuclei``
(watershed, full resolution; cached in ``--cache``), then put into a SpatialData at full resolution: the image and
the nuclei with their µm pixel size, the spots as 100 µm circles (``ShapesModel``) and their raw counts as a table
annotating them. ghist resamples to its working pixel size itself (``make_tiles(pixel_size=...)`` for training, the
model's pixel size in ``predict``): area mean for the image, nearest for the labels. The genes are the ``--n-genes``
most variable of the training sections' log-normalised spot counts (counts scaled to 1e4 per spot over all genes,
``log1p``; variance within each training section, averaged over them), among genes detected in at least 10% of the
training spots and measured in every section; the ``--n-eval-genes`` most variable of them are evaluated.

GHIST: ``ghist.pp.make_tiles(..., spots_key="spots", tiling="spots", pixel_size=--pixel-size)`` on B4, C2, C3 (one
tile centred on each spot, every tile trains: C4 is the test set; targets scaled per spot, ``--spot-scaling``),
``ghist.tl.fit`` for ``--max-time`` without cell types or reference, then on C4 ``ghist.tl.predict(...,
roi_key="spots")`` with tiles overlapping by just under half a tile (so that every nucleus is predicted from a tile
where it lies away from the edges, as the spot-centred training tiles put every supervised nucleus;
``--tile-overlap``) and the 8-view test-time augmentation (``--no-tta`` to turn off), and ``ghist.tl.evaluate(...,
spots_key="spots")``. The defaults (tiles at 2.75 µm/px, 4 times the scan's pixel size; 64-px tiles = 176 µm) were
chosen on the training sections' throughput and a GPU comparison at equal steps (64-px tiles at 2.75 µm/px scored as
128-px tiles at 1.38 µm/px, at 2.4 times the training steps per second on a CPU). ``--curve-every N`` also scores C4
every N epochs, after the timed run.

Baseline, measured in the same run: ridge regression (``sklearn.linear_model.RidgeCV``, one penalty per gene) from
hand-made features of each spot's disc of full-resolution pixels (RGB and ``rgb2hed`` stain statistics, grey-level
co-occurrence and local-binary-pattern texture, and nucleus count / size statistics from the same segmentation) to
the log-normalised counts, trained on the B4, C2, C3 spots.

Metric: per-gene Pearson correlation over the C4 spots between predicted and measured log-normalised expression,
averaged over the evaluated genes. GHIST's pseudo-spots (summed predicted counts of the nuclei in each spot) are
log-normalised like the measurements: scaled to 1e4 per spot over all genes, taking the panel's share of a spot's
counts as the median share in the training spots (``pearson``; ``ghist.tl.evaluate(..., spots_key="spots",
library="all", panel_share=<that share>)``); ``pearson_raw`` correlates ``log1p`` of the sums with the measurements,
without per-spot normalisation. Prints one line per phase with its run time, then LAST ``ghist_pearson=...
ridge_pearson=... seconds=...``. Writes to ``--out``: ``results.json`` (settings, per-gene correlations, timings),
``c4_spots.csv`` (measured and predicted spot expression of the evaluated genes), ``her2st_c4.png`` (per-gene
correlations of both methods and the best gene's maps) and the trained model."""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import spatialdata as sd
from lightning.pytorch.callbacks import Callback
from PIL import Image
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import ghist

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"
PIXEL_SIZE = 0.688  # µm per full-resolution pixel
SPOT_DIAMETER_UM = 100.0
TARGET_SUM = 1e4
MIN_DETECTED = 0.1  # genes detected in at least this fraction of the training spots


# ----------------------------------------------------------------------------------------------------------- data
def read_section(name: str, data: Path = DATA) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Full-resolution RGB ``(y, x, 3)``, the kept spots (pixel centres) and their raw counts (spots x genes)."""
    Image.MAX_IMAGE_PIXELS = None
    rgb = np.asarray(Image.open(data / name / "he.jpg").convert("RGB"))
    spots = pd.read_csv(data / name / "spots.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    counts = pd.read_csv(data / name / "counts.tsv.gz", sep="\t", index_col=0)
    counts = counts.loc[:, ~counts.columns.duplicated()]
    shared = spots.index.intersection(counts.index)
    return rgb, spots.loc[shared], counts.loc[shared]


def segment(name: str, rgb: np.ndarray, cache: Path) -> np.ndarray:
    """Full-resolution nucleus labels from ``ghist.pp.segment_nuclei`` (watershed), cached as a compressed file."""
    path = cache / f"{name}_nuclei.npz"
    if path.exists():
        return np.load(path)["labels"]
    image = Image2DModel.parse(
        np.moveaxis(rgb, -1, 0),
        dims=("c", "y", "x"),
        chunks=(3, 2048, 2048),
        transformations={"global": Identity(), "microns": Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("y", "x"))},
    )
    sdata = sd.SpatialData(images={"he": image})
    ghist.pp.segment_nuclei(sdata, progress=False)
    labels = np.asarray(sdata.labels["nuclei"].data.compute())
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, labels=labels)
    return labels


def build_sdata(rgb: np.ndarray, labels: np.ndarray, spots: pd.DataFrame, counts: pd.DataFrame):
    """SpatialData at full resolution: image and nuclei in µm, 100 µm spot circles, the spot count table."""
    microns = Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("y", "x"))
    transformations = {"global": Identity(), "microns": microns}
    image = Image2DModel.parse(
        np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), chunks=(3, 2048, 2048), transformations=transformations
    )
    nuclei = Labels2DModel.parse(labels, dims=("y", "x"), chunks=(2048, 2048), transformations=transformations)
    radius = SPOT_DIAMETER_UM / 2 / PIXEL_SIZE
    circles = ShapesModel.parse(
        spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64),
        geometry=0,
        radius=np.full(len(spots), radius),
        index=pd.RangeIndex(len(spots)),
        transformations={"global": Identity(), "microns": Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("x", "y"))},
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(spots)), "spot_id": np.arange(len(spots))}, index=spots.index
    )
    table = ad.AnnData(
        sp.csr_matrix(counts.to_numpy(dtype=np.float32)), obs=obs, var=pd.DataFrame(index=counts.columns)
    )
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    return sd.SpatialData(
        images={"he": image}, labels={"nuclei": nuclei}, shapes={"spots": circles}, tables={"spot_counts": table}
    )


def log_normalised(counts: pd.DataFrame) -> pd.DataFrame:
    """``log1p`` of the counts scaled to ``TARGET_SUM`` per spot (library size over all genes)."""
    library = counts.sum(axis=1).to_numpy(dtype=np.float64)
    return np.log1p(counts.div(np.maximum(library, 1), axis=0) * TARGET_SUM)


def choose_genes(train: dict[str, pd.DataFrame], genes_everywhere: pd.Index, n_genes: int) -> list[str]:
    """The most variable genes of the training spots' log-normalised counts, most variable first.

    Variance of the log-normalised counts within each training section, averaged over the sections (so that
    differences between sections do not count), among the genes detected in at least ``MIN_DETECTED`` of the
    training spots. Dispersion-based selection (scanpy's ``"seurat"`` flavour) was tried first and rejected
    before any GHIST result: on these sparse spots (B4: about 650 UMI per spot) it ranks low-count genes whose
    dispersion is sampling noise (USP14, PASK, XPO6, ...) above the tissue's variable genes (immunoglobulins,
    HLA, SCGB2A2, ERBB2, ...).
    """
    detected = (pd.concat([c[genes_everywhere] for c in train.values()]) > 0).mean(axis=0)
    candidates = genes_everywhere[detected.to_numpy() >= MIN_DETECTED]
    variance = np.mean([log_normalised(c)[candidates].var(axis=0).to_numpy() for c in train.values()], axis=0)
    return list(candidates[np.argsort(-variance, kind="stable")[:n_genes]])


# ----------------------------------------------------------------------------------------------------------- ridge
def spot_features(rgb: np.ndarray, labels: np.ndarray, spots: pd.DataFrame) -> np.ndarray:
    """Hand-made features of each spot's disc of full-resolution pixels (colour, stain, texture, nuclei)."""
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    radius = SPOT_DIAMETER_UM / 2 / PIXEL_SIZE
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = yy**2 + xx**2 <= radius**2
    area = np.bincount(labels.ravel()) if labels.max() < 2**26 else None
    rows = []
    for cx, cy in spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64):
        x0, y0 = round(cx) - r, round(cy) - r
        crop = np.full((2 * r + 1, 2 * r + 1, 3), 255, dtype=np.uint8)
        lab = np.zeros((2 * r + 1, 2 * r + 1), dtype=labels.dtype)
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + 2 * r + 1, rgb.shape[0]), min(x0 + 2 * r + 1, rgb.shape[1])
        crop[ys - y0 : ye - y0, xs - x0 : xe - x0] = rgb[ys:ye, xs:xe]
        lab[ys - y0 : ye - y0, xs - x0 : xe - x0] = labels[ys:ye, xs:xe]
        pixels = crop[disc].astype(np.float64)
        hed = rgb2hed(crop)[disc]
        feats = [pixels.mean(0), pixels.std(0), hed.mean(0), hed.std(0)]
        feats += [np.percentile(hed, q, axis=0) for q in (10, 50, 90)]
        gray = (crop.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
        glcm = graycomatrix(gray // 8, distances=[1, 3], angles=[0, np.pi / 2], levels=32, symmetric=True, normed=True)
        for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation"):
            feats.append(graycoprops(glcm, prop).mean(axis=1))
        lbp = local_binary_pattern(gray, P=8, R=1, method="uniform")[disc]
        feats.append(np.bincount(lbp.astype(np.int64), minlength=10)[:10] / disc.sum())
        # nuclei: those whose pixels mostly lie in the disc
        inside = lab[disc]
        ids, n_in = np.unique(inside[inside > 0], return_counts=True)
        if area is not None and ids.size:
            keep = n_in >= 0.5 * area[ids]
            sizes = area[ids[keep]] * PIXEL_SIZE**2
        else:
            sizes = np.zeros(0)
        h_nuc = hed[:, 0][inside > 0]
        nucleus = [
            sizes.size,
            sizes.mean() if sizes.size else 0.0,
            sizes.std() if sizes.size else 0.0,
            np.median(sizes) if sizes.size else 0.0,
            (inside > 0).mean(),
            h_nuc.mean() if h_nuc.size else 0.0,
        ]
        feats.append(np.asarray(nucleus, dtype=np.float64))
        rows.append(np.concatenate([np.ravel(f) for f in feats]))
    return np.vstack(rows)


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 29), alpha_per_target=True))
    model.fit(x_train, y_train)
    return model.predict(x_test)


# ----------------------------------------------------------------------------------------------------------- GHIST
def evaluate_on_spots(
    model: ghist.GHISTModel,
    test: sd.SpatialData,
    truth: pd.DataFrame,
    train_counts: pd.DataFrame,
    genes: list[str],
    eval_genes: list[str],
    **predict_kwargs,
) -> dict:
    """Predict every nucleus of ``test``, sum them per spot and correlate with the measured spots, gene by gene.

    GHIST's pseudo-spots are log-normalised like the measurements: scaled to ``TARGET_SUM`` per spot over all
    genes, taking the panel's share of a spot's counts as its median share in the training spots. Returns the
    per-gene correlations ``r`` (that normalisation), ``r_raw`` (``log1p`` of the sums), ``r_cells`` (the
    number of nuclei alone), the normalised predictions ``pred`` and the number of predicted cells.
    ``predict_kwargs`` go to :func:`ghist.tl.predict` (e.g. ``tile_overlap``, ``tta``, ``accelerator``).
    """
    ghist.tl.predict(test, model, roi_key="spots", progress=False, overwrite=True, **predict_kwargs)
    panel_share = float(np.median(train_counts[genes].sum(axis=1) / np.maximum(train_counts.sum(axis=1), 1)))
    if "ghist_spots" in test.tables:  # written by the previous call (learning curve)
        del test.tables["ghist_spots"]
    scores = ghist.tl.evaluate(
        test,
        pred_key="ghist",
        true_key="spot_counts",
        spots_key="spots",
        genes=eval_genes,
        target_sum=TARGET_SUM,
        library="all",
        panel_share=panel_share,
        key_added="ghist_spots",
    )
    pseudo = test.tables["ghist_spots"]
    pred = pseudo[truth.index, eval_genes].to_df(layer="log_normalised").astype(np.float64)
    sums = pseudo[truth.index, eval_genes].to_df().astype(np.float64)
    n_cells = pd.Series(np.log1p(pseudo.obs["n_cells"].to_numpy(dtype=float)), index=pseudo.obs_names)
    return {
        "r": scores["pearson"].reindex(eval_genes),
        "r_raw": np.log1p(sums).corrwith(truth),
        "r_cells": truth.corrwith(n_cells.reindex(truth.index)).to_numpy(),
        "pred": pred,
        "n_cells": int(test.tables["ghist"].n_obs),
    }


class WeightSnapshots(Callback):
    """Keeps a copy of the network's weights every ``every`` epochs, to be scored after the timed run."""

    def __init__(self, every: int):
        self.every = every
        self.snapshots: list[tuple[int, dict]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % self.every == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in pl_module.network.state_dict().items()}
            self.snapshots.append((trainer.current_epoch + 1, state))


def learning_curve(model: ghist.GHISTModel, snapshots, score) -> list[dict]:
    """``score(model)`` for the model holding each snapshot's weights, in order (the model is restored after)."""
    final = {k: v.clone() for k, v in model.network.state_dict().items()}
    curve = []
    for epoch, state in snapshots:
        model.network.load_state_dict(state)
        curve.append({"epoch": epoch, "pearson": score(model)})
        print(f"curve epoch={epoch} ghist_pearson={curve[-1]['pearson']:.4f}", flush=True)
    model.network.load_state_dict(final)
    return curve


# ----------------------------------------------------------------------------------------------------------- plot
def plot(path: Path, r_ghist: pd.Series, r_ridge: pd.Series, spots: pd.DataFrame, true: pd.DataFrame, pred):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = r_ghist.idxmax()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    ax = axes[0]
    ax.scatter(r_ridge, r_ghist, s=14)
    lo = float(np.nanmin([r_ridge.min(), r_ghist.min(), 0.0])) - 0.05
    hi = float(np.nanmax([r_ridge.max(), r_ghist.max()])) + 0.05
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set(xlabel="ridge on patch features (Pearson r)", ylabel="GHIST, spot-trained (Pearson r)")
    ax.set_title(f"C4, {len(r_ghist)} genes: GHIST {r_ghist.mean():.3f} vs ridge {r_ridge.mean():.3f}")
    x, y = spots["pixel_x"].to_numpy(), spots["pixel_y"].to_numpy()
    for ax, values, title in ((axes[1], true[best], "measured"), (axes[2], pred[best], "GHIST (summed cells)")):
        im = ax.scatter(x, y, c=values, s=40, cmap="viridis")
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_axis_off()
        ax.set_title(f"{best} {title} (log-normalised)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", default=["B4", "C2", "C3"])
    parser.add_argument("--test", default="C4")
    parser.add_argument("--max-time", default="00:25:00", help="GHIST training budget, HH:MM:SS")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="budget in optimisation steps instead (load-independent)"
    )
    parser.add_argument("--width", type=int, default=16, help="channels of the first backbone level")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pixel-size", type=float, default=2.75, help="GHIST's working pixel size, µm")
    parser.add_argument("--tile-size", type=int, default=64, help="tile side in pixels of --pixel-size")
    parser.add_argument(
        "--tile-overlap", type=int, default=None, help="predict's tile overlap (default: just under half a tile)"
    )
    parser.add_argument("--no-tta", action="store_true", help="predict without test-time augmentation")
    parser.add_argument("--spot-scaling", choices=["spot", "sample"], default="spot", help="see make_tiles")
    parser.add_argument("--color-jitter", type=float, default=0.0, help="see fit")
    parser.add_argument(
        "--min-train-umi", type=int, default=0, help="QC: leave training spots with fewer counts out of training"
    )
    parser.add_argument("--n-genes", type=int, default=250)
    parser.add_argument("--n-eval-genes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("her2st_out"))
    parser.add_argument("--data", type=Path, default=DATA, help="folder with one sub-folder per section")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for training")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ghist_her2st_cache"), help="segmentations")
    parser.add_argument(
        "--curve-every", type=int, default=0, help="also score C4 every N epochs, after the timed run (0: off)"
    )
    parser.add_argument("--baseline-only", action="store_true", help="stop after the ridge baseline")
    args = parser.parse_args()
    logging.getLogger("ghist").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    sections = [*args.train, args.test]
    sdatas, counts, spots, features, all_counts = {}, {}, {}, {}, {}
    for name in sections:
        t0 = time.perf_counter()
        rgb, spots[name], counts[name] = read_section(name, args.data)
        all_counts[name] = counts[name]
        if name in args.train and args.min_train_umi > 0:  # QC of the training spots (both methods)
            keep = counts[name].sum(axis=1).to_numpy() >= args.min_train_umi
            spots[name], counts[name] = spots[name][keep], counts[name][keep]
        labels = segment(name, rgb, args.cache)
        t1 = time.perf_counter()
        features[name] = spot_features(rgb, labels, spots[name])
        t2 = time.perf_counter()
        sdatas[name] = build_sdata(rgb, labels, spots[name], counts[name])
        del rgb, labels
        timings[f"segment_{name}"] = t1 - t0
        timings[f"features_{name}"] = t2 - t1
        print(
            f"section={name} spots={len(spots[name])} genes={counts[name].shape[1]} "
            f"median_umi={np.median(counts[name].sum(axis=1)):.0f} segment_s={t1 - t0:.1f} features_s={t2 - t1:.1f}",
            flush=True,
        )

    everywhere = counts[sections[0]].columns
    for name in sections[1:]:
        everywhere = everywhere.intersection(counts[name].columns)
    # on all training spots, so that the evaluated genes do not depend on --min-train-umi
    genes = choose_genes({n: all_counts[n] for n in args.train}, everywhere, args.n_genes)
    eval_genes = genes[: args.n_eval_genes]
    print(f"genes={len(genes)} eval_genes={len(eval_genes)} first={eval_genes[:8]}", flush=True)

    # ---- baseline: ridge on patch features
    t0 = time.perf_counter()
    x_train = np.vstack([features[n] for n in args.train])
    y_train = np.vstack([log_normalised(counts[n])[eval_genes].to_numpy() for n in args.train])
    truth = log_normalised(counts[args.test])[eval_genes]
    ridge = pd.DataFrame(ridge_predict(x_train, y_train, features[args.test]), index=truth.index, columns=eval_genes)
    r_ridge = ridge.corrwith(truth)
    timings["ridge"] = time.perf_counter() - t0
    print(f"ridge_pearson={np.nanmean(r_ridge):.4f} features={x_train.shape[1]} seconds={timings['ridge']:.1f}")
    if args.baseline_only:
        return

    # ---- GHIST: spot-level training
    t0 = time.perf_counter()
    tiles_path = args.out / "tiles.zarr"
    if tiles_path.exists():
        import shutil

        shutil.rmtree(tiles_path)
    tiles = ghist.pp.make_tiles(
        {n: sdatas[n] for n in args.train},
        spots_key="spots",
        table_key="spot_counts",
        genes=genes,
        tiling="spots",
        tile_size=args.tile_size,
        pixel_size=args.pixel_size,
        fold=None,
        path=tiles_path,
        spot_scaling=args.spot_scaling,
        progress=False,
    )
    timings["make_tiles"] = time.perf_counter() - t0
    print(f"tiles={len(tiles)} cells={tiles.n_cells} make_tiles_s={timings['make_tiles']:.1f}", flush=True)

    snapshots = WeightSnapshots(args.curve_every) if args.curve_every > 0 else None
    t0 = time.perf_counter()
    model = ghist.tl.fit(
        tiles,
        width=args.width,
        embed_dim=args.embed_dim,
        max_epochs=100_000,
        max_steps=args.max_steps if args.max_steps is not None else 10**9,
        max_time=args.max_time,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=False,
        checkpoint_dir=args.out / "checkpoints",
        num_workers=args.num_workers,
        color_jitter=args.color_jitter,
        callbacks=[snapshots] if snapshots is not None else None,
    )
    timings["fit"] = time.perf_counter() - t0
    history = model.history_
    spot_loss = history["train/spot"].to_numpy() if "train/spot" in history else np.array([np.nan])
    print(
        f"fit_s={timings['fit']:.1f} epochs={len(history)} steps={int(history['step'].max())} "
        f"spot_loss_first={spot_loss[0]:.3f} spot_loss_last={spot_loss[-1]:.3f}",
        flush=True,
    )
    model.save(args.out / "model", overwrite=True)

    t0 = time.perf_counter()
    test = sdatas[args.test]
    train_counts = pd.concat([counts[n] for n in args.train])
    overlap = args.tile_size // 2 - 1 if args.tile_overlap is None else args.tile_overlap
    predict_kwargs = {"tile_overlap": overlap, "tta": not args.no_tta}
    scores = evaluate_on_spots(model, test, truth, train_counts, genes, eval_genes, **predict_kwargs)
    timings["predict"] = time.perf_counter() - t0
    r_ghist, r_raw, r_cells, pred = scores["r"], scores["r_raw"], scores["r_cells"], scores["pred"]
    total = time.perf_counter() - start
    print(
        f"predict_s={timings['predict']:.1f} cells_predicted={scores['n_cells']} "
        f"ghist_pearson_raw={np.nanmean(r_raw):.4f} n_cells_only_pearson={np.nanmean(r_cells):.4f}",
        flush=True,
    )

    table = pd.concat({"measured": truth, "ghist": pred, "ridge": ridge}, axis=1)
    table.to_csv(args.out / "c4_spots.csv")
    plot(args.out / "her2st_c4.png", r_ghist, r_ridge, spots[args.test].loc[truth.index], truth, pred)
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "genes": genes,
        "eval_genes": eval_genes,
        "ghist_pearson": float(np.nanmean(r_ghist)),
        "ghist_pearson_raw": float(np.nanmean(r_raw)),
        "ridge_pearson": float(np.nanmean(r_ridge)),
        "n_cells_only_pearson": float(np.nanmean(r_cells)),
        "per_gene": pd.DataFrame({"ghist": r_ghist, "ghist_raw": r_raw, "ridge": r_ridge}).to_dict(orient="index"),
        "epochs": len(history),
        "history": history.to_dict(orient="list"),
        "timings_s": timings,
        "total_s": total,
    }
    if snapshots is not None:  # outside the timed run

        def score(m):
            scores = evaluate_on_spots(m, test, truth, train_counts, genes, eval_genes, **predict_kwargs)
            return float(np.nanmean(scores["r"]))

        results["curve"] = learning_curve(model, snapshots.snapshots, score)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(
        f"ghist_pearson={np.nanmean(r_ghist):.4f} ridge_pearson={np.nanmean(r_ridge):.4f} "
        f"genes={len(eval_genes)} test={args.test} seconds={total:.1f}"
    )


if __name__ == "__main__":
    main()
