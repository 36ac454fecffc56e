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
correlations of both methods and the best gene's maps) and the trained model.

Uncertainty: on the held-out spots, the coverage of the nominal 90% interval of each spot's predicted ``log1p`` sum
(its ``ghist_std`` from ``ghist.tl.aggregate_to_spots``) around the measured counts scaled as training targets are,
and Spearman's rho between a spot's mean std and its mean absolute error (``calibration`` in ``results.json``; see
``spot_calibration``). ``--rescore`` scores the models a previous run saved in ``--out`` again instead of training
(``rescore.json``; with ``--cv`` also ``cv_rescore.json``); with ``--final-model`` it then trains the shipped model
from those folds, without training them again. ``--resume`` (with ``--cv``) rescores the folds whose model a stopped run
saved and trains only the others."""

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


def spot_calibration(test: sd.SpatialData, spot_scaling: str) -> dict:
    """Calibration of the predicted spread on the held-out spots, on the scale the model was trained on.

    ``ghist.tl.aggregate_to_spots`` sums the predicted nuclei of each spot and carries their ``ghist_std`` to the sum
    (delta method); the measured spots are scaled as ``make_tiles`` scales training targets (1e4 times the spot's
    nuclei over the median, per spot; or one factor per section). Reports the coverage of ``log1p`` sum ``+- 1.645 *
    std`` (nominal 90%) over all spots x genes, its range over genes, the same with the measured spots' own
    counting noise added (Poisson at the section's depth: the head learnt the training spots' spread, at their
    depth), and Spearman's rho between a spot's mean std and its mean absolute error over genes (do wider intervals
    mark worse spots?).
    """
    from scipy.stats import spearmanr

    pseudo = ghist.tl.aggregate_to_spots(
        test, spots_key="spots", spots_table_key="spot_counts", key_added="ghist_spots_std", overwrite=True
    )
    measured = test.tables["spot_counts"][pseudo.obs_names]
    counts = measured.X.toarray() if sp.issparse(measured.X) else np.asarray(measured.X)
    library = counts.sum(axis=1).astype(np.float64)
    n_cells = pseudo.obs["n_cells"].to_numpy(dtype=np.float64)
    keep = (library > 0) & (n_cells > 0)
    if spot_scaling == "spot":
        factor = TARGET_SUM * n_cells / np.median(n_cells[keep]) / np.maximum(library, 1)
    else:
        factor = np.full(library.size, TARGET_SUM / np.median(library[library > 0]))
    genes = list(pseudo.var_names)
    column = pd.Index(measured.var_names).get_indexer(genes)
    target = np.log1p(counts[:, column] * factor[:, None])[keep]
    mean = np.log1p(np.asarray(pseudo.X, dtype=np.float64))[keep]
    std = np.asarray(pseudo.layers["ghist_std"], dtype=np.float64)[keep]
    error = np.abs(target - mean)
    inside = error <= 1.645 * std
    per_gene = inside.mean(axis=0)
    # Counting noise of the measured spot at its own depth: Poisson counts times the scaling factor f have variance
    # f * S on the target scale, f * S / (1 + S)^2 on log1p's (delta method). A shallow section's spots are far
    # noisier than the training spots the head learnt its spread on.
    sums = np.expm1(mean)
    counting = factor[keep, None] * sums / (1 + sums) ** 2
    total = np.sqrt(std**2 + counting)
    inside_total = error <= 1.645 * total
    return {
        "coverage_90": float(inside.mean()),
        "coverage_90_with_counting_noise": float(inside_total.mean()),
        "median_scaling_factor": float(np.median(factor[keep])),
        "coverage_90_gene_min": float(per_gene.min()),
        "coverage_90_gene_median": float(np.median(per_gene)),
        "coverage_90_gene_max": float(per_gene.max()),
        "spearman_spot_std_vs_error": float(spearmanr(std.mean(axis=1), error.mean(axis=1)).statistic),
        "spearman_spot_total_std_vs_error": float(spearmanr(total.mean(axis=1), error.mean(axis=1)).statistic),
        "spots": int(keep.sum()),
        "genes": len(genes),
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
def plot(path: Path, r_ghist: pd.Series, r_ridge: pd.Series, spots: pd.DataFrame, true: pd.DataFrame, pred, test: str):
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
    ax.set_title(f"{test}, {len(r_ghist)} genes: GHIST {r_ghist.mean():.3f} vs ridge {r_ridge.mean():.3f}")
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
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", default=["B4", "C2", "C3"])
    parser.add_argument("--test", default="C4")
    parser.add_argument(
        "--cv",
        action="store_true",
        help="leave-one-section-out over --sections instead of --train/--test (one fold per held-out section)",
    )
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4"], help="the sections of --cv")
    parser.add_argument(
        "--max-time",
        default=None,
        help="GHIST training budget, HH:MM:SS, per fold (default: 00:25:00, or none when --max-steps is given)",
    )
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
        "--stain-jitter",
        type=float,
        default=0.05,
        help="HED-space stain augmentation, see fit (0.05 raised the CV mean from 0.295 to 0.298; 0: off)",
    )
    parser.add_argument(
        "--context-neighbours", type=int, default=0, help="fit's neighbourhood context (k nearest cells; 0: none)"
    )
    parser.add_argument(
        "--output-activation", choices=["softplus", "relu"], default=None, help="see fit (default: fit's default)"
    )
    parser.add_argument(
        "--min-train-umi", type=int, default=0, help="QC: leave training spots with fewer counts out of training"
    )
    parser.add_argument("--n-genes", type=int, default=250)
    parser.add_argument("--n-eval-genes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("her2st_out"))
    parser.add_argument("--data", type=Path, default=DATA, help="folder with one sub-folder per section")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for training")
    parser.add_argument(
        "--cache", type=Path, default=Path("/tmp/ghist_her2st_cache"), help="segmentations and ridge features"
    )
    parser.add_argument(
        "--curve-every", type=int, default=0, help="also score the test section every N epochs, after the timed run"
    )
    parser.add_argument("--baseline-only", action="store_true", help="stop after the ridge baseline")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the models a previous run saved in --out (fold_<section>/model with --cv) instead of training",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --cv: score the folds whose model a previous (stopped) run saved, train only the others",
    )
    parser.add_argument(
        "--final-model",
        type=Path,
        default=None,
        help="with --cv: then train on all --sections (same settings, same epochs) and write the model with its card "
        "here (as ghist ships it: float16 weights); with --rescore, from the folds a previous run saved",
    )
    args = parser.parse_args(argv)
    if args.max_time is None and args.max_steps is None:
        args.max_time = "00:25:00"
    # else a step budget alone: a busy machine must not cut some folds short of it (the comparison is per step)
    return args


def load_sections(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Per section: its SpatialData, kept spots, counts (after --min-train-umi), all counts and ridge features."""
    sections = {}
    for name in names:
        t0 = time.perf_counter()
        rgb, spots, counts = read_section(name, args.data)
        labels = segment(name, rgb, args.cache)
        t1 = time.perf_counter()
        features = spot_features_cached(name, rgb, labels, spots, args.cache)
        t2 = time.perf_counter()
        sections[name] = {
            "rgb": rgb,
            "labels": labels,
            "spots": spots,
            "counts": counts,
            "features": features,
            "timings": {"segment": t1 - t0, "features": t2 - t1},
        }
        print(
            f"section={name} spots={len(spots)} genes={counts.shape[1]} median_umi={np.median(counts.sum(axis=1)):.0f} "
            f"segment_s={t1 - t0:.1f} features_s={t2 - t1:.1f}",
            flush=True,
        )
    return sections


def genes_measured_in(sections: dict[str, dict], names: list[str]) -> pd.Index:
    """The genes every one of ``names`` measured (in the first section's order)."""
    genes = sections[names[0]]["counts"].columns
    for name in names[1:]:
        genes = genes.intersection(sections[name]["counts"].columns)
    return genes


def spot_features_cached(name: str, rgb: np.ndarray, labels: np.ndarray, spots: pd.DataFrame, cache: Path):
    """:func:`spot_features` of all of a section's spots, cached next to its segmentation."""
    path = cache / f"{name}_ridge_features.npz"
    if path.exists():
        stored = np.load(path, allow_pickle=False)
        if list(stored["spots"]) == list(spots.index):
            return stored["features"]
    features = spot_features(rgb, labels, spots)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, features=features, spots=np.asarray(spots.index, dtype=str))
    return features


def spot_tiles(sdatas: dict[str, sd.SpatialData], genes: list[str], args: argparse.Namespace, path: Path):
    """``make_tiles`` of the benchmark: one tile centred on each spot, at ``--pixel-size``."""
    return ghist.pp.make_tiles(
        sdatas,
        spots_key="spots",
        table_key="spot_counts",
        genes=genes,
        tiling="spots",
        tile_size=args.tile_size,
        pixel_size=args.pixel_size,
        fold=None,
        path=path,
        spot_scaling=args.spot_scaling,
        progress=False,
    )


def fit_spots(tiles, args: argparse.Namespace, checkpoints: Path, max_steps: int | None, callbacks=None):
    """``fit`` of the benchmark, with its settings and the given step budget (None: ``--max-time`` alone)."""
    return ghist.tl.fit(
        tiles,
        width=args.width,
        embed_dim=args.embed_dim,
        max_epochs=100_000,
        max_steps=max_steps if max_steps is not None else 10**9,
        max_time=args.max_time,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=False,
        checkpoint_dir=checkpoints,
        num_workers=args.num_workers,
        color_jitter=args.color_jitter,
        **({"stain_jitter": args.stain_jitter} if args.stain_jitter else {}),
        **({"context_neighbours": args.context_neighbours} if args.context_neighbours else {}),
        **({"output_activation": args.output_activation} if args.output_activation else {}),
        callbacks=callbacks,
    )


def run_split(sections: dict[str, dict], train: list[str], test: str, args: argparse.Namespace, out: Path) -> dict:
    """Ridge and GHIST trained on ``train``, scored on ``test``; writes its files to ``out`` and returns the scores."""
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    spots, counts, features, sdatas = {}, {}, {}, {}
    for name in [*train, test]:
        section = sections[name]
        keep = np.ones(len(section["spots"]), dtype=bool)
        if name in train and args.min_train_umi > 0:  # QC of the training spots (both methods)
            keep = section["counts"].sum(axis=1).to_numpy() >= args.min_train_umi
        spots[name], counts[name] = section["spots"][keep], section["counts"][keep]
        features[name] = section["features"][keep]
        sdatas[name] = build_sdata(section["rgb"], section["labels"], spots[name], counts[name])

    everywhere = genes_measured_in(sections, [test, *train])
    # on all training spots, so that the evaluated genes do not depend on --min-train-umi
    genes = choose_genes({n: sections[n]["counts"] for n in train}, everywhere, args.n_genes)
    eval_genes = genes[: args.n_eval_genes]
    print(f"test={test} genes={len(genes)} eval_genes={len(eval_genes)} first={eval_genes[:8]}", flush=True)

    # ---- baseline: ridge on patch features
    t0 = time.perf_counter()
    x_train = np.vstack([features[n] for n in train])
    y_train = np.vstack([log_normalised(counts[n])[eval_genes].to_numpy() for n in train])
    truth = log_normalised(counts[test])[eval_genes]
    ridge = pd.DataFrame(ridge_predict(x_train, y_train, features[test]), index=truth.index, columns=eval_genes)
    r_ridge = ridge.corrwith(truth)
    timings["ridge"] = time.perf_counter() - t0
    print(f"ridge_pearson={np.nanmean(r_ridge):.4f} features={x_train.shape[1]} seconds={timings['ridge']:.1f}")
    if args.baseline_only:
        return {"test": test, "ridge_pearson": float(np.nanmean(r_ridge))}

    # ---- GHIST: spot-level training
    t0 = time.perf_counter()
    tiles_path = out / "tiles.zarr"
    if tiles_path.exists():
        import shutil

        shutil.rmtree(tiles_path)
    tiles = spot_tiles({n: sdatas[n] for n in train}, genes, args, tiles_path)
    timings["make_tiles"] = time.perf_counter() - t0
    print(f"tiles={len(tiles)} cells={tiles.n_cells} make_tiles_s={timings['make_tiles']:.1f}", flush=True)

    snapshots = WeightSnapshots(args.curve_every) if args.curve_every > 0 else None
    t0 = time.perf_counter()
    callbacks = [snapshots] if snapshots is not None else None
    reuse = args.rescore or (args.resume and (out / "model" / "model.json").exists())
    if reuse:
        model = ghist.GHISTModel.load(out / "model")
    else:
        model = fit_spots(tiles, args, out / "checkpoints", args.max_steps, callbacks)
    timings["fit"] = time.perf_counter() - t0
    history = model.history_
    spot_loss = history["train/spot"].to_numpy() if "train/spot" in history else np.array([np.nan])
    print(
        f"fit_s={timings['fit']:.1f} epochs={len(history)} steps={int(history['step'].max())} "
        f"spot_loss_first={spot_loss[0]:.3f} spot_loss_last={spot_loss[-1]:.3f}",
        flush=True,
    )
    if not reuse:
        model.save(out / "model", overwrite=True)

    t0 = time.perf_counter()
    test_sdata = sdatas[test]
    train_counts = pd.concat([counts[n] for n in train])
    overlap = args.tile_size // 2 - 1 if args.tile_overlap is None else args.tile_overlap
    predict_kwargs = {"tile_overlap": overlap, "tta": not args.no_tta}
    scores = evaluate_on_spots(model, test_sdata, truth, train_counts, genes, eval_genes, **predict_kwargs)
    timings["predict"] = time.perf_counter() - t0
    r_ghist, r_raw, r_cells, pred = scores["r"], scores["r_raw"], scores["r_cells"], scores["pred"]
    calibration = spot_calibration(test_sdata, args.spot_scaling)
    print("calibration " + " ".join(f"{k}={v:.3f}" for k, v in calibration.items()), flush=True)
    print(
        f"predict_s={timings['predict']:.1f} cells_predicted={scores['n_cells']} "
        f"ghist_pearson_raw={np.nanmean(r_raw):.4f} n_cells_only_pearson={np.nanmean(r_cells):.4f}",
        flush=True,
    )

    table = pd.concat({"measured": truth, "ghist": pred, "ridge": ridge}, axis=1)
    table.to_csv(out / f"{test.lower()}_spots.csv")
    plot(out / f"her2st_{test.lower()}.png", r_ghist, r_ridge, spots[test].loc[truth.index], truth, pred, test)
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train": train,
        "test": test,
        "genes": genes,
        "eval_genes": eval_genes,
        "ghist_pearson": float(np.nanmean(r_ghist)),
        "ghist_pearson_raw": float(np.nanmean(r_raw)),
        "ridge_pearson": float(np.nanmean(r_ridge)),
        "n_cells_only_pearson": float(np.nanmean(r_cells)),
        "calibration": calibration,
        "per_gene": pd.DataFrame({"ghist": r_ghist, "ghist_raw": r_raw, "ridge": r_ridge}).to_dict(orient="index"),
        "epochs": len(history),
        "steps": int(history["step"].max()),
        "model_reused": bool(reuse),
        "history": history.to_dict(orient="list"),
        "timings_s": timings,
    }
    if snapshots is not None:  # outside the timed run

        def score(m):
            scores = evaluate_on_spots(m, test_sdata, truth, train_counts, genes, eval_genes, **predict_kwargs)
            return float(np.nanmean(scores["r"]))

        results["curve"] = learning_curve(model, snapshots.snapshots, score)
    results["total_s"] = time.perf_counter() - start
    (out / ("rescore.json" if args.rescore else "results.json")).write_text(
        json.dumps(results, indent=1, default=float)
    )
    print(
        f"ghist_pearson={results['ghist_pearson']:.4f} ridge_pearson={results['ridge_pearson']:.4f} "
        f"genes={len(eval_genes)} test={test} seconds={results['total_s']:.1f}",
        flush=True,
    )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("ghist").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.cv:
        sections = load_sections([*args.train, args.test], args)
        result = run_split(sections, args.train, args.test, args, args.out)
        print(
            f"LAST ghist_pearson={result.get('ghist_pearson', float('nan')):.4f} "
            f"ridge_pearson={result['ridge_pearson']:.4f} test={args.test} seconds={time.perf_counter() - start:.1f}"
        )
        return

    sections = load_sections(args.sections, args)
    folds = []
    for test in args.sections:
        train = [n for n in args.sections if n != test]
        folds.append(run_split(sections, train, test, args, args.out / f"fold_{test}"))
    table = pd.DataFrame(
        {
            "ghist": [f.get("ghist_pearson", np.nan) for f in folds],
            "ridge": [f["ridge_pearson"] for f in folds],
        },
        index=pd.Index(args.sections, name="held_out"),
    )
    table["ghist_minus_ridge"] = table["ghist"] - table["ridge"]
    if all("calibration" in f for f in folds):
        for key in (
            "coverage_90",
            "coverage_90_with_counting_noise",
            "spearman_spot_std_vs_error",
            "spearman_spot_total_std_vs_error",
        ):
            table[key] = [f["calibration"][key] for f in folds]
    print(table.round(4).to_string())
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "folds": table.to_dict(orient="index"),
        "ghist_mean": float(table["ghist"].mean()),
        "ridge_mean": float(table["ridge"].mean()),
        "ghist_beats_ridge_on_every_fold": bool((table["ghist_minus_ridge"] > 0).all()),
        "total_s": time.perf_counter() - start,
    }
    (args.out / ("cv_rescore.json" if args.rescore else "cv.json")).write_text(
        json.dumps(summary, indent=1, default=float)
    )
    print(
        f"LAST cv ghist_mean={summary['ghist_mean']:.4f} ridge_mean={summary['ridge_mean']:.4f} "
        f"folds={len(folds)} seconds={summary['total_s']:.1f}",
        flush=True,
    )
    if args.final_model is not None:
        train_final_model(sections, folds, table, args)


def train_final_model(sections: dict[str, dict], folds: list[dict], cv: pd.DataFrame, args: argparse.Namespace):
    """The model ghist ships: all sections, the CV's settings and epochs, float16 weights, and its card."""
    import tempfile

    names = list(sections)
    genes = choose_genes({n: sections[n]["counts"] for n in names}, genes_measured_in(sections, names), args.n_genes)
    sdatas = {n: build_sdata(s["rgb"], s["labels"], s["spots"], s["counts"]) for n, s in sections.items()}
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        tiles = spot_tiles(sdatas, genes, args, Path(folder) / "tiles.zarr")
        # the same number of epochs as each fold: the steps grow with the training spots
        fold_spots = np.mean([sum(len(sections[n]["spots"]) for n in f["train"]) for f in folds])
        steps = None if args.max_steps is None else round(args.max_steps * len(tiles) / fold_spots)
        t0 = time.perf_counter()
        model = fit_spots(tiles, args, Path(folder) / "checkpoints", steps)
        fit_s = time.perf_counter() - t0
    # float16 weights keep the package small; loading casts them back to the network's float32
    model.network.half()
    model.save(args.final_model, overwrite=True)
    model.network.float()
    steps_done = int(model.history_["step"].max())
    card = model_card(args, cv, genes, sections, steps_done, fit_s)
    (args.final_model / "CARD.md").write_text(card, encoding="utf-8")
    print(f"final_model={args.final_model} tiles={len(tiles)} steps={steps_done} fit_s={fit_s:.0f}", flush=True)


def model_card(args, cv: pd.DataFrame, genes: list[str], sections: dict, steps: int, fit_s: float) -> str:
    """The bundled model's card (Markdown)."""
    rows = "\n".join(
        f"| {name} | {r.ghist:.3f} | {r.ridge:.3f} | {r.ghist_minus_ridge:+.3f} |" for name, r in cv.iterrows()
    )
    n_spots = sum(len(s["spots"]) for s in sections.values())
    overlap = args.tile_size // 2 - 1 if args.tile_overlap is None else args.tile_overlap
    calibration = ""
    if "coverage_90" in cv:
        per_fold = "; ".join(
            f"{name} {r.coverage_90:.2f}, {r.coverage_90_with_counting_noise:.2f} "
            f"(rho {r.spearman_spot_total_std_vs_error:.2f})"
            for name, r in cv.iterrows()
        )
        calibration = (
            '\nUncertainty (`layers["ghist_std"]`, carried to spots by `ghist.tl.aggregate_to_spots`): the fraction of '
            f"the held-out spots' measured values (scaled as training targets, all {len(genes)} genes) inside the "
            "predicted sum's nominal 90% interval; then the same with the measured spot's own counting noise (Poisson "
            "at its section's depth) added to the interval, and Spearman's rho between a spot's mean spread (with "
            f"that noise) and its mean absolute error: {per_fold}. The model's spread was learnt on the training "
            "spots, at their depth: for measurements of another depth, add their counting noise.\n"
        )
    return f"""# her2st-breast-spots

A GHIST network trained on spot-level spatial transcriptomics of HER2-positive breast cancer, predicting {len(genes)}
genes for every segmented nucleus of an H&E image. Written by `benchmarks/her2st.py --cv --final-model` (ghist
{ghist.__version__}); this card is generated with it.

## Data and its terms
HER2ST (Andersson et al., "Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated cell type
interactions", Nature Communications 12, 6012, 2021; public data, Zenodo record 3957257): legacy Spatial
Transcriptomics, 100 µm spots on a 200 µm pitch, sections {", ".join(sections)} (patient B: B4; patient C: C2-C4,
serial sections), {n_spots} spots under tissue. Only the trained weights are shipped, no data. Cite the study when you
use this model; its data's own terms apply to derived work.

## Settings
Nuclei: `ghist.pp.segment_nuclei` (watershed) at full resolution (0.688 µm/px). Tiles: `ghist.pp.make_tiles(...,
tiling="spots", tile_size={args.tile_size}, pixel_size={args.pixel_size})`, one tile centred on each spot. Genes: the
{len(genes)} most variable of the log-normalised spot counts (within-section variance, genes detected in >= 10% of
spots). Network: width {args.width}, embed_dim {args.embed_dim}, batch {args.batch_size}, lr {args.lr}, seed
{args.seed}, stain_jitter {args.stain_jitter}, color_jitter {args.color_jitter}, context_neighbours
{args.context_neighbours}; {steps} optimisation steps on the
CPU ({fit_s / 60:.0f} min, 2 cores), the same number of epochs as each cross-validation fold. Weights stored in
float16 (loaded as float32). No cell types were trained (spot supervision); give `reference=` profiles to
`ghist.pp.annotate_cell_types` on the predictions for cell types.

## Cross-validated accuracy (leave-one-section-out)
Each fold trains on the other sections with exactly these settings (genes chosen on its training sections) and predicts
the held-out one with `ghist.tl.predict` (tile overlap {overlap} px, {"with" if not args.no_tta else "no"} test-time
augmentation); predicted nuclei are summed per spot and
log-normalised like the measurements. Metric: Pearson correlation over the held-out spots, averaged over the
{args.n_eval_genes} most variable genes. Baseline: ridge regression on hand-made spot features (colour, stain,
texture, nucleus statistics), trained on the same spots.

| held-out section | GHIST | ridge | GHIST - ridge |
|---|---|---|---|
{rows}
| **mean** | **{cv["ghist"].mean():.3f}** | **{cv["ridge"].mean():.3f}** | {cv["ghist_minus_ridge"].mean():+.3f} |
{calibration}
## Intended use
Exploratory maps of relative expression of breast-cancer genes from H&E, at the level of groups of cells (spots,
regions, slides): e.g. per-slide features for cohort analyses (`ghist.tl.predict_cohort`), or a starting point to
fine-tune on your own spatial data. Input: an H&E image with nuclei (`ghist.pp.segment_nuclei`) and a known pixel size
(any scan resolution; ghist resamples to {args.pixel_size} µm/px).

## Limitations
- Trained on four sections of two patients, all HER2-positive breast cancer from one lab and one scanner: expect lower
  accuracy on other subtypes, other tissues, other stains and scanners. Check it on a few of your own measured
  sections before relying on it.
- Supervised by spots of dozens of cells: per-cell values are the model's split of each spot's expression, never
  checked against single-cell measurements. Trust sums over groups of cells more than single cells.
- Correlations above are modest (spot-level Pearson {cv["ghist"].min():.2f}-{cv["ghist"].max():.2f} on held-out
  sections); predictions are relative, not
  calibrated counts.
- Not a medical device; not for diagnosis.
"""


if __name__ == "__main__":
    main()
