"""Shared helpers of the plotting functions: figure creation and scanpy-style ``save``/``show`` handling."""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

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
