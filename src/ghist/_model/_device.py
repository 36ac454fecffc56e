"""The one place that turns a user's ``accelerator`` string into a device, for both training and prediction."""

from __future__ import annotations

import torch

__all__ = ["ACCELERATORS", "check_accelerator", "lightning_accelerator", "resolve_device"]

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_accelerator(accelerator: str) -> str:
    """Return ``accelerator`` if it is one of :data:`ACCELERATORS`; raise ``ValueError`` naming them otherwise."""
    if not isinstance(accelerator, str) or accelerator not in ACCELERATORS:
        raise ValueError(f"`accelerator` must be one of {ACCELERATORS}, got {accelerator!r}.")
    return accelerator


def resolve_device(accelerator: str) -> torch.device:
    """The device ``accelerator`` stands for on this machine.

    ``"auto"`` takes CUDA if available, then MPS, then the CPU; ``"gpu"`` and ``"cuda"`` are the same.

    Parameters
    ----------
    accelerator
        One of :data:`ACCELERATORS`.

    Returns
    -------
    The :class:`torch.device`.

    Raises
    ------
    ValueError
        ``accelerator`` is not one of :data:`ACCELERATORS`.
    RuntimeError
        The requested device is not available here.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')

    """
    check_accelerator(accelerator)
    if accelerator == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"`accelerator={accelerator!r}` but no CUDA device is available.")
        return torch.device("cuda")
    if accelerator == "mps" and not _mps_available():
        raise RuntimeError("`accelerator='mps'` but MPS is not available.")
    return torch.device(accelerator)


def lightning_accelerator(device: torch.device) -> str:
    """The :class:`lightning.pytorch.Trainer` accelerator string for a device from :func:`resolve_device`.

    Handing Lightning the resolved device (rather than ``"auto"``) makes the trainer run where ghist chose the
    precision and determinism settings for.
    """
    return {"cpu": "cpu", "cuda": "cuda", "mps": "mps"}[device.type]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()
