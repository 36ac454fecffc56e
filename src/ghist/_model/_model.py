"""`GHISTModel`: the user-facing model object (genes, cell types, training state, save/load)."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._deprecation import renamed_arguments
from ._model_files import (
    FORMAT_VERSION,
    LEGACY_FILE,
    META_FILE,
    MODEL_FILES,
    WEIGHTS_FILE,
    check_finite_tensors,
    check_settings,
    check_shapes,
    check_training_state,
    is_model_folder,
    read_legacy,
    read_settings,
    read_tensors,
)
from ._network import GHISTNetwork
from ._spec import ArchitectureSpec, model_docs
from ._uncertainty import HEAD_PREFIX, VarianceHead, make_variance_head

logger = logging.getLogger(__name__)


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
    spec
        The model's :class:`~ghist._model._spec.ArchitectureSpec`, or ``None`` for its defaults; ``**settings``
        replace its fields.
    encoder
        Settings of a pretrained encoder fused into the cell embedding (from
        :func:`ghist._model._encoder.prepare_encoder`, or as saved), or ``None``.
    encoder_module
        The encoder itself (see :func:`ghist.tl.fit`'s ``encoder``); ``None`` rebuilds a timm encoder by name.
    **settings
        Fields of the :class:`~ghist._model._spec.ArchitectureSpec` (checked there), each below.
    {spec_docs}

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
        spec: ArchitectureSpec | None = None,
        encoder: Mapping[str, Any] | None = None,
        encoder_module: torch.nn.Module | None = None,
        **settings: Any,
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
        spec = ArchitectureSpec.build(**settings) if spec is None else spec.replace(**settings) if settings else spec
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

        self.genes = genes
        self.cell_types = cell_types
        self.cell_type_groups = groups
        self.reference_names = None if reference is None else list(reference_names)
        self._encoder_config: dict[str, Any] | None = None
        type_index = {t: i for i, t in enumerate(cell_types or [])}
        network_groups = {name: [type_index[t] for t in members] for name, members in groups.items()}
        feature_encoder = None
        if encoder is not None:
            from ._encoder import FeatureEncoder, encoder_for_load

            feature_encoder = FeatureEncoder(
                encoder_for_load(encoder, encoder_module),
                encoder,
                tile_mean=list(spec.mean),
                tile_std=list(spec.std),
                tile_size=spec.tile_size,
                out_features=spec.embed_dim,
            )
            self._encoder_config = json.loads(json.dumps(feature_encoder.config))
        elif encoder_module is not None:
            raise ValueError("`encoder` was given, but this model has no encoder (it was trained without one).")
        self.network = GHISTNetwork(
            n_genes=len(genes),
            n_types=len(cell_types or []),
            reference=None if reference is None else torch.from_numpy(reference * spec.expr_scale),
            groups=network_groups or None,
            spec=spec,
            feature_encoder=feature_encoder,
        )
        # After the network, under its own random state: the network's initialisation is what it was without it.
        self.uncertainty_head: VarianceHead | None = make_variance_head(spec.embed_dim, len(genes))
        # Post-hoc factor on the head's std, fitted on the validation split by `tl.fit` (see `_uncertainty.py`).
        self.uncertainty_: dict[str, Any] = {"scale": [1.0] * len(genes), "global": 1.0, "level": None, "n": 0}
        self.readout_: dict[str, Any] | None = None
        # Set only by `_mark_trained` (training) and `_from_state` (loading).
        self._is_trained = False
        self._history: pd.DataFrame | None = None
        self._best_epoch: int | None = None

    __doc__ = (__doc__ or "").replace("    {spec_docs}", textwrap.indent(model_docs(), "    "))

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
    def spec(self) -> ArchitectureSpec:
        """The model's :class:`~ghist._model._spec.ArchitectureSpec` (held by its network)."""
        return self.network.spec

    @property
    def init_params_(self) -> dict[str, Any]:
        """What the model was built from, as saved in ``model.json`` (a new dict).

        Genes, cell types, reference names, groups, the :class:`~ghist._model._spec.ArchitectureSpec`'s fields and
        the encoder's settings.
        """
        params = {
            "genes": list(self.genes),
            "cell_types": None if self.cell_types is None else list(self.cell_types),
            "reference_names": None if self.reference_names is None else list(self.reference_names),
            "cell_type_groups": {k: list(v) for k, v in self.cell_type_groups.items()},
            **self.spec.to_json(),
        }
        if self._encoder_config is not None:
            params["encoder"] = json.loads(json.dumps(self._encoder_config))
        return params

    @property
    def tile_size(self) -> int:
        """Tile side in pixels."""
        return self.spec.tile_size

    @property
    def pixel_size(self) -> float | None:
        """Microns per pixel of the training images."""
        return self.spec.pixel_size

    @property
    def expr_scale(self) -> float:
        """Scale of the network's expression output relative to ``log1p(counts)``."""
        return self.spec.expr_scale

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean used to standardise tiles."""
        return np.asarray(self.spec.mean, dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        """Per-channel standard deviation used to standardise tiles."""
        return np.asarray(self.spec.std, dtype=np.float32)

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
        if not isinstance(params, Mapping) or not isinstance(params.get("genes"), list):
            raise ValueError("The settings lack the model's `init_params` (genes, cell types, ...).")
        params = dict(params)
        vocabulary = {k: params.pop(k, None) for k in ("genes", "cell_types", "reference_names", "cell_type_groups")}
        encoder_config = params.pop("encoder", None)
        try:
            # Every number checked (types, ranges, finiteness) before anything is allocated; a setting the file does
            # not name gets the value older models were trained with (see `ArchitectureSpec.from_saved`).
            spec = ArchitectureSpec.from_saved(params)
            best = check_training_state(settings)
        except (ValueError, TypeError) as err:
            raise ValueError(f"The model's settings are invalid: {err}") from None
        saved_genes = vocabulary["genes"]
        if genes is not None and list(genes) != list(saved_genes):
            missing = sorted(set(saved_genes) - set(genes))
            extra = sorted(set(genes) - set(saved_genes))
            raise ValueError(
                f"The saved model predicts other genes than expected: missing {missing[:5]}, unexpected {extra[:5]} "
                "(or a different order)."
            )
        check_finite_tensors(tensors)
        head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        reference = tensors.get("reference")
        if reference is not None:
            # The buffer holds the profiles on the network's scale; the constructor takes them on the log1p scale.
            reference = (reference.detach().to("cpu", torch.float32) / spec.expr_scale).numpy()
        if encoder_config is not None and encoder is not None:
            import copy

            encoder = copy.deepcopy(encoder)  # the weights loaded below must not overwrite the caller's module
        build = {
            "reference": reference,
            "reference_names": vocabulary["reference_names"],
            "cell_type_groups": vocabulary["cell_type_groups"],
            "spec": spec,
        }
        try:
            if encoder_config is None:
                # The shapes the settings imply, from a network on the meta device (no memory), before a real one.
                with torch.device("meta"):
                    skeleton = cls(saved_genes, vocabulary["cell_types"], **build)
                check_shapes(skeleton.network.state_dict(), tensors, "network")
                if head:
                    check_shapes(skeleton.uncertainty_head.state_dict(), head, "variance head")
            model = cls(saved_genes, vocabulary["cell_types"], encoder=encoder_config, encoder_module=encoder, **build)
            if encoder_config is not None:
                from ._encoder import check_encoder_weights

                check_encoder_weights(model.network, tensors)
            model.network.load_state_dict(dict(tensors))
            if head:
                model.uncertainty_head.load_state_dict(head)
        except (TypeError, RuntimeError, KeyError) as err:
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
        model._best_epoch = best
        model._history = _history_frame(settings.get("history"))
        return model

    # ------------------------------------------------------------------ I/O
    @renamed_arguments(dir_path="path")
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save the model into directory ``path``: weights as tensors only, everything else as JSON.

        ``weights.pt`` holds a plain dict of tensors (the network's ``state_dict``, reference profiles included as
        its ``"reference"`` buffer), written with :func:`torch.save`; :meth:`load` reads it with
        ``weights_only=True``, so loading a model file never runs code. ``model.json`` holds the class, file format
        version, ghist version, constructor arguments (genes, cell types, groups, statistics, pixel size, ...),
        training state, best epoch and per-epoch history. The directory is written next to its destination and
        moved into place, so an interrupted save never leaves a half-written model behind.

        Parameters
        ----------
        path
            Destination directory.
        overwrite
            Replace an existing ghist model at ``path`` (a folder whose ``model.json`` names a GHISTModel, or a
            ghist 0.1 ``model.pt``, holding nothing else but a ``CARD.md``). Any other folder or file there is left
            as it is and refused with a ``FileExistsError``: nothing of yours is deleted, nothing beside it touched.

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is false, or it is not a ghist model folder.

        Examples
        --------
        >>> import ghist, tempfile
        >>> model = ghist.GHISTModel(["EPCAM", "PTPRC"], ["Malignant", "T"], width=8)
        >>> path = tempfile.mkdtemp() + "/model"
        >>> model.save(path)
        >>> ghist.GHISTModel.load(path).genes
        ['EPCAM', 'PTPRC']

        """
        from .._folders import replace_folder

        path = Path(path)
        state = self._to_state()
        settings = {**state["settings"], "weights_file": WEIGHTS_FILE}

        def write(tmp: Path) -> None:
            torch.save(state["tensors"], tmp / WEIGHTS_FILE)
            (tmp / META_FILE).write_text(json.dumps(settings, indent=2, allow_nan=False))

        replace_folder(
            path, write, overwrite=overwrite, is_ours=is_model_folder, own_names=MODEL_FILES, what="ghist model"
        )
        logger.info("Saved %s to %s", type(self).__name__, path)

    @classmethod
    @renamed_arguments(dir_path="path")
    def load(
        cls,
        path: str | os.PathLike,
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
        path
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
            ``path`` holds no saved model.
        ValueError
            A file is empty, truncated, not a ghist model file, holds anything but tensors, or does not match the
            settings (the message names the file); a setting of ``model.json`` is out of its type or range (see
            :class:`~ghist._model._spec.ArchitectureSpec`: checked before the weights are read); the weights hold
            NaN or infinities, or tensors the settings do not imply (checked before a network is built).

        """
        path = Path(path)
        weights, meta, legacy = path / WEIGHTS_FILE, path / META_FILE, path / LEGACY_FILE
        if weights.is_file() or (meta.is_file() and not legacy.is_file()):
            settings = read_settings(meta)
            check_settings(settings, meta)  # every number, before the weights are read or anything is built
            tensors = read_tensors(weights, map_location)
            source = weights
        elif legacy.is_file():
            settings, tensors = read_legacy(legacy, map_location)
            source = legacy
        else:
            raise FileNotFoundError(
                f"No {WEIGHTS_FILE!r} and {META_FILE!r} in {str(path)!r}; expected a directory written by "
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
