"""A saved model's files: their names, the marker that makes a folder a ghist model, and reading and checking them.

Every number of ``model.json`` is checked (:func:`check_settings`) before the weights are read, and the weights'
names and shapes against what the settings imply (:func:`check_shapes`) before a real network is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._validation import check_int
from ._safe_load import safe_torch_load
from ._spec import ArchitectureSpec

WEIGHTS_FILE = "weights.pt"  # a plain dict of tensors (torch.save), read back with weights_only=True
META_FILE = "model.json"  # everything else, as JSON
LEGACY_FILE = "model.pt"  # ghist 0.1: one pickled dict
FORMAT_VERSION = 2  # 1: ghist 0.1, one pickled `model.pt`; 2: `weights.pt` (tensors only) + `model.json`
CARD_FILE = "CARD.md"  # a model card, written beside a shipped model by its build script
MODEL_FILES = (WEIGHTS_FILE, META_FILE, LEGACY_FILE, CARD_FILE)  # what a model folder may hold to be replaced


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` holds a saved ghist model.

    That is, a ``model.json`` naming a GHISTModel with a format version, or (ghist 0.1) a ``model.pt`` (not
    unpickled to tell).
    """
    meta = path / META_FILE
    if meta.is_file():
        try:
            settings = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(settings, dict) and settings.get("class") == "GHISTModel" and "format_version" in settings
    return (path / LEGACY_FILE).is_file()


def check_settings(settings: Mapping[str, Any], path: Path) -> None:
    """The settings of ``model.json`` in type and range (see :meth:`ArchitectureSpec.from_saved`), naming the file."""
    params = settings.get("init_params")
    if not isinstance(params, Mapping):
        return  # `_from_state` says what is missing
    others = {"genes", "cell_types", "reference_names", "cell_type_groups", "encoder"}
    try:
        ArchitectureSpec.from_saved({k: v for k, v in params.items() if k not in others})
        check_training_state(settings)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(path)!r}: the model's settings are invalid: {err}") from None


def check_training_state(settings: Mapping[str, Any]) -> int | None:
    """The saved best epoch (``None`` or an integer >= -1), after checking ``is_trained`` is a boolean."""
    if not isinstance(settings.get("is_trained", True), bool):
        raise ValueError(f"`is_trained` must be true or false, got {settings.get('is_trained')!r}.")
    best = settings.get("best_epoch")
    check_int("best_epoch", best, -1, optional=True)
    return best


def check_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Weights with NaN or infinite values would predict them: refused, naming the tensors."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"The weights hold NaN or infinite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}.")


def check_shapes(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], what: str) -> None:
    """The saved tensors are those, and of the shapes, the settings imply (names the first disagreements)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: saved {tuple(found[k].shape)}, settings imply {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        problems = [f"missing {missing[:5]}"] * bool(missing) + [f"unexpected {unexpected[:5]}"] * bool(unexpected)
        raise ValueError(f"the {what}'s weights do not fit its settings: {'; '.join(problems + shapes[:5])}.")


def read_settings(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing; expected the JSON settings that `GHISTModel.save` writes.")
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not readable JSON ({err}); expected the settings that `GHISTModel.save` writes."
        ) from err
    if not isinstance(settings, dict) or settings.get("class") != "GHISTModel":
        raise ValueError(
            f"{str(path)!r} does not describe a GHISTModel; expected the settings `GHISTModel.save` writes."
        )
    return settings


def read_tensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    expected = "a dict of tensors written by `GHISTModel.save`"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing; expected {expected}.")
    tensors = safe_torch_load(path, what="Model weights", expected=expected, map_location=map_location)
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(
            f"{str(path)!r} holds a {type(tensors).__name__} with other things than tensors; expected {expected}."
        )
    return tensors


def read_legacy(path: Path, map_location: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Settings and tensors of a ghist 0.1 ``model.pt`` (one pickled dict), read with ``weights_only=True``."""
    expected = "a model file written by `GHISTModel.save`"
    payload = safe_torch_load(
        path,
        what="Model file",
        expected=expected,
        map_location=map_location,
        hint=" If it is an old ghist model you trust, load it with the ghist version that wrote it and save it again "
        "with this one.",
    )
    if not isinstance(payload, dict) or payload.get("class") != "GHISTModel" or "state_dict" not in payload:
        raise ValueError(f"{str(path)!r} is not a GHISTModel file; expected {expected}.")
    history = payload.get("history")
    settings = {
        "class": payload["class"],
        "format_version": 1,
        "ghist_version": payload.get("ghist_version"),
        "init_params": payload.get("init_params"),
        "is_trained": payload.get("is_trained", True),
        "best_epoch": payload.get("best_epoch"),
        "history": None if history is None else dict(history),
    }
    return settings, payload["state_dict"]
