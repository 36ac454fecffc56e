"""Standard errors of per-slide features (``tl.predict_cohort``'s ``layers["ghist_se"]``).

A per-slide feature is a mean over the slide's cells of a per-cell prediction. Its standard error has two parts:

- prediction error: each cell's predicted value misses its true value with standard deviation ``sigma_i`` (the
  calibrated ``layers["ghist_std"]`` of :func:`ghist.tl.predict`, or ``sqrt(p (1 - p))`` for a cell's membership of a
  type predicted with probability ``p``); taking cells' errors as independent, the mean misses by
  ``sqrt(sum_i sigma_i^2) / n``. Errors of neighbouring cells are correlated in practice (stain, focus), so this part
  is a lower bound;
- sampling error: the slide's ``n`` cells are a sample of its tissue; ``s / sqrt(n)`` with ``s`` the between-cell
  standard deviation (``ddof=1``; 0 for a single cell).

The two are added in quadrature. Without per-cell spreads (models saved before ghist had a variance head) only the
sampling part is given.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mean_se", "proportion_se"]


def mean_se(values: np.ndarray, std: np.ndarray | None) -> np.ndarray:
    """Standard error of the column means of ``values`` (cells x features), with per-cell spreads ``std`` or None.

    Examples
    --------
    >>> mean_se(np.array([[0.0], [2.0]]), np.array([[1.0], [1.0]])).round(4)
    array([1.2247])

    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        return np.full(values.shape[1], np.nan)
    between = values.var(axis=0, ddof=1) / n if n > 1 else np.zeros(values.shape[1])
    within = 0.0 if std is None else (np.asarray(std, dtype=np.float64) ** 2).sum(axis=0) / n**2
    return np.sqrt(between + within)


def proportion_se(prop: np.ndarray, proba: np.ndarray | None, n: int) -> np.ndarray:
    """Standard error of the fractions ``prop`` of ``n`` cells predicted as each type (``proba``: cells x types)."""
    if n == 0:
        return np.full(len(prop), np.nan)
    between = prop * (1 - prop) / n
    within = 0.0 if proba is None else (proba * (1 - proba)).sum(axis=0) / n**2
    return np.sqrt(between + within)
