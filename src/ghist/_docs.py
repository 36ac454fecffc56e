"""Docstring snippets shared between functions, injected with :func:`doc_params`."""

from __future__ import annotations

from collections.abc import Callable
from inspect import cleandoc
from typing import TypeVar

F = TypeVar("F", bound=Callable)

doc_sdata = """\
sdata
    A :class:`spatialdata.SpatialData` holding the H&E image, the nucleus labels and (for training) a
    table of measured cells annotating the labels."""

doc_image_key = """\
image_key
    Key of the H&E image in ``sdata.images``: RGB, ``uint8``, dims ``(c, y, x)``, possibly multiscale."""

doc_labels_key = """\
labels_key
    Key of the nucleus instance labels in ``sdata.labels`` (0 = background)."""

doc_table_key = """\
table_key
    Key of the measured-cell table in ``sdata.tables``: raw counts annotating ``labels_key``."""

doc_batch_size = """\
batch_size
    Number of tiles processed together."""

doc_progress = """\
progress
    Show a progress bar."""

doc_accelerator = """\
accelerator
    ``"auto"`` (GPU when present, else CPU), ``"cpu"``, ``"gpu"``/``"cuda"`` or ``"mps"``."""


doc_save_show = """\
save
    Path to write the figure to (format from the suffix, e.g. ``.png``, ``.pdf``, ``.svg``), at 150 dpi with a
    tight bounding box. Missing parent folders are created.
show
    Show the figure. ``None`` shows it only when not saving and matplotlib is in interactive mode."""

doc_ax = """\
ax
    Axes to draw into. A new figure is created when ``None``."""


def doc_params(**kwds: str) -> Callable[[F], F]:
    """Format the decorated function's docstring with the given snippets (scanpy's ``_doc_params``)."""

    def decorator(obj: F) -> F:
        if obj.__doc__:
            obj.__doc__ = cleandoc(obj.__doc__).format(**kwds)
        return obj

    return decorator
