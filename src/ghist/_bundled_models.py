"""The registry of the trained models shipped inside the package, and how a ``model=`` argument becomes a model.

Neutral ground between :mod:`ghist.models` (the public face) and :mod:`ghist.tl` (which resolves ``model=`` in
``predict`` and ``predict_cohort``). Nothing here imports torch until a model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._model import GHISTModel

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "models" / "data"
CARD_FILE = "CARD.md"


@dataclass(frozen=True)
class BundledModel:
    """One shipped model: where its files are and what a user must know before trusting it."""

    name: str
    description: str
    tissue: str
    supervision: str
    trained_on: str
    data_terms: str

    @property
    def path(self) -> Path:
        return BUNDLED_DIR / self.name

    def metadata_file(self) -> Path:
        """Its ``model.json``; a FileNotFoundError saying the installation is incomplete if it is missing."""
        meta = self.path / "model.json"
        if not meta.is_file():
            raise FileNotFoundError(
                f"The bundled model {self.name!r} has no files at {str(self.path)!r}; the ghist installation is "
                "incomplete (reinstall ghist)."
            )
        return meta

    def settings(self) -> dict[str, Any]:
        """The saved ``model.json`` (JSON only: cheap, and no torch)."""
        return json.loads(self.metadata_file().read_text(encoding="utf-8"))


DEFAULT_MODEL = "her2st-breast-spots"

REGISTRY: dict[str, BundledModel] = {
    model.name: model
    for model in [
        BundledModel(
            name="her2st-breast-spots",
            description="HER2-positive breast cancer H&E -> 250 genes per nucleus, trained on spots",
            tissue="breast (HER2+ carcinoma)",
            supervision="spots (legacy Spatial Transcriptomics, 100 µm)",
            trained_on="HER2ST sections B4, C2, C3, C4 (Andersson et al., Nat. Commun. 2021)",
            data_terms="public data (Zenodo 3957257); cite the study; only weights are shipped",
        )
    ]
}


def get_bundled(name: str) -> BundledModel:
    """The registry entry ``name``; an unknown name is a KeyError listing the registered ones."""
    if name not in REGISTRY:
        raise KeyError(
            f"No bundled model named {name!r}; registered: {sorted(REGISTRY)} (see `ghist.models.available()`)."
        )
    return REGISTRY[name]


def load_bundled(name: str) -> GHISTModel:
    """Load the shipped model ``name`` (float16 weights come back as the network's float32)."""
    from ._model import GHISTModel

    entry = get_bundled(name)
    entry.metadata_file()  # a clear error if the package data is missing, before load reads the files
    return GHISTModel.load(entry.path)


def resolve_model(model: Any, *, argument: str = "model") -> GHISTModel:
    """What ``predict(..., model=...)`` accepts, as a model.

    ``None`` is the default bundled model (logged, with what it was trained on); a string is a registered name or a
    folder written by :meth:`GHISTModel.save`; a :class:`~ghist.GHISTModel` passes through. A string that is both a
    registered name and an existing folder is refused rather than guessed.
    """
    from ._model import GHISTModel

    if isinstance(model, GHISTModel):
        return model
    if model is None:
        entry = get_bundled(DEFAULT_MODEL)
        logger.info(
            "Using the bundled model %r (%s; trained on %s). Pass `%s=` to use another; see "
            "`ghist.models.card(%r)` for its accuracy and limits.",
            entry.name,
            entry.description,
            entry.trained_on,
            argument,
            entry.name,
        )
        return load_bundled(entry.name)
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        registered = isinstance(model, str) and model in REGISTRY
        if registered and path.exists():
            raise ValueError(
                f"`{argument}={model!r}` is both a bundled model's name and a folder here; pass "
                f"`ghist.models.load({model!r})` or `ghist.GHISTModel.load('./{model}')` to say which."
            )
        if registered:
            entry = get_bundled(model)
            logger.info("Using the bundled model %r (trained on %s).", entry.name, entry.trained_on)
            return load_bundled(model)
        if not path.exists():
            raise FileNotFoundError(
                f"`{argument}={str(model)!r}` is neither a bundled model ({sorted(REGISTRY)}) nor an existing folder "
                "written by `GHISTModel.save`."
            )
        return GHISTModel.load(path)
    raise TypeError(
        f"`{argument}` must be a GHISTModel (from `ghist.tl.fit` or `GHISTModel.load`), a bundled model's name "
        f"({sorted(REGISTRY)}), a saved model's folder, or None for {DEFAULT_MODEL!r}; got {type(model).__name__}."
    )
