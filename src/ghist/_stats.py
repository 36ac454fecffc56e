"""Vectorised per-gene correlations and classification scores shared by validation and `tl.evaluate`."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def dense(values, dtype=np.float64) -> np.ndarray:
    """A table's matrix (sparse or dense) as a dense numpy array of ``dtype``."""
    return np.asarray(values.toarray() if sp.issparse(values) else values, dtype=dtype)


def column_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``pred`` with the same column of ``true`` (NaN for constant columns)."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"Shapes differ: predicted {pred.shape}, measured {true.shape}.")
    pc = pred - pred.mean(axis=0)
    tc = true - true.mean(axis=0)
    denom = np.sqrt((pc**2).sum(axis=0) * (tc**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(axis=0) / denom
    r[denom == 0] = np.nan
    return r


def column_spearman(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman correlation per column (Pearson of average ranks)."""
    from scipy.stats import rankdata  # scipy.stats takes ~0.3 s to import: not on `import ghist`

    return column_pearson(rankdata(pred, axis=0), rankdata(true, axis=0))


def macro_f1(pred: np.ndarray, true: np.ndarray, n_classes: int | None = None) -> float:
    """Macro-averaged F1 over the classes present in ``true`` (cells with ``true < 0`` are ignored)."""
    pred, true = np.asarray(pred), np.asarray(true)
    keep = true >= 0
    if not keep.any():
        return float("nan")
    labels = np.unique(true[keep])
    from sklearn.metrics import f1_score  # sklearn takes ~0.5 s to import: not on `import ghist`

    return float(f1_score(true[keep], pred[keep], labels=labels, average="macro", zero_division=0))


def validation_score(
    expr_pred: np.ndarray,
    expr_true: np.ndarray,
    type_pred: np.ndarray | None,
    type_true: np.ndarray,
    n_types: int,
) -> dict[str, float]:
    """Model-selection score on the validation band: mean gene Pearson plus cell-type macro F1."""
    measured = np.isfinite(expr_true).all(axis=1)
    pearson = float("nan")
    if measured.sum() > 2:
        pearson = float(np.nanmean(column_pearson(expr_pred[measured], expr_true[measured])))
    scores = {"pearson": pearson}
    f1 = float("nan")
    if type_pred is not None and n_types > 0:
        f1 = macro_f1(type_pred, type_true, n_types)
        scores["f1"] = f1
    parts = [v for v in (pearson, f1) if np.isfinite(v)]
    scores["score"] = float(sum(parts)) if parts else 0.0
    return scores


def standardise_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows centred and scaled to unit norm; second value: rows whose norm is zero (correlation undefined)."""
    centred = values - values.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    flat = norm[:, 0] <= 1e-12
    return centred / np.where(flat[:, None], 1.0, norm), flat


def best_correlated(values: np.ndarray, profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``values``, the row of ``profiles`` it correlates best with (Pearson) and that correlation.

    Constant rows get -1 and NaN; constant profiles never win.
    """
    prof, flat_prof = standardise_rows(np.asarray(profiles, dtype=np.float64))
    cells, flat = standardise_rows(np.asarray(values, dtype=np.float64))
    corr = cells @ prof.T
    corr[:, flat_prof] = -np.inf
    best = corr.argmax(axis=1)
    score = corr[np.arange(len(best)), best]
    return np.where(flat, -1, best), np.where(flat, np.nan, score)
