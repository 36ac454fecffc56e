"""From predictions to biology: does a Cox screen of predicted cell-type proportions find a planted survival effect?

Trains GHIST on ``ghist.datasets.synthetic(seed=0)``, predicts an H&E-only synthetic cohort whose survival depends on
one planted cell-type proportion (``ghist.datasets.synthetic_cohort``), summarises every slide with
``ghist.tl.predict_cohort`` and screens the per-slide features with ``ghist.tl.survival``. Then repeats the screen
with survival permuted across patients (no feature should come out). Writes the results, a Kaplan-Meier plot of the
planted feature, a forest plot and a predicted-versus-true composition plot to ``--out``.

Acceptance (the issue's): the planted feature has q < 0.05 and the smallest p among the ``prop:`` features; after
permutation no ``prop:`` feature has q < 0.05.

    python benchmarks/cohort_survival.py --out results/cohort                       # the full run (10 min training)
    python benchmarks/cohort_survival.py --out /tmp/smoke --max-time 00:01:30       # a quick smoke run
    python benchmarks/cohort_survival.py --out /tmp/again --model results/cohort/model   # reuse a trained model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
from anndata import AnnData

import ghist

sys.path.insert(0, str(Path(__file__).parent))
from _common import synthetic_training_tiles

logger = logging.getLogger("cohort_survival")


def train(out: Path, args: argparse.Namespace) -> ghist.GHISTModel:
    if args.model is not None:
        logger.info("Loading the model from %s", args.model)
        return ghist.GHISTModel.load(args.model)
    sdata = ghist.datasets.synthetic(seed=0)
    genes = list(sdata.tables["table"].var_names)
    reference = ghist.pp.reference_profiles(ghist.datasets.synthetic_reference(genes=genes), "cell_type")
    # Cut like `ghist demo`: 128-px tiles, the whole slide trains but for a validation band.
    tiles = synthetic_training_tiles(sdata, out / "tiles.zarr", tile_size=128, progress=False)
    start = time.perf_counter()
    model = ghist.tl.fit(
        tiles,
        reference=reference,
        width=args.width,
        max_time=args.max_time,
        seed=0,
        max_epochs=args.max_epochs,
        **({} if args.batch_size is None else {"batch_size": args.batch_size}),
        checkpoint_dir=out / "checkpoints",
        progress=False,
    )
    logger.info("Trained in %.0f s (best epoch %s)", time.perf_counter() - start, model.best_epoch_)
    model.save(out / "model", overwrite=True)
    return model


def screen(cohort: AnnData, features: list[str] | None) -> pd.DataFrame:
    """Univariate Cox screen of ``features`` (all when ``None``) against ``obs["time"]``/``obs["event"]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # features that are constant over the cohort get NaN statistics
        return ghist.tl.survival(cohort, duration_key="time", event_key="event", features=features, progress=False)


def rank_of(result: pd.DataFrame, feature: str) -> int:
    """1-based rank of ``feature`` by p-value within ``result`` (which is sorted by p)."""
    return int(list(result.index).index(feature)) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for results and figures")
    parser.add_argument("--max-time", default="00:10:00", help="training budget, HH:MM:SS (default 00:10:00)")
    parser.add_argument("--width", type=int, default=32, help="backbone width (default 32)")
    parser.add_argument("--max-epochs", type=int, default=1000, help="epoch cap of fit (the time budget governs)")
    parser.add_argument("--batch-size", type=int, default=None, help="tiles per step of fit (default: fit's, 8)")
    parser.add_argument("--n-patients", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=448, help="side of every cohort slide in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort and of the permutation")
    parser.add_argument("--workers", type=int, default=0, help="dask.distributed worker processes (0: sequential)")
    parser.add_argument("--model", type=Path, default=None, help="load this saved model instead of training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    model = train(out, args)
    t_train = time.perf_counter() - t0

    slides, clinical = ghist.datasets.synthetic_cohort(
        args.n_patients, image_size=args.image_size, seed=args.seed, progress=False
    )
    causal = clinical.attrs["causal_feature"]
    t1 = time.perf_counter()
    if args.workers > 0:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None)
        with cluster, Client(cluster) as client:
            cohort = ghist.tl.predict_cohort(slides, model, client=client, progress=False)
    else:
        cohort = ghist.tl.predict_cohort(slides, model, progress=False)
    t_predict = time.perf_counter() - t1
    cohort.obs = cohort.obs.join(clinical)
    props = [v for v in cohort.var_names if v.startswith("prop:")]

    # Predicted against true proportions, per type, across patients.
    agreement = {}
    for feature in props:
        pred = np.asarray(cohort[:, feature].X).ravel()
        true = cohort.obs[f"true_prop:{feature[5:]}"].to_numpy()
        r = float(np.corrcoef(pred, true)[0, 1]) if pred.std() > 0 and true.std() > 0 else float("nan")
        agreement[feature] = {"r": r, "mean_pred": float(pred.mean()), "mean_true": float(true.mean())}

    res_props = screen(cohort, props)
    res_all = screen(cohort, None)
    # The same screen on the true proportions, for reference.
    true_props = AnnData(
        X=cohort.obs[[f"true_prop:{p[5:]}" for p in props]].to_numpy(),
        obs=cohort.obs[["time", "event"]],
        var=pd.DataFrame(index=props),
    )
    truth = screen(true_props, None)

    rng = np.random.default_rng(args.seed)
    permuted = cohort.copy()
    order = rng.permutation(permuted.n_obs)
    permuted.obs[["time", "event"]] = permuted.obs[["time", "event"]].to_numpy()[order]
    perm_props = screen(permuted, props)
    perm_all = screen(permuted, None)

    summary = {
        "causal_feature": causal,
        "hazard_ratio_planted": clinical.attrs["hazard_ratio"],
        "n_patients": int(cohort.n_obs),
        "n_events": int(cohort.obs["event"].sum()),
        "width": args.width,
        "max_time": args.max_time,
        "max_epochs": args.max_epochs,
        "batch_size": args.batch_size,
        "epochs_run": None if model.history_ is None else len(model.history_),
        "best_epoch": model.best_epoch_,
        "seconds_train": round(t_train, 1),
        "seconds_predict": round(t_predict, 1),
        "predicted": {
            "q": float(res_props.loc[causal, "q"]),
            "p": float(res_props.loc[causal, "p"]),
            "hr": float(res_props.loc[causal, "hr"]),
            "rank_among_prop": rank_of(res_props, causal),
            "n_prop": len(props),
            "q_among_all_features": float(res_all.loc[causal, "q"]),
            "rank_among_all_features": rank_of(res_all, causal),
            "n_all_features": int(res_all["p"].notna().sum()),
            "all_features_q_below_0.05": res_all.index[res_all["q"] < 0.05].tolist(),
        },
        "true_proportions": {
            "q": float(truth.loc[causal, "q"]),
            "p": float(truth.loc[causal, "p"]),
            "hr": float(truth.loc[causal, "hr"]),
            "rank_among_prop": rank_of(truth, causal),
        },
        "permuted": {
            "min_q_prop": float(perm_props["q"].min()),
            "n_prop_q_below_0.05": int((perm_props["q"] < 0.05).sum()),
            "min_q_all": float(perm_all["q"].min()),
            "n_all_q_below_0.05": int((perm_all["q"] < 0.05).sum()),
        },
        "agreement_pred_vs_true": agreement,
    }
    summary["pass"] = bool(
        summary["predicted"]["q"] < 0.05
        and summary["predicted"]["rank_among_prop"] == 1
        and summary["permuted"]["n_prop_q_below_0.05"] == 0
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    res_props.to_csv(out / "cox_prop.csv")
    res_all.to_csv(out / "cox_all.csv")
    perm_props.to_csv(out / "cox_prop_permuted.csv")
    cohort.write_h5ad(out / "cohort.h5ad")

    ghist.pl.kaplan_meier(cohort, causal, duration_key="time", event_key="event", save=out / "km_planted.png")
    ghist.pl.hazard_ratios(res_props, title="Predicted cell-type proportions", save=out / "forest_prop.png")
    ghist.pl.hazard_ratios(res_all, top=20, title="All per-slide features", save=out / "forest_all.png")
    ghist.pl.composition(cohort, true_key="true_prop", save=out / "composition.png")

    print(f"planted feature: {causal} (HR per SD planted {clinical.attrs['hazard_ratio']})")
    print(f"training {t_train:.0f} s (width {args.width}, budget {args.max_time}); predicting {t_predict:.0f} s")
    print("predicted vs true proportion r: " + ", ".join(f"{k[5:]} {v['r']:.2f}" for k, v in agreement.items()))
    print(f"true proportions:      HR {truth.loc[causal, 'hr']:.2f}  p {truth.loc[causal, 'p']:.2e}  "
          f"q {truth.loc[causal, 'q']:.2e}  rank {rank_of(truth, causal)}/{len(props)}")  # fmt: skip
    print(f"predicted proportions: HR {res_props.loc[causal, 'hr']:.2f}  p {res_props.loc[causal, 'p']:.2e}  "
          f"q {res_props.loc[causal, 'q']:.2e}  rank {rank_of(res_props, causal)}/{len(props)}")  # fmt: skip
    hits = summary["predicted"]["all_features_q_below_0.05"]
    print(f"all {summary['predicted']['n_all_features']} features: q {res_all.loc[causal, 'q']:.2e}, "
          f"rank {rank_of(res_all, causal)}; {len(hits)} with q < 0.05: {hits[:8]}")  # fmt: skip
    print(f"permuted: min q prop {perm_props['q'].min():.2f}, min q all {perm_all['q'].min():.2f}")
    print(f"PASS: {summary['pass']}   (results in {os.fspath(out)})")


if __name__ == "__main__":
    main()
