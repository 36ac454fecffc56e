"""Public functions of :mod:`ghist.models`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pandas as pd

from .._bundled_models import CARD_FILE, DEFAULT_MODEL, REGISTRY, get_bundled, resolve_model

if TYPE_CHECKING:
    from .._model import GHISTModel


def available() -> pd.DataFrame:
    """The models shipped with ghist, one row each.

    Returns
    -------
    A DataFrame indexed by model name with its description, tissue, supervision, training data and the data's terms,
    the number of genes, the pixel size it works at (µm/px), whether it is the default of :func:`ghist.tl.predict`
    and its size on disk (MB).

    Examples
    --------
    >>> import ghist
    >>> table = ghist.models.available()
    >>> bool(table.loc[ghist.models.DEFAULT_MODEL, "default"])
    True

    """
    rows = []
    for entry in REGISTRY.values():
        params = entry.settings()["init_params"]
        size = sum(p.stat().st_size for p in entry.path.iterdir() if p.is_file())
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "tissue": entry.tissue,
                "supervision": entry.supervision,
                "trained_on": entry.trained_on,
                "data_terms": entry.data_terms,
                "n_genes": len(params["genes"]),
                "pixel_size": params["pixel_size"],
                "default": entry.name == DEFAULT_MODEL,
                "size_mb": round(size / 1e6, 2),
            }
        )
    return pd.DataFrame(rows).set_index("name")


def card(name: str = DEFAULT_MODEL) -> str:
    """The model card of a shipped model: its data and terms, settings, cross-validated accuracy, intended use, limits.

    Parameters
    ----------
    name
        A name from :func:`available`.

    Returns
    -------
    The card, as Markdown text (``IPython.display.Markdown(card)`` renders it in Jupyter).

    Examples
    --------
    >>> import ghist
    >>> print(ghist.models.card()[:40])  # doctest: +SKIP
    # her2st-breast-spots

    """
    entry = get_bundled(name)
    path = entry.path / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The bundled model {name!r} has no card at {str(path)!r}; reinstall ghist.")
    return path.read_text(encoding="utf-8")


def load(name: str | os.PathLike = DEFAULT_MODEL) -> GHISTModel:
    """Load a shipped model by name (or a model folder written by :meth:`ghist.GHISTModel.save`).

    Parameters
    ----------
    name
        A name from :func:`available`, or the path of a saved model's folder.

    Returns
    -------
    The model, in evaluation mode, on the CPU: pass it to :func:`ghist.tl.predict`, or fine-tune it on your own data.

    Examples
    --------
    >>> import ghist
    >>> model = ghist.models.load("her2st-breast-spots")  # doctest: +SKIP
    >>> len(model.genes)  # doctest: +SKIP
    250

    """
    if name is None:
        raise TypeError(f"`name` must be a bundled model's name ({sorted(REGISTRY)}) or a saved model's folder.")
    return resolve_model(name, argument="name")
