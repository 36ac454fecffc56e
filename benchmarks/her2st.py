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

The shipped model ``her2st-breast-spots`` is built by ``scripts/build_models.py``, which runs this benchmark's
cross-validation (``benchmarks/_her2st.py``, the code both share) with the release settings and writes the model card
from what it measured.

Uncertainty: on the held-out spots, the coverage of the nominal 90% interval of each spot's predicted ``log1p`` sum
(its ``ghist_std`` from ``ghist.tl.aggregate_to_spots``) around the measured counts scaled as training targets are,
and Spearman's rho between a spot's mean std and its mean absolute error (``calibration`` in ``results.json``; see
``spot_calibration``). ``--rescore`` scores the models a previous run saved in ``--out`` again instead of training
(``rescore.json``; with ``--cv`` also ``cv_rescore.json``). ``--resume`` (with ``--cv``) rescores the folds whose
model a stopped run saved and trains only the others."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _her2st import add_method_arguments, check_budget, load_sections, run_cv, run_split, settings


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
    add_method_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("her2st_out"))
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
    return check_budget(parser.parse_args(argv))


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
    folds, table = run_cv(sections, args, args.out)
    print(table.round(4).to_string())
    summary = {
        "settings": settings(args),
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


if __name__ == "__main__":
    main()
