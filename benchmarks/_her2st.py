"""HER2ST (legacy ST spots): the data, GHIST and the ridge baseline on it, one train/test split and the
leave-one-section-out cross-validation.

Shared by ``benchmarks/her2st.py``, which measures, and ``scripts/build_models.py``, which builds the shipped model
``her2st-breast-spots`` and writes its card from what it measured: both run this code with the settings of
:func:`add_method_arguments`, so the card's figures are what the benchmark measures with the same settings. Public
API only.

A section is read at full resolution (about 9920 x 9280 px at 0.688 µm/px), segmented with ``ghist.pp.segment_nuclei``
(watershed; cached in ``--cache``) and put into a SpatialData: the image and the nuclei with their µm pixel size, the
spots as 100 µm circles (``ShapesModel``) and their raw counts as a table annotating them. ``--crop N`` keeps an
``N x N`` window around the middle of each section's spots: a quick end-to-end check of the scripts, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
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
def read_section(
    name: str, data: Path = DATA, crop: int | None = None
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Full-resolution RGB ``(y, x, 3)``, the kept spots (pixel centres) and their raw counts (spots x genes).

    With ``crop``, only the ``crop x crop`` window around the median spot centre and the spots whose disc lies in it
    (pixel centres relative to the window).
    """
    Image.MAX_IMAGE_PIXELS = None
    rgb = np.asarray(Image.open(data / name / "he.jpg").convert("RGB"))
    spots = pd.read_csv(data / name / "spots.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    counts = pd.read_csv(data / name / "counts.tsv.gz", sep="\t", index_col=0)
    counts = counts.loc[:, ~counts.columns.duplicated()]
    shared = spots.index.intersection(counts.index)
    spots, counts = spots.loc[shared], counts.loc[shared]
    if crop is not None:
        rgb, spots = _crop(rgb, spots, crop)
        counts = counts.loc[spots.index]
    return rgb, spots, counts


def _crop(rgb: np.ndarray, spots: pd.DataFrame, size: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The ``size x size`` window of ``rgb`` around the median spot centre, and the spots whose disc lies inside."""
    radius = SPOT_DIAMETER_UM / 2 / PIXEL_SIZE
    y0 = int(np.clip(spots["pixel_y"].median() - size / 2, 0, max(rgb.shape[0] - size, 0)))
    x0 = int(np.clip(spots["pixel_x"].median() - size / 2, 0, max(rgb.shape[1] - size, 0)))
    rgb = np.ascontiguousarray(rgb[y0 : y0 + size, x0 : x0 + size])
    spots = spots.assign(pixel_x=spots["pixel_x"] - x0, pixel_y=spots["pixel_y"] - y0)
    inside = spots["pixel_x"].between(radius, rgb.shape[1] - radius) & spots["pixel_y"].between(
        radius, rgb.shape[0] - radius
    )
    return rgb, spots[inside]


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
        table_key="spot_counts",
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


def load_sections(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Per section: its SpatialData, kept spots, counts (after --min-train-umi), all counts and ridge features."""
    sections = {}
    for name in names:
        t0 = time.perf_counter()
        rgb, spots, counts = read_section(name, args.data, args.crop)
        key = name if args.crop is None else f"{name}_crop{args.crop}"  # cache file names
        labels = segment(key, rgb, args.cache)
        t1 = time.perf_counter()
        features = spot_features_cached(key, rgb, labels, spots, args.cache)
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
        "settings": settings(args),
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


def run_cv(sections: dict[str, dict], args: argparse.Namespace, out: Path) -> tuple[list[dict], pd.DataFrame]:
    """Leave-one-section-out over ``sections``: each fold's results (``out/fold_<section>``) and the table of folds.

    The table has one row per held-out section: ``ghist``, ``ridge``, ``ghist_minus_ridge`` and, when every fold was
    calibrated, the spot calibration figures of :func:`spot_calibration`.
    """
    names = list(sections)
    folds = []
    for test in names:
        train = [n for n in names if n != test]
        folds.append(run_split(sections, train, test, args, out / f"fold_{test}"))
    table = pd.DataFrame(
        {
            "ghist": [f.get("ghist_pearson", np.nan) for f in folds],
            "ridge": [f["ridge_pearson"] for f in folds],
        },
        index=pd.Index(names, name="held_out"),
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
    return folds, table


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings of the data, GHIST and the baseline: the same options in the benchmark and the build script."""
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
    parser.add_argument("--data", type=Path, default=DATA, help="folder with one sub-folder per section")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for training")
    parser.add_argument(
        "--cache", type=Path, default=Path("/tmp/ghist_her2st_cache"), help="segmentations and ridge features"
    )
    parser.add_argument(
        "--crop", type=int, default=None, help="keep an N x N px window of each section (a quick check, not a measure)"
    )


def check_budget(args: argparse.Namespace) -> argparse.Namespace:
    """A step budget alone stays alone (a busy machine must not cut some folds short of it); else 25 minutes."""
    if args.max_time is None and args.max_steps is None:
        args.max_time = "00:25:00"
    return args


def settings(args: argparse.Namespace) -> dict:
    """``args`` as JSON values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
