"""Build the models ghist ships (``src/ghist/models/data/<name>/``) and their cards, reproducibly from a seed.

Usage::

    python scripts/build_models.py her2st-breast-spots                 # the release recipe (hours on 2 CPU cores)
    python scripts/build_models.py her2st-breast-spots --dest /tmp/m --work /tmp/m_cv   # elsewhere, folds kept
    python scripts/build_models.py her2st-breast-spots --work /tmp/m_cv --reuse-folds --overwrite  # folds saved before
    python scripts/build_models.py her2st-breast-spots --dest /tmp/smoke --crop 1536 --max-steps 2 --n-genes 20 \
        --n-eval-genes 5                                               # end to end in minutes: a check, not a model

``her2st-breast-spots``: the HER2ST sections B4, C2, C3 and C4 (legacy ST spots). First the leave-one-section-out
cross-validation of ``benchmarks/her2st.py --cv`` with the release recipe (each fold: genes chosen and GHIST trained
on three sections, the fourth predicted and scored against the ridge baseline, the spot calibration measured), then
the final model on all four sections with the same settings and the same number of epochs as each fold, saved as
ghist ships it (float16 weights), and its ``CARD.md`` written from the cross-validation it just measured. The code
that reads the data, trains and scores is ``benchmarks/_her2st.py``, shared with the benchmark, so the card's figures
are what the benchmark measures with these settings. With the same seed on the CPU, the same data and the same
versions, a rebuild gives the same weights.

The release recipe is :data:`RECIPES`; any option of the benchmark's method (``--width``, ``--max-steps``, ...)
overrides it for a trial build. ``--dest`` (default: the package's own folder of that model) must not hold a model
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _her2st import (
    add_method_arguments,
    build_sdata,
    choose_genes,
    fit_spots,
    genes_measured_in,
    load_sections,
    run_cv,
    settings,
    spot_tiles,
)

import ghist

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "src" / "ghist" / "models" / "data"

#: The release recipe of each shipped model: the sections it learns from and the settings that differ from the
#: benchmark's defaults (``benchmarks/_her2st.py``'s ``add_method_arguments``).
RECIPES: dict[str, dict] = {
    "her2st-breast-spots": {
        "sections": ["B4", "C2", "C3", "C4"],
        "settings": {"max_steps": 2500, "no_tta": True, "stain_jitter": 0.05, "width": 16, "seed": 0},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(RECIPES), help="the shipped model to build")
    add_method_arguments(parser)
    parser.add_argument("--dest", type=Path, default=None, help="where the model goes (default: the package's folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --dest")
    parser.add_argument(
        "--work", type=Path, default=None, help="where the cross-validation folds go (default: a temporary folder)"
    )
    parser.add_argument(
        "--reuse-folds",
        action="store_true",
        help="score the fold models a previous build saved in --work instead of training them again",
    )
    first = parser.parse_args(argv)
    parser.set_defaults(**RECIPES[first.model]["settings"])
    args = parser.parse_args(argv)
    # what run_split of the benchmark reads besides the method's settings
    args.rescore, args.resume, args.curve_every, args.baseline_only = args.reuse_folds, False, 0, False
    args.sections = RECIPES[args.model]["sections"]
    args.dest = args.dest if args.dest is not None else MODELS_DIR / args.model
    if args.reuse_folds and args.work is None:
        parser.error("--reuse-folds needs --work (the folder of the folds to reuse)")
    if args.max_time is None and args.max_steps is None:
        parser.error("give a training budget: --max-steps (the recipe's) or --max-time")
    if (args.dest / "model.json").exists() and not args.overwrite:
        parser.error(f"{args.dest} already holds a model; pass --overwrite to replace it")
    return args


def build(args: argparse.Namespace, work: Path, command: str) -> dict:
    """Cross-validate, train the final model, save it with its card in ``args.dest``; returns what was measured."""
    start = time.perf_counter()
    sections = load_sections(args.sections, args)
    folds, cv = run_cv(sections, args, work)
    print(cv.round(4).to_string(), flush=True)
    names = list(sections)
    genes = choose_genes({n: sections[n]["counts"] for n in names}, genes_measured_in(sections, names), args.n_genes)
    sdatas = {n: build_sdata(s["rgb"], s["labels"], s["spots"], s["counts"]) for n, s in sections.items()}
    with tempfile.TemporaryDirectory(dir=work) as folder:
        tiles = spot_tiles(sdatas, genes, args, Path(folder) / "tiles.zarr")
        # the same number of epochs as each fold: the steps grow with the training spots
        fold_spots = np.mean([sum(len(sections[n]["spots"]) for n in f["train"]) for f in folds])
        steps = None if args.max_steps is None else round(args.max_steps * len(tiles) / fold_spots)
        t0 = time.perf_counter()
        model = fit_spots(tiles, args, Path(folder) / "checkpoints", steps)
        fit_s = time.perf_counter() - t0
        n_tiles = len(tiles)
    # float16 weights keep the package small; loading casts them back to the network's float32
    model.network.half()
    model.save(args.dest, overwrite=True)
    model.network.float()
    steps_done = int(model.history_["step"].max())
    card = model_card(args, cv, genes, sections, steps_done, fit_s, command)
    (args.dest / "CARD.md").write_text(card, encoding="utf-8")
    summary = {
        "model": args.model,
        "command": command,
        "settings": settings(args),
        "cv": cv.to_dict(orient="index"),
        "final": {"tiles": n_tiles, "steps": steps_done, "fit_s": fit_s},
        "total_s": time.perf_counter() - start,
    }
    (work / "build.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"LAST model={args.dest} tiles={n_tiles} steps={steps_done} fit_s={fit_s:.0f}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.getLogger("ghist").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    command = shlex.join(["python", "scripts/build_models.py", *argv])
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        build(args, args.work, command)
        return
    with tempfile.TemporaryDirectory(prefix="ghist_build_") as work:
        build(args, Path(work), command)


def model_card(args, cv: pd.DataFrame, genes: list[str], sections: dict, steps: int, fit_s: float, command: str) -> str:
    """The model's card (Markdown), from the cross-validation table ``cv`` and the final training run."""
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
genes for every segmented nucleus of an H&E image. Written by `{command}` (ghist
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


if __name__ == "__main__":
    main()
