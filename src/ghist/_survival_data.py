"""Reading the clinical columns of a survival analysis, shared by :func:`ghist.tl.survival` and ``ghist.pl``.

It lives outside ``tl`` and ``pl`` so that neither imports the other's private helpers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def durations(col: pd.Series, key: str) -> np.ndarray:
    """Follow-up times as float (NaN where missing).

    Parameters
    ----------
    col
        The duration column of ``obs``.
    key
        Its name, for error messages.

    Returns
    -------
    The durations as a float array.

    Raises
    ------
    ValueError
        If the column is not numeric or has negative values.

    """
    try:
        d = pd.to_numeric(col, errors="raise").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Duration column {key!r} must be numeric, got dtype {col.dtype}.") from err
    if (d[np.isfinite(d)] < 0).any():
        raise ValueError(f"Duration column {key!r} has negative values.")
    return d


def events(col: pd.Series, key: str) -> np.ndarray:
    """Event indicator as float 0/1 (NaN where missing); anything else is an error.

    Parameters
    ----------
    col
        The event column of ``obs``: ``1``/``True`` for an observed event, ``0``/``False`` for a censored sample.
    key
        Its name, for error messages.

    Returns
    -------
    The event indicator as a float array of 0, 1 and NaN.

    Raises
    ------
    ValueError
        If a value is neither missing nor 0/1/boolean.

    """

    def to_float(v: object) -> float:
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            return np.nan
        if isinstance(v, bool | np.bool_ | int | np.integer | float | np.floating):
            return float(v)
        raise TypeError

    try:
        e = np.array([to_float(v) for v in col.astype(object)], dtype=float)
    except TypeError as err:
        raise ValueError(
            f"Event column {key!r} must be 0/1 or boolean (1 = event observed), got values {list(col.unique()[:5])}."
        ) from err
    bad = ~np.isin(e[np.isfinite(e)], (0.0, 1.0))
    if bad.any():
        raise ValueError(
            f"Event column {key!r} must be 0/1 or boolean (1 = event observed), got values "
            f"{sorted(set(e[np.isfinite(e)][bad].tolist()))[:5]}."
        )
    return e
