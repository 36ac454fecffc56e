"""`GHISTModel`: the user-facing model object (genes, cell types, training state, save/load)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._constants import EXPR_SCALE
from ._network import GHISTNetwork

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "model.json"


class GHISTModel:
    """A GHIST network with everything needed to apply it to new slides.

    Holds the network weights together with the gene panel, the cell types, the specialist groups, the
    channel standardisation statistics and the pixel size the network was trained at. Create one with
    :func:`ghist.tl.fit`; apply it with :func:`ghist.tl.predict`.

    Parameters
    ----------
    genes
        Names of the predicted genes, in output order.
    cell_types
        Names of the cell types the network classifies, or ``None`` to train without cell types.
    reference
        Single-cell reference profiles (profiles x genes, ``log1p`` scale, columns ordered like ``genes``),
        e.g. from :func:`ghist.pp.reference_profiles`; ``None`` uses a direct expression head.
    reference_names
        Names of the reference profiles.
    cell_type_groups
        Specialist groups: group name -> cell types of the group (DESIGN section 3.6).
    width
        Channels of the first backbone level (64 is the published architecture).
    embed_dim
        Size of the per-cell embedding.
    tile_size
        Side of the square tiles the network sees, in pixels.
    mean, std
        Per-channel statistics (0-255 scale) used to standardise H&E tiles.
    pixel_size
        Microns per pixel of the training images (``None`` if unknown); other slides are resampled to it.
    expr_scale
        The network learns ``expr_scale * log1p(counts)``.

    Examples
    --------
    >>> import ghist
    >>> model = ghist.GHISTModel(["EPCAM", "PTPRC"], ["Malignant", "T"], width=8)
    >>> model.n_genes, model.cell_types
    (2, ['Malignant', 'T'])

    """

    def __init__(
        self,
        genes: Sequence[str],
        cell_types: Sequence[str] | None = None,
        *,
        reference: np.ndarray | None = None,
        reference_names: Sequence[str] | None = None,
        cell_type_groups: Mapping[str, Sequence[str]] | None = None,
        width: int = 64,
        embed_dim: int = 256,
        tile_size: int = 256,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        pixel_size: float | None = None,
        expr_scale: float = EXPR_SCALE,
    ):
        genes = [str(g) for g in genes]
        if len(genes) == 0:
            raise ValueError("`genes` is empty; expected at least one gene to predict.")
        if len(set(genes)) != len(genes):
            raise ValueError("`genes` contains duplicates; expected unique gene names.")
        cell_types = None if cell_types is None else [str(t) for t in cell_types]
        groups = _check_groups(cell_type_groups, cell_types)
        if reference is not None:
            reference = np.asarray(reference, dtype=np.float32)
            if reference.ndim != 2 or reference.shape[1] != len(genes):
                raise ValueError(
                    f"`reference` has shape {reference.shape}; "
                    f"expected (n_profiles, {len(genes)}) with one column per gene."
                )
            if not np.isfinite(reference).all():
                raise ValueError("`reference` contains NaN or infinite values.")
            if reference_names is None:
                reference_names = [f"profile_{i}" for i in range(reference.shape[0])]
            reference_names = [str(r) for r in reference_names]
            if len(reference_names) != reference.shape[0]:
                raise ValueError(
                    f"`reference_names` has {len(reference_names)} names for {reference.shape[0]} reference profiles."
                )
        mean = [float(m) for m in mean]
        std = [float(s) for s in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"`mean`/`std` must hold 3 channel statistics with std > 0; got {mean}, {std}.")

        self.genes = genes
        self.cell_types = cell_types
        self.cell_type_groups = groups
        self.reference_names = None if reference is None else list(reference_names)
        self.init_params_: dict[str, Any] = {
            "genes": genes,
            "cell_types": cell_types,
            "reference_names": self.reference_names,
            "cell_type_groups": groups,
            "width": int(width),
            "embed_dim": int(embed_dim),
            "tile_size": int(tile_size),
            "mean": mean,
            "std": std,
            "pixel_size": None if pixel_size is None else float(pixel_size),
            "expr_scale": float(expr_scale),
        }
        type_index = {t: i for i, t in enumerate(cell_types or [])}
        network_groups = {name: [type_index[t] for t in members] for name, members in groups.items()}
        self.network = GHISTNetwork(
            n_genes=len(genes),
            n_types=len(cell_types or []),
            reference=None if reference is None else torch.from_numpy(reference * float(expr_scale)),
            groups=network_groups or None,
            width=int(width),
            embed_dim=int(embed_dim),
        )
        self.is_trained_ = False
        self.history_: pd.DataFrame | None = None
        self.best_epoch_: int | None = None

    # ------------------------------------------------------------------ properties
    @property
    def n_genes(self) -> int:
        """Number of predicted genes."""
        return len(self.genes)

    @property
    def n_types(self) -> int:
        """Number of cell types (0 when trained without cell types)."""
        return len(self.cell_types or [])

    @property
    def tile_size(self) -> int:
        """Tile side in pixels."""
        return self.init_params_["tile_size"]

    @property
    def pixel_size(self) -> float | None:
        """Microns per pixel of the training images."""
        return self.init_params_["pixel_size"]

    @property
    def expr_scale(self) -> float:
        """Scale of the network's expression output relative to ``log1p(counts)``."""
        return self.init_params_["expr_scale"]

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean used to standardise tiles."""
        return np.asarray(self.init_params_["mean"], dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        """Per-channel standard deviation used to standardise tiles."""
        return np.asarray(self.init_params_["std"], dtype=np.float32)

    def __repr__(self) -> str:
        p = self.init_params_
        n_params = sum(t.numel() for t in self.network.parameters())
        types = (
            "none"
            if not self.cell_types
            else f"{self.n_types} ({', '.join(self.cell_types[:6])}{', ...' * (self.n_types > 6)})"
        )
        lines = [
            f"GHISTModel ({'trained' if self.is_trained_ else 'untrained'}, {n_params / 1e6:.2f}M parameters)",
            f"    genes: {self.n_genes} ({', '.join(self.genes[:5])}{', ...' * (self.n_genes > 5)})",
            f"    cell types: {types}",
            f"    reference profiles: {len(self.reference_names) if self.reference_names else 'none'}",
            f"    specialist groups: {list(self.cell_type_groups) or 'none'}",
            f"    width={p['width']}, tile_size={p['tile_size']}, pixel_size={p['pixel_size']} um/px",
        ]
        if self.best_epoch_ is not None:
            lines.append(f"    best epoch: {self.best_epoch_}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ I/O
    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save weights, genes, cell types, groups, statistics and settings into ``dir_path``.

        The directory is written next to its destination and moved into place, so an interrupted save never
        leaves a half-written model behind.

        Parameters
        ----------
        dir_path
            Destination directory.
        overwrite
            Replace an existing directory at ``dir_path``.

        Examples
        --------
        >>> import ghist, tempfile
        >>> model = ghist.GHISTModel(["EPCAM", "PTPRC"], ["Malignant", "T"], width=8)
        >>> path = tempfile.mkdtemp() + "/model"
        >>> model.save(path)
        >>> ghist.GHISTModel.load(path).genes
        ['EPCAM', 'PTPRC']

        """
        from .._version import __version__

        dir_path = Path(dir_path)
        if dir_path.exists() and not overwrite:
            raise FileExistsError(f"{str(dir_path)!r} already exists; pass `overwrite=True` to replace it.")
        dir_path.parent.mkdir(parents=True, exist_ok=True)
        reference = self.network.reference
        payload = {
            "class": type(self).__name__,
            "ghist_version": __version__,
            "init_params": self.init_params_,
            "reference": None if reference is None else (reference.detach().cpu() / self.expr_scale),
            "state_dict": self.network.state_dict(),
            "is_trained": self.is_trained_,
            "best_epoch": self.best_epoch_,
            "history": None if self.history_ is None else self.history_.to_dict(orient="list"),
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{dir_path.name}.", dir=dir_path.parent))
        try:
            torch.save(payload, tmp / MODEL_FILE)
            meta = {k: payload[k] for k in ("class", "ghist_version", "init_params", "is_trained", "best_epoch")}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            if dir_path.exists():
                backup = dir_path.with_name(f".{dir_path.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(dir_path, backup)
                os.replace(tmp, dir_path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, dir_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Saved %s to %s", type(self).__name__, dir_path)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        *,
        genes: Sequence[str] | None = None,
        map_location: str | torch.device | None = "cpu",
    ) -> GHISTModel:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        genes
            If given, the genes the caller expects; loading fails if the saved model predicts other genes.
        map_location
            Device to load the weights onto (``"cpu"`` loads GPU-trained models on CPU-only machines).

        Returns
        -------
        The model, in evaluation mode.

        """
        path = Path(dir_path) / MODEL_FILE
        if not path.exists():
            raise FileNotFoundError(f"No {MODEL_FILE!r} in {str(dir_path)!r}; expected a directory written by `save`.")
        payload = torch.load(path, map_location=map_location, weights_only=False)
        if payload.get("class") != cls.__name__:
            raise ValueError(f"{str(path)!r} holds a {payload.get('class')!r}, not a {cls.__name__}.")
        params = dict(payload["init_params"])
        if genes is not None and list(genes) != params["genes"]:
            missing = sorted(set(params["genes"]) - set(genes))
            extra = sorted(set(genes) - set(params["genes"]))
            raise ValueError(
                f"The saved model predicts other genes than expected: missing {missing[:5]}, unexpected {extra[:5]} "
                "(or a different order)."
            )
        reference = payload["reference"]
        model = cls(
            params.pop("genes"),
            params.pop("cell_types"),
            reference=None if reference is None else reference.numpy(),
            **params,
        )
        model.network.load_state_dict(payload["state_dict"])
        model.network.eval()
        model.is_trained_ = bool(payload.get("is_trained", True))
        model.best_epoch_ = payload.get("best_epoch")
        history = payload.get("history")
        model.history_ = None if history is None else pd.DataFrame(history)
        return model

    def _check_trained(self) -> None:
        if not self.is_trained_:
            logger.warning("This GHISTModel has not been trained; its predictions are meaningless. Run `ghist.tl.fit`.")


def _check_groups(groups: Mapping[str, Sequence[str]] | None, cell_types: Sequence[str] | None) -> dict[str, list[str]]:
    if not groups:
        return {}
    if not cell_types:
        raise ValueError(
            "`cell_type_groups` needs cell types; the tiles carry none (pass `cell_type_key` to make_tiles)."
        )
    out: dict[str, list[str]] = {}
    for name, members in groups.items():
        members = [members] if isinstance(members, str) else [str(m) for m in members]
        unknown = [m for m in members if m not in cell_types]
        if unknown:
            raise KeyError(f"Group {name!r} names cell types {unknown} that are not among {list(cell_types)}.")
        if not members:
            raise ValueError(f"Group {name!r} is empty; expected at least one cell type.")
        out[str(name)] = members
    return out
