"""What :func:`ghist.tl.fit` does once the best weights are in: the residual readout, the spread, the warnings."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .._model import GHISTModel

logger = logging.getLogger(__name__)

#: Below this many optimisation steps, :func:`ghist.tl.fit` warns that the model is unlikely to be useful.
MIN_USEFUL_STEPS = 300


def fit_model_readout(
    model: GHISTModel, train_loader: Any, val_loader: Any | None, device: Any, *, spot_supervised: bool = False
) -> None:
    """Fit the network's residual readout (see `ghist._model._readout`) and record it in the model's settings.

    Skipped, with a log line saying why, without validation tiles (nothing to choose each gene's penalty on) or
    without per-cell targets (spot supervision).
    """
    from .._model._readout import fit_readout

    if spot_supervised:
        logger.info("Residual readout not fitted: spot supervision gives no per-cell targets to regress.")
        return
    if val_loader is None:
        logger.info("Residual readout not fitted: no validation tiles to choose its penalties on.")
        return
    start = time.perf_counter()
    model.network.to(device).eval()
    readout, report = fit_readout(model.network, train_loader, val_loader, model.expr_scale, device)
    model.readout_ = report
    if readout is None:
        why = "no measured cells" if not report["n_train"] or not report["n_val"] else "no gene was better with it"
        logger.info("Residual readout not fitted: %s.", why)
        return
    model.network.set_readout(readout.to(device))
    logger.info(
        "Residual readout: corrected %d of %d genes from %d training cells; validation MSE (log1p) %.4g -> %.4g "
        "over %d cells (%.0f s)",
        report["genes_corrected"],
        model.n_genes,
        report["n_train"],
        report["val_mse"]["before"],
        report["val_mse"]["after"],
        report["n_val"],
        time.perf_counter() - start,
    )


def calibrate_uncertainty(model: GHISTModel, val_loader: Any, device: Any) -> None:
    """Fit the variance head's post-hoc scale on the validation split (see `ghist._model._uncertainty`)."""
    from .._model._uncertainty import calibration_scale

    model.network.to(device).eval()
    model.uncertainty_head.to(device)
    found = calibration_scale(model.network, model.uncertainty_head, val_loader, model.expr_scale, device)
    model.uncertainty_ = found
    logger.info(
        "Variance head: 90%% intervals scaled by %.3g (genes %.3g-%.3g) to cover 90%% of %d validation %ss",
        found["global"],
        min(found["scale"]),
        max(found["scale"]),
        found["n"],
        found["level"],
    )


def warn_if_weak(history, best_epoch: int | None, steps: int, n_types: int) -> None:
    """Warn when training was too short to be useful or the best validation score is near chance."""
    if steps < MIN_USEFUL_STEPS:
        logger.warning(
            "Trained for %d optimisation steps; results are unlikely to be useful below ~%d: raise `max_time` "
            "(or `max_steps`).",
            steps,
            MIN_USEFUL_STEPS,
        )
    if history is None or history.empty or "val_score" not in history.columns:
        return
    rows = history[history["epoch"] == best_epoch] if best_epoch is not None else history.iloc[[-1]]
    best = (rows if len(rows) else history.iloc[[-1]]).iloc[-1]
    if n_types > 1 and "val_f1" in history.columns and np.isfinite(best["val_f1"]):
        chance = 1.0 / n_types
        if best["val_f1"] < chance + 0.05:
            logger.warning(
                "The best validation cell-type macro F1 (%.3f) is near chance (1/%d cell types = %.3f): the model "
                "has not learnt cell types; train longer or check the cell-type labels.",
                best["val_f1"],
                n_types,
                chance,
            )
    if "val_pearson" in history.columns and np.isfinite(best["val_pearson"]) and best["val_pearson"] < 0.05:
        logger.warning(
            "The best validation mean gene Pearson (%.3f) is near chance (0): the model has not learnt expression; "
            "train longer.",
            best["val_pearson"],
        )
