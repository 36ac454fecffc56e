"""The one way ghist reads a torch file it did not just write: tensors and plain containers only, never code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_error_reason", "safe_torch_load"]


def load_error_reason(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line.

    torch's own message for a refused pickle advises retrying with ``weights_only=False``, which is what must not be
    done with a file of unknown origin; keep only the refused object.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    text = refused[0] if refused else (lines[0] if lines else "")
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def safe_torch_load(
    path: str | os.PathLike, *, what: str, expected: str, map_location: Any = "cpu", hint: str = ""
) -> Any:
    """``torch.load(path, weights_only=True)``, every failure a ValueError naming the file and what was expected.

    The one way ghist reads a torch file it did not just write (model weights, ghist 0.1 model files, checkpoints,
    encoder weights): only tensors and plain containers are accepted, so a file cannot run code. ``hint`` is added to
    the message of a file that cannot be read.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty; expected {expected}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zips, garbage and refused pickles raise many types
        raise ValueError(
            f"{what} {str(path)!r} cannot be read safely (with `weights_only=True`) as {expected} "
            f"({load_error_reason(err)}).{hint} Files are never unpickled with arbitrary code."
        ) from err
