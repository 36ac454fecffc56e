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
from .._validation import check_int, check_number
from ._network import GHISTNetwork
from ._safe_load import safe_torch_load
from ._uncertainty import HEAD_PREFIX, VarianceHead, make_variance_head

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"  # a plain dict of tensors (torch.save), read back with weights_only=True
META_FILE = "model.json"  # everything else, as JSON
LEGACY_FILE = "model.pt"  # ghist 0.1: one pickled dict
FORMAT_VERSION = 2  # 1: ghist 0.1, one pickled `model.pt`; 2: `weights.pt` (tensors only) + `model.json`


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
        Specialist groups: group name -> cell types of the group (``docs/method.md``).
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
    encoder
        Settings of a pretrained encoder fused into the cell embedding (from
        :func:`ghist._model._encoder.prepare_encoder`, or as saved), or ``None``.
    encoder_module
        The encoder itself (see :func:`ghist.tl.fit`'s ``encoder``); ``None`` rebuilds a timm encoder by name.
    context_neighbours
        Mix each cell's embedding with the mean of its ``k`` nearest cells' before the heads (see
        :func:`ghist.tl.fit`); 0: no neighbourhood context.
    output_activation
        Non-linearity keeping predicted expression non-negative: ``"softplus"``, or ``"relu"`` (models saved
        before this setting existed load with it; see :class:`~ghist._model._network.ExpressionHead`).
    morphometrics
        Feed each nucleus' size and texture to the cell embedding (see
        :class:`~ghist._model._network.GHISTNetwork`); models saved before this setting existed load without.
    cell_offset
        A direct path from each cell's embedding to its genes in the expression heads (see
        :class:`~ghist._model._network.ExpressionHead`); models saved before this setting existed load without.
    readout
        The network holds a residual readout (:class:`~ghist._model._readout.ResidualReadout`), a linear correction
        from each cell's embedding fitted by :func:`ghist.tl.fit` after training; models saved before it existed
        load without.

    Attributes
    ----------
    uncertainty_head
        The variance head (:class:`~ghist._model._uncertainty.VarianceHead`) giving ``layers["ghist_std"]`` in
        :func:`ghist.tl.predict`; ``None`` for models saved before ghist had one.
    uncertainty_
        Its post-hoc calibration: ``{"scale": per-gene factors on its std, "global": the factor of all genes,
        "level": "cell"/"spot"/None, "n": values per gene it was fitted on}`` (set by :func:`ghist.tl.fit` on the
        validation split; factors 1 without one).
    readout_
        What :func:`ghist.tl.fit` found fitting the residual readout (cells used, genes corrected, validation mean
        squared error before and after, penalty per gene; see :func:`ghist._model._readout.fit_readout`), or
        ``None`` when it was not fitted.

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
        encoder: Mapping[str, Any] | None = None,
        encoder_module: torch.nn.Module | None = None,
        context_neighbours: int = 0,
        output_activation: str = "softplus",
        morphometrics: bool = False,
        cell_offset: bool = False,
        readout: bool = False,
    ):
        if isinstance(genes, str) or not isinstance(genes, Sequence | np.ndarray | pd.Index):
            raise TypeError(f"`genes` must be a list of gene names; got {type(genes).__name__} {genes!r:.60}.")
        genes = [str(g) for g in genes]
        if len(genes) == 0:
            raise ValueError("`genes` is empty; expected at least one gene to predict.")
        _check_unique(genes, "genes")
        if isinstance(cell_types, str):
            raise TypeError(f"`cell_types` must be a list of cell type names or None; got the string {cell_types!r}.")
        cell_types = None if cell_types is None else [str(t) for t in cell_types]
        if cell_types is not None:
            _check_unique(cell_types, "cell_types")
        check_int("width", width, 1)
        check_int("embed_dim", embed_dim, 1)
        check_int("context_neighbours", context_neighbours, 0)
        # five levels halve the tile four times; batch norm needs more than one value per channel at the deepest
        check_int("tile_size", tile_size, 32)
        if pixel_size is not None:
            check_number("pixel_size", pixel_size)
        check_number("expr_scale", expr_scale)
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
            "context_neighbours": int(context_neighbours),
            "output_activation": str(output_activation),
            "morphometrics": bool(morphometrics),
            "cell_offset": bool(cell_offset),
            "readout": bool(readout),
        }
        type_index = {t: i for i, t in enumerate(cell_types or [])}
        network_groups = {name: [type_index[t] for t in members] for name, members in groups.items()}
        feature_encoder = None
        if encoder is not None:
            from ._encoder import FeatureEncoder, encoder_for_load

            feature_encoder = FeatureEncoder(
                encoder_for_load(encoder, encoder_module),
                encoder,
                tile_mean=mean,
                tile_std=std,
                tile_size=int(tile_size),
                out_features=int(embed_dim),
            )
            self.init_params_["encoder"] = json.loads(json.dumps(feature_encoder.config))
        elif encoder_module is not None:
            raise ValueError("`encoder` was given, but this model has no encoder (it was trained without one).")
        self.network = GHISTNetwork(
            n_genes=len(genes),
            n_types=len(cell_types or []),
            reference=None if reference is None else torch.from_numpy(reference * float(expr_scale)),
            groups=network_groups or None,
            width=int(width),
            embed_dim=int(embed_dim),
            feature_encoder=feature_encoder,
            context_neighbours=int(context_neighbours),
            output_activation=str(output_activation),
            morphometrics=bool(morphometrics),
            cell_offset=bool(cell_offset),
            readout=bool(readout),
        )
        # After the network, under its own random state: the network's initialisation is what it was without it.
        self.uncertainty_head: VarianceHead | None = make_variance_head(int(embed_dim), len(genes))
        # Post-hoc factor on the head's std, fitted on the validation split by `tl.fit` (see `_uncertainty.py`).
        self.uncertainty_: dict[str, Any] = {"scale": [1.0] * len(genes), "global": 1.0, "level": None, "n": 0}
        self.readout_: dict[str, Any] | None = None
        # Set only by `_mark_trained` (training) and `_from_state` (loading).
        self._is_trained = False
        self._history: pd.DataFrame | None = None
        self._best_epoch: int | None = None

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
            f"GHISTModel ({'trained' if self.is_trained else 'untrained'}, {n_params / 1e6:.2f}M parameters)",
            f"    genes: {self.n_genes} ({', '.join(self.genes[:5])}{', ...' * (self.n_genes > 5)})",
            f"    cell types: {types}",
            f"    reference profiles: {len(self.reference_names) if self.reference_names else 'none'}",
            f"    specialist groups: {list(self.cell_type_groups) or 'none'}",
            f"    width={p['width']}, tile_size={p['tile_size']}, pixel_size={p['pixel_size']} um/px",
        ]
        if p.get("encoder"):
            enc = p["encoder"]
            state = "trainable" if enc["trainable"] else "frozen"
            lines.append(f"    encoder: {enc['label'] or enc['name']} ({state})")
        if p.get("readout") and self.readout_:
            lines.append(f"    residual readout: {self.readout_.get('genes_corrected', '?')} genes corrected")
        if self.best_epoch_ is not None:
            lines.append(f"    best epoch: {self.best_epoch_}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ training state
    @property
    def is_trained(self) -> bool:
        """Whether :func:`ghist.tl.fit` trained the network (or it was loaded from a trained model)."""
        return self._is_trained

    @property
    def is_trained_(self) -> bool:
        """Alias of :attr:`is_trained` (scikit-learn style)."""
        return self._is_trained

    @property
    def best_epoch_(self) -> int | None:
        """Epoch whose weights the model holds (the best validation epoch), or ``None``."""
        return self._best_epoch

    @property
    def history_(self) -> pd.DataFrame | None:
        """Metrics logged after every training epoch, one row per epoch, or ``None``."""
        return self._history

    def _mark_trained(self, best_epoch: int | None = None, history: pd.DataFrame | None = None) -> None:
        """Record that training ended with the weights of ``best_epoch``; puts the network in evaluation mode."""
        self._is_trained = True
        self._best_epoch = None if best_epoch is None else int(best_epoch)
        self._history = None if history is None else pd.DataFrame(history).reset_index(drop=True)
        self.network.eval()
        if self.uncertainty_head is not None:
            self.uncertainty_head.eval()

    # ------------------------------------------------------------------ state
    def _to_state(self) -> dict[str, Any]:
        """Everything needed to rebuild the model: JSON-able settings and the network's tensors on the CPU.

        Returns
        -------
        ``{"settings": {...}, "tensors": {name: tensor}}``. ``settings`` holds the class name, the file format
        version, the ghist version, the constructor arguments (``init_params``), the training state and the
        history (lists; NaN as ``None``) and survives ``json.dumps(..., allow_nan=False)``; ``tensors`` is the
        network's ``state_dict`` (the reference profiles are its ``"reference"`` buffer, on the network's
        ``expr_scale * log1p`` scale). :meth:`_from_state` rebuilds the model.

        """
        from .._version import __version__

        history = None
        if self._history is not None:
            history = {str(k): [_json_scalar(v) for v in col] for k, col in self._history.to_dict("list").items()}
        settings = {
            "class": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "ghist_version": __version__,
            "init_params": json.loads(json.dumps(self.init_params_)),
            "is_trained": bool(self._is_trained),
            "best_epoch": self._best_epoch,
            "history": history,
            "uncertainty": json.loads(json.dumps(self.uncertainty_)),
            "readout": json.loads(json.dumps(self.readout_)),
        }
        tensors = {name: value.detach().cpu() for name, value in self.network.state_dict().items()}
        if self.uncertainty_head is not None:
            head = self.uncertainty_head.state_dict().items()
            tensors.update({HEAD_PREFIX + name: value.detach().cpu() for name, value in head})
        return {"settings": settings, "tensors": tensors}

    @classmethod
    def _from_state(
        cls, state: Mapping[str, Any], *, genes: Sequence[str] | None = None, encoder: torch.nn.Module | None = None
    ) -> GHISTModel:
        """Rebuild a model from :meth:`_to_state`'s output (in evaluation mode).

        Parameters
        ----------
        state
            ``{"settings": ..., "tensors": ...}``.
        genes
            If given, the genes the caller expects.
        encoder
            The encoder module of a model trained with a custom one (a copy is used); see :meth:`load`.

        Raises
        ------
        ValueError
            The state is not a GHISTModel's, was written by a newer format, predicts other genes than ``genes``,
            or its tensors do not fit the network its settings describe.

        """
        if not isinstance(state, Mapping) or not {"settings", "tensors"} <= set(state):
            raise ValueError("Expected a model state {'settings': ..., 'tensors': ...} from `GHISTModel._to_state`.")
        settings, tensors = state["settings"], state["tensors"]
        if not isinstance(settings, Mapping) or settings.get("class") != cls.__name__:
            found = settings.get("class") if isinstance(settings, Mapping) else type(settings).__name__
            raise ValueError(f"The settings describe a {found!r}, not a {cls.__name__}.")
        version = settings.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"Model file format {version!r} is newer than this ghist reads ({FORMAT_VERSION}); upgrade ghist."
            )
        if not isinstance(tensors, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ValueError("The model's weights must be a dict of name -> tensor.")
        params = settings.get("init_params")
        if not isinstance(params, Mapping) or "genes" not in params:
            raise ValueError("The settings lack the model's `init_params` (genes, cell types, ...).")
        params = dict(params)
        # Settings added after a model was saved: the value it was trained with (ReLU, no morphometrics, no offset,
        # no readout).
        params.setdefault("output_activation", "relu")
        params.setdefault("morphometrics", False)
        params.setdefault("cell_offset", False)
        params.setdefault("readout", False)
        if genes is not None and list(genes) != list(params["genes"]):
            missing = sorted(set(params["genes"]) - set(genes))
            extra = sorted(set(genes) - set(params["genes"]))
            raise ValueError(
                f"The saved model predicts other genes than expected: missing {missing[:5]}, unexpected {extra[:5]} "
                "(or a different order)."
            )
        head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        reference = tensors.get("reference")
        if reference is not None:
            # The buffer holds the profiles on the network's scale; the constructor takes them on the log1p scale.
            reference = (reference.detach().to("cpu", torch.float32) / float(params["expr_scale"])).numpy()
        if params.get("encoder") is not None and encoder is not None:
            import copy

            encoder = copy.deepcopy(encoder)  # the weights loaded below must not overwrite the caller's module
        try:
            genes_, types_ = params.pop("genes"), params.pop("cell_types", None)
            model = cls(genes_, types_, reference=reference, encoder_module=encoder, **params)
            if params.get("encoder") is not None:
                from ._encoder import check_encoder_weights

                check_encoder_weights(model.network, tensors)
            model.network.load_state_dict(dict(tensors))
            if head:
                model.uncertainty_head.load_state_dict(head)
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"The saved weights do not fit the model the settings describe: {err}") from err
        model.network.eval()
        if head:
            model.uncertainty_head.eval()
            model.uncertainty_ = _uncertainty_settings(settings.get("uncertainty"), model.n_genes)
        else:  # saved before ghist had a variance head: `tl.predict` writes no spread for it
            model.uncertainty_head = None
        readout = settings.get("readout")
        model.readout_ = dict(readout) if isinstance(readout, Mapping) else None
        model._is_trained = bool(settings.get("is_trained", True))
        best = settings.get("best_epoch")
        model._best_epoch = None if best is None else int(best)
        model._history = _history_frame(settings.get("history"))
        return model

    # ------------------------------------------------------------------ I/O
    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save the model into directory ``dir_path``: weights as tensors only, everything else as JSON.

        ``weights.pt`` holds a plain dict of tensors (the network's ``state_dict``, reference profiles included as
        its ``"reference"`` buffer), written with :func:`torch.save`; :meth:`load` reads it with
        ``weights_only=True``, so loading a model file never runs code. ``model.json`` holds the class, file format
        version, ghist version, constructor arguments (genes, cell types, groups, statistics, pixel size, ...),
        training state, best epoch and per-epoch history. The directory is written next to its destination and
        moved into place, so an interrupted save never leaves a half-written model behind.

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
        dir_path = Path(dir_path)
        if dir_path.exists() and not overwrite:
            raise FileExistsError(f"{str(dir_path)!r} already exists; pass `overwrite=True` to replace it.")
        dir_path.parent.mkdir(parents=True, exist_ok=True)
        state = self._to_state()
        settings = {**state["settings"], "weights_file": WEIGHTS_FILE}
        tmp = Path(tempfile.mkdtemp(prefix=f".{dir_path.name}.", dir=dir_path.parent))
        try:
            torch.save(state["tensors"], tmp / WEIGHTS_FILE)
            (tmp / META_FILE).write_text(json.dumps(settings, indent=2, allow_nan=False))
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
        encoder: torch.nn.Module | None = None,
    ) -> GHISTModel:
        """Load a model saved with :meth:`save`.

        Tensors are read with ``torch.load(..., weights_only=True)``: a model file cannot run code. Directories
        written by ghist 0.1 (a single ``model.pt``) are read the same way.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        genes
            If given, the genes the caller expects; loading fails if the saved model predicts other genes.
        map_location
            Device to read the tensors onto (``"cpu"`` loads GPU-trained models on CPU-only machines); the
            returned model is on the CPU.
        encoder
            For a model trained with a custom ``nn.Module`` encoder: a module of the same class and architecture (its
            weights do not matter: the saved ones are loaded into a copy of it). Not needed for timm encoders, rebuilt
            by name when timm is installed (a module passed is used instead).

        Returns
        -------
        The model, in evaluation mode.

        Raises
        ------
        FileNotFoundError
            ``dir_path`` holds no saved model.
        ValueError
            A file is empty, truncated, not a ghist model file, holds anything but tensors, or does not match the
            settings (the message names the file).

        """
        dir_path = Path(dir_path)
        weights, meta, legacy = dir_path / WEIGHTS_FILE, dir_path / META_FILE, dir_path / LEGACY_FILE
        if weights.is_file() or (meta.is_file() and not legacy.is_file()):
            settings = _read_settings(meta)
            tensors = _read_tensors(weights, map_location)
            source = weights
        elif legacy.is_file():
            settings, tensors = _read_legacy(legacy, map_location)
            source = legacy
        else:
            raise FileNotFoundError(
                f"No {WEIGHTS_FILE!r} and {META_FILE!r} in {str(dir_path)!r}; expected a directory written by "
                "`GHISTModel.save`."
            )
        try:
            return cls._from_state({"settings": settings, "tensors": tensors}, genes=genes, encoder=encoder)
        except ValueError as err:
            if "other genes" in str(err):
                raise
            raise ValueError(f"{str(source)!r}: {err}") from err


def _json_scalar(value: Any) -> Any:
    """A plain JSON value: numpy scalars unwrapped, NaN and infinities as ``None``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _uncertainty_settings(value: Any, n_genes: int) -> dict[str, Any]:
    """The stored calibration of the variance head (factors 1 where absent or unusable)."""
    value = value if isinstance(value, Mapping) else {}
    scale = value.get("scale")
    scale = np.asarray(scale if isinstance(scale, list) else [1.0] * n_genes, dtype=np.float64)
    if scale.shape != (n_genes,) or not (np.isfinite(scale) & (scale > 0)).all():
        scale = np.ones(n_genes)
    overall = value.get("global", 1.0)
    overall = float(overall) if isinstance(overall, int | float) and np.isfinite(overall) else 1.0
    return {"scale": scale.tolist(), "global": overall, "level": value.get("level"), "n": int(value.get("n") or 0)}


def _history_frame(history: Any) -> pd.DataFrame | None:
    if history is None:
        return None
    frame = pd.DataFrame(history)
    # JSON stored NaN as null: bring the metric columns back to floats.
    for column in frame.columns:
        converted = pd.to_numeric(frame[column], errors="coerce")
        if converted.notna().sum() == frame[column].notna().sum():
            frame[column] = converted.astype(float)
    return frame


def _read_settings(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing; expected the JSON settings that `GHISTModel.save` writes.")
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not readable JSON ({err}); expected the settings that `GHISTModel.save` writes."
        ) from err
    if not isinstance(settings, dict) or settings.get("class") != GHISTModel.__name__:
        raise ValueError(
            f"{str(path)!r} does not describe a GHISTModel; expected the settings `GHISTModel.save` writes."
        )
    return settings


def _read_tensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
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


def _read_legacy(path: Path, map_location: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    if not isinstance(payload, dict) or payload.get("class") != GHISTModel.__name__ or "state_dict" not in payload:
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


def _check_unique(names: list[str], arg: str) -> None:
    seen: set[str] = set()
    duplicated = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicated:
        raise ValueError(f"`{arg}` lists {duplicated[:5]} more than once; expected unique names.")


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
