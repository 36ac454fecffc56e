"""The ``ghist`` command line: ``ghist demo``, and ``ghist segment``/``predict``/``cohort`` over slide files.

``ghist demo`` runs the whole method on the embedded synthetic data; the slide commands live in
:mod:`ghist._cli_slides`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ghist`` console script."""
    parser = argparse.ArgumentParser(prog="ghist", description="Single-cell expression from H&E histology.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on synthetic(seed=0), predict unseen synthetic(seed=1), evaluate")
    demo.add_argument("--out", default="ghist_demo_output", help="output folder (figure, metrics, model)")
    demo.add_argument("--width", type=_positive_int, default=32, help="backbone width (64 = published architecture)")
    demo.add_argument("--max-time", type=_duration, default="00:08:00", help="training budget, HH:MM:SS")
    demo.add_argument(
        "--max-steps", type=_positive_int, default=None, help="optimisation steps (default: until --max-time)"
    )
    demo.add_argument(
        "--max-epochs", type=_positive_int, default=None, help="passes over the tiles (default: no limit)"
    )
    demo.add_argument("--image-size", type=_positive_int, default=None, help="synthetic slide size in pixels")
    demo.add_argument("--tile-size", type=_positive_int, default=128, help="training tile size in pixels")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    from ._cli_slides import add_slide_commands

    add_slide_commands(sub)
    # Bad arguments fail here, before minutes of data generation and training.
    args = parser.parse_args(argv)
    if args.command != "demo":
        from ._cli_slides import main_slides

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s [%(name)s] %(message)s")
        return main_slides(args)
    if args.command == "demo":
        metrics = run_demo(
            out=Path(args.out),
            width=args.width,
            max_time=args.max_time,
            max_steps=args.max_steps,
            max_epochs=args.max_epochs,
            image_size=args.image_size,
            tile_size=args.tile_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
        print(json.dumps(metrics, indent=2))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _duration(text: str) -> str:
    from .tl._fit import _check_max_time

    try:
        _check_max_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HH:MM:SS (e.g. 00:08:00), got {text!r}: {err}") from None
    return text


def run_demo(
    *,
    out: Path,
    width: int = 32,
    max_time: str = "00:08:00",
    max_steps: int | None = None,
    max_epochs: int | None = None,
    image_size: int | None = None,
    tile_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train on ``synthetic(seed=0)``, predict the H&E of ``synthetic(seed=1)``, evaluate, write a figure."""
    import numpy as np
    from spatialdata import SpatialData

    import ghist

    from ._stats import column_pearson

    out.mkdir(parents=True, exist_ok=True)
    size = {} if image_size is None else {"image_size": image_size}
    start = time.perf_counter()
    train = ghist.datasets.synthetic(seed=0, **size)
    test = ghist.datasets.synthetic(seed=1, **size)
    genes = list(train.tables["table"].var_names)
    reference = ghist.pp.reference_profiles(
        ghist.datasets.synthetic_reference(genes=genes, seed=0), "cell_type", genes=genes
    )
    tiles = synthetic_training_tiles(train, out / "tiles.zarr", tile_size=tile_size, progress=progress)
    logger.info("%r", tiles)
    model = ghist.tl.fit(
        tiles,
        reference=reference,
        width=width,
        max_time=max_time,
        max_steps=max_steps,
        max_epochs=max_epochs,
        seed=seed,
        checkpoint_dir=out / "checkpoints",
        progress=progress,
    )
    model.save(out / "model", overwrite=True)

    he_only = SpatialData(images={"he": test.images["he"]}, labels={"nuclei": test.labels["nuclei"]})
    table = ghist.tl.predict(he_only, model, progress=progress)
    test.tables["ghist"] = table
    scores = ghist.tl.evaluate(test, cell_type_key="cell_type")
    scores.to_csv(out / "per_gene_scores.csv")

    # Oracle: knows each test cell's true type and predicts that type's mean training expression.
    truth, train_table = test.tables["table"], train.tables["table"]
    train_log = np.log1p(train_table.X.toarray())
    type_means = {t: train_log[(train_table.obs["cell_type"] == t).to_numpy()].mean(0) for t in model.cell_types}
    oracle = np.stack([type_means[t] for t in truth.obs["cell_type"].astype(str)])
    oracle_r = float(np.nanmean(column_pearson(oracle, np.log1p(truth.X.toarray()))))

    metrics = {
        "mean_pearson": scores.attrs["mean_pearson"],
        "oracle_mean_pearson": oracle_r,
        "ratio_to_oracle": scores.attrs["mean_pearson"] / oracle_r,
        "mean_pearson_svg20": scores.attrs.get("mean_pearson_svg20", float("nan")),
        "cell_type_accuracy": scores.attrs["cell_type_accuracy"],
        "cell_type_macro_f1": scores.attrs["cell_type_macro_f1"],
        "fraction_predicted": scores.attrs["fraction_predicted"],
        "best_epoch": model.best_epoch_,
        "epochs": len(model.history_),
        "steps": int(model.history_["step"].iloc[-1]),
        "minutes": (time.perf_counter() - start) / 60,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _demo_figure(test, scores, out / "ghist_demo.png")
    logger.info("Demo outputs in %s", out.resolve())
    return metrics


def synthetic_training_tiles(sdata, path: Path, *, tile_size: int = 128, progress: bool = True):
    """Tiles of a whole synthetic training slide whose test set is another slide.

    Only a validation band is needed: the last row of tiles is the (unused) test band, the first row
    validates, the rest trains.
    """
    import ghist

    n_rows = -(-sdata.images["he"].sizes["y"] // tile_size)
    shutil.rmtree(path, ignore_errors=True)  # the demo's own output of an earlier run
    return ghist.pp.make_tiles(
        sdata,
        cell_type_key="cell_type",
        tile_size=tile_size,
        n_folds=max(2, n_rows),
        fold=max(2, n_rows),
        path=path,
        progress=progress,
    )


def _demo_figure(sdata, scores, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pl

    genes = list(scores.index[:3])
    height, width = sdata.labels["nuclei"].shape
    crop = (0, 0, min(width, 512), min(height, 512))
    fig = pl.expression(sdata, genes, table_key="table", image_key="he", crop=crop, show=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    axes = pl.cell_types(sdata, table_key="table", cell_type_key="cell_type", crop=crop, show=False)
    axes[0].figure.savefig(path.with_name(path.stem + "_cell_types.png"), dpi=110, bbox_inches="tight")
    plt.close(axes[0].figure)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
