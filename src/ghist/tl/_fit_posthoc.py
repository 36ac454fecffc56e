"""What :func:`ghist.tl.fit` does once the best weights are in: fit the residual readout, calibrate the spread."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._model import GHISTModel

logger = logging.getLogger(__name__)


def fit_model_readout(model: GHISTModel, train_loader: Any, val_loader: Any | None, device: Any) -> None:
    """Fit the network's residual readout (see `ghist._model._readout`) and record it in the model's settings.

    Skipped, with a log line saying why, without validation tiles (nothing to choose each gene's penalty on) or
    without per-cell targets (spot supervision).
    """
    from .._model._readout import fit_readout

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
    model.network.readout = readout.to(device)
    model.init_params_["readout"] = True
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
