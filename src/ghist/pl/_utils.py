"""Shared helpers of the plotting functions: figure creation and scanpy-style ``save``/``show`` handling."""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from .._validation import check_int

# matplotlib loads inside the functions, so that ``import ghist`` stays light.
if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def _get_ax(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Return ``(figure, ax)``, creating a new figure of ``figsize`` inches when ``ax`` is ``None``."""
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    if not isinstance(ax, Axes):
        raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}.")
    return ax.figure, ax


def _save_or_show(fig: Figure, save: str | PathLike | None, show: bool | None) -> None:
    """Save ``fig`` to ``save`` (if given) and show it when asked to or, with ``show=None``, when interactive."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        logger.info("Saved figure to %s", path)
    if show is None:
        show = save is None and matplotlib.is_interactive()
    if show:
        plt.show()


def _check_sdata(sdata: object) -> None:
    """Plots of the slide need the SpatialData (an AnnData table alone lacks the image and the other table)."""
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")


def _check_crop(crop: object) -> None:
    """``(x0, y0, x1, y1)`` with finite numbers, ``x0 < x1`` and ``y0 < y1``, or ``None``."""
    import numbers

    if crop is None:
        return
    values = list(crop) if isinstance(crop, tuple | list) else []
    ok = len(values) == 4 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
    if (
        not ok
        or not all(abs(float(v)) < float("inf") for v in values)
        or not (values[0] < values[2] and values[1] < values[3])
    ):
        raise ValueError(f"`crop` must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1 (finite numbers); got {crop!r}.")


def _check_top(top: object) -> None:
    """``None`` or a positive integer (not a bool, not a float)."""
    check_int("top", top, 1, optional=True)
