"""`ghist.tl.fit`: train a GHIST network on cut tiles with Lightning."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from anndata import AnnData

from .._model._spec import ArchitectureSpec, default_output_activation, split_fit_options, with_fit_options
from .._validation import check_genes
from ._fit_pixel_size import check_resumed_pixel_size, model_pixel_size, pixel_size_recorder
from ._fit_posthoc import calibrate_uncertainty, fit_model_readout, warn_if_weak

if TYPE_CHECKING:
    from .._model import GHISTModel
    from ..pp import TileSet

logger = logging.getLogger(__name__)

#: Optimisation steps trained when neither ``max_steps``, ``max_epochs`` nor ``max_time`` is given.
DEFAULT_MAX_STEPS = 3000
#: ``patience=None``: early stopping waits for epochs spanning about this many steps (and at least 10 epochs).
PATIENCE_STEPS = 500
# Lightning messages that say nothing to a ghist user (ghist says what matters in its own words).
_LIGHTNING_NOISE = (
    r"Checkpoint directory .* exists and is not empty",
    r"The dirpath has changed from",
    r".*isinstance\(treespec, LeafSpec\)",
    r".*does not have many workers",
    r"Found \d+ module\(s\) in eval mode",  # a frozen pretrained encoder (`encoder=`) is kept in eval mode
    r"`ModelCheckpoint\(monitor='val_score'\)` could not find",  # a step budget that ends inside an epoch
)


@with_fit_options
def fit(
    tiles: TileSet,
    *,
    reference: AnnData | None = None,
    reference_groupby: str | None = None,
    cell_type_groups: Mapping[str, Sequence[str]] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    encoder: Any = None,
    encoder_weights: str | os.PathLike | None = None,
    encoder_trainable: bool = False,
    encoder_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> GHISTModel:
    """Train the GHIST network on tiles cut by :func:`ghist.pp.make_tiles`.

    Trains on the training band with AdamW (learning rate decaying linearly to 0 over the budget: whichever of
    ``max_steps``, ``max_epochs`` and ``max_time`` ends first), random flips and 90° rotations; after every epoch
    it scores the validation band (mean gene Pearson plus cell-type macro F1), writes a checkpoint, stops early
    when that score has not improved for ``patience`` epochs, and at the end keeps the weights of the best epoch.

    Beside the network, a variance head learns each cell's per-gene predictive spread by a Gaussian likelihood of the
    measured ``log1p`` counts (of the spots' ``log1p`` counts with spot supervision) given the network's detached
    prediction; it changes neither the network's gradients nor the logged ``train_loss``. After training, one factor
    per gene on its standard deviation is fitted on the validation band so that 90% intervals cover 90% of the
    measured values there (``model.uncertainty_``; see :func:`ghist.tl.predict`'s ``layers["ghist_std"]``).

    Before that calibration, with per-cell targets, a residual readout (``readout``) is fitted: a linear correction
    of the expression from each cell's embedding, solved in closed form on the training cells and kept gene by gene
    only where it helps the validation cells.

    Without any budget, it trains for 3,000 optimisation steps (``DEFAULT_MAX_STEPS``); with only ``max_time``, until
    the time is up. It warns when it trained fewer than 300 steps, or when the best validation score is near chance.

    Parameters
    ----------
    tiles
        Tiles with spatial folds from :func:`ghist.pp.make_tiles`.
    reference
        Single-cell reference profiles (profiles x genes on the ``log1p`` scale, e.g. from
        :func:`ghist.pp.reference_profiles`), or single cells with ``reference_groupby``. Without one, the
        network predicts expression with a direct head.
    reference_groupby
        Column of ``reference.obs`` grouping single cells into profiles; ``None`` if ``reference`` already
        holds profiles.
    cell_type_groups
        Specialist groups of cell types, e.g. ``{"immune": ["B", "T", "Plasma"], "tumour": ["Malignant"]}``.
    {fit_options}
    checkpoint_dir
        Where checkpoints (``last.ckpt`` after every epoch, and the best epoch) and the metrics CSV (``logs/``) go;
        by default a temporary directory, removed once the best weights are in the returned model.
    resume
        A checkpoint (e.g. ``<checkpoint_dir>/last.ckpt``) to continue training from. It is read with
        ``torch.load(..., weights_only=True)``: a checkpoint holding anything but tensors and plain containers (e.g.
        state of a user callback that pickles objects) is refused with a ``ValueError`` rather than unpickled.
    encoder
        A pretrained encoder whose features join ghist's own in each nucleus' embedding (``None``: ghist's network
        alone). Either a :class:`torch.nn.Module` mapping RGB tiles ``(B, 3, H, W)`` to feature maps
        ``(B, C, h, w)`` or tokens ``(B, N, C)`` (a copy is trained or frozen; yours is left as it is), or a timm
        name: an architecture such as ``"vit_large_patch16_224"`` or one of the offline presets
        ``"hf-hub:MahmoodLab/UNI2-h"``, ``"hf-hub:bioptimus/H-optimus-0"``, ``"hf-hub:paige-ai/Virchow2"`` (timm
        architecture, keyword arguments, input size and normalisation of the model card), built with
        ``pretrained=False`` (needs ``pip install 'ghist[encoders]'``). The encoder gets the tiles as RGB in [0, 1]
        (ghist's own branch gets them channel-standardised), resized to its input size and normalised its way; its
        features, bilinearly resized to the tile, are averaged under each nucleus and over the tile, and
        ``[nucleus mean, tile mean]`` goes through a layer norm and a linear layer (ReLU) to ``embed_dim`` values
        concatenated to the input of the embedding MLP. Tokens: class/register tokens come first; their number is
        ``encoder_options["num_prefix_tokens"]``, else the model's ``num_prefix_tokens`` attribute (timm ViTs), else
        what is left beside the largest square grid of patch tokens; non-square grids need ``"patch_grid"``. The
        settings and the encoder's weights are saved with the model (:meth:`ghist.GHISTModel.save`); a model with a
        custom module needs that module again to load: ``GHISTModel.load(path, encoder=MyEncoder())``. See the
        "Pretrained encoders" tutorial.
    encoder_weights
        A local weights file for the encoder: ``.safetensors``, or a torch state dict (``pytorch_model.bin``,
        ``.pt``) read with ``weights_only=True`` (never unpickled with code). Required for a timm name (nothing is
        ever downloaded); optional for a module.
    encoder_trainable
        Fine-tune the encoder with the rest of the network; ``False`` (default) freezes it: evaluation mode, no
        gradients, its parameters are not in the optimiser.
    encoder_options
        Optional encoder settings: ``"name"`` (your label for it, saved with the model), ``"input_size"`` (square
        side the tiles are resized to; ``None``: the tile size; the presets use 224), ``"mean"``/``"std"`` (RGB
        normalisation on the [0, 1] scale; default ImageNet's, the presets use the model card's),
        ``"num_prefix_tokens"``, ``"patch_grid"`` (rows, columns), ``"timm_kwargs"`` (JSON keyword arguments of
        ``timm.create_model``, e.g. from the model card), ``"out_features"`` (projection size; default
        ``embed_dim``).
    **trainer_kwargs
        Other :class:`lightning.pytorch.Trainer` arguments (a name neither fit nor the Trainer knows is refused
        before training); ``callbacks=[...]`` are run after ghist's own (checkpointing, history, progress bar).

    Returns
    -------
    The trained :class:`ghist.GHISTModel` (weights of the best validation epoch; ``history_`` holds the per-epoch
    metrics and optimisation ``step``, including those of a run resumed from).

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(image_size=256, n_genes=20, seed=0)
    >>> tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type", tile_size=64)
    >>> model = ghist.tl.fit(tiles, width=4, embed_dim=16, max_steps=20, progress=False)  # doctest: +SKIP
    >>> model = ghist.tl.fit(tiles, width=32, max_time="00:10:00")  # doctest: +SKIP

    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from .._model import GHISTModel
    from .._model._data import collate_tiles, worker_context
    from .._model._device import lightning_accelerator, resolve_device
    from .._model._module import EpochHistory, GHISTModule, check_finite_weights
    from ..pp import TileSet, reference_profiles

    if not isinstance(tiles, TileSet):
        raise TypeError(f"`tiles` must be a ghist TileSet from `ghist.pp.make_tiles`, got {type(tiles).__name__}.")
    if len(tiles.train) == 0:
        raise ValueError(f"{tiles!r}\nhas no training tiles; cut more tiles or use fewer folds.")
    # fit's keywords -> the model's settings, this run's settings and Lightning's (checked here, before any work)
    settings, run, trainer_kwargs = split_fit_options(options)
    _check_trainer_kwargs(trainer_kwargs, L.Trainer)
    if settings["output_activation"] is None:
        settings["output_activation"] = default_output_activation(spots=tiles.spots_key is not None)
    settings["pixel_size"] = model_pixel_size(tiles, settings["pixel_size"])
    spec = ArchitectureSpec(**settings, tile_size=tiles.tile_size, mean=tuple(tiles.mean), std=tuple(tiles.std))
    device = resolve_device(run.accelerator)
    if resume is not None:
        if not Path(resume).exists():
            raise FileNotFoundError(f"Checkpoint to resume from not found: {str(resume)!r}.")
        # refuse a damaged or unsafe checkpoint, or one trained at another pixel size, before any training starts
        check_resumed_pixel_size(_read_checkpoint(resume), resume, spec.pixel_size)
    max_steps = run.max_steps
    if max_steps is None and run.max_epochs is None and run.max_time is None:
        max_steps = DEFAULT_MAX_STEPS

    profiles, profile_names = _reference_matrix(reference, reference_groupby, tiles.genes, reference_profiles)

    encoder_module = encoder_config = None
    if encoder is not None:
        from .._model._encoder import prepare_encoder

        encoder_module, encoder_config = prepare_encoder(
            encoder, weights=encoder_weights, trainable=encoder_trainable, options=encoder_options
        )
    elif encoder_weights is not None or encoder_options:
        raise ValueError("`encoder_weights` / `encoder_options` were given without an `encoder`.")

    L.seed_everything(run.seed, workers=True, verbose=False)
    model = GHISTModel(
        tiles.genes,
        tiles.cell_types,
        reference=profiles,
        reference_names=profile_names,
        cell_type_groups=cell_type_groups,
        spec=spec,
        encoder=encoder_config,
        encoder_module=encoder_module,
    )
    module = GHISTModule(
        model.network,
        run,
        expr_scale=model.expr_scale,
        standardisation=(list(tiles.mean), list(tiles.std)),
        uncertainty=model.uncertainty_head,
    )
    batch_size, num_workers = run.batch_size, run.num_workers
    train_loader = DataLoader(
        tiles.train,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_tiles,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(run.seed),
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context(num_workers),
    )
    has_val = len(tiles.val) > 0
    val_loader = _eval_loader(tiles.val, batch_size, num_workers) if has_val else None
    if not has_val:
        logger.warning("No validation tiles: the last epoch is kept instead of the best validation epoch.")

    temporary = checkpoint_dir is None
    if temporary:
        checkpoint_dir = Path(tempfile.mkdtemp(prefix="ghist_fit_"))
    else:
        checkpoint_dir = Path(checkpoint_dir)
        _warn_if_old_checkpoints(checkpoint_dir, resume)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    monitor, mode = ("val_score", "max") if has_val else ("train_loss_epoch", "min")
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="best-{epoch:03d}",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        # After the epoch's history row is written, so that a checkpoint carries the whole history.
        save_on_train_epoch_end=True,
    )
    # Lightning 2.6's `save_last` writes `last.ckpt` only in epochs that improve the monitored score, which would
    # make a resume restart from the best epoch rather than the last one: a second, unmonitored checkpoint does it.
    last = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    history = EpochHistory()
    callbacks: list[Callback] = [checkpoint, last, history, pixel_size_recorder(spec.pixel_size)]
    if run.early_stopping and has_val:
        patience = run.patience
        if patience is None:
            steps_per_epoch = math.ceil(len(tiles.train) / batch_size)
            patience = max(10, math.ceil(PATIENCE_STEPS / steps_per_epoch))
        # strict=False: a step budget that ends inside an epoch ends it before its validation, without a score.
        callbacks.append(
            EarlyStopping(monitor="val_score", mode="max", patience=patience, check_finite=False, strict=False)
        )
    if run.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    extra = trainer_kwargs.pop("callbacks", None) or []
    callbacks.extend([extra] if isinstance(extra, Callback) else extra)

    on_cpu, on_cuda = device.type == "cpu", device.type == "cuda"
    precision = run.precision
    if precision is None:
        # Not bf16 on CPUs even where native: results would then depend on the CPU (see the docstring).
        precision = "bf16-mixed" if on_cuda and _cuda_has_bf16() else "32-true"
    # NHWC convolutions are what oneDNN (CPU) and cuDNN's tensor cores run fastest, above all in mixed precision.
    model.network.to(memory_format=torch.channels_last)
    budget = ", ".join(
        f"{name} {value}"
        for name, value in (("max_steps", max_steps), ("max_epochs", run.max_epochs), ("max_time", run.max_time))
        if value is not None
    )
    logger.info(
        "Training GHIST (width=%d, precision %s, %s) on %d tiles, validating on %d; checkpoints in %s",
        spec.width,
        precision,
        budget,
        len(tiles.train),
        len(tiles.val),
        checkpoint_dir,
    )
    if isinstance(run.strategy, str) and "ddp" in run.strategy and device.type == "cuda":
        # Per-process batches are small: batch-norm statistics over all processes' tiles, as one process would see
        # (torch synchronises batch norm on GPUs only).
        trainer_kwargs.setdefault("sync_batchnorm", True)
    try:
        with _quiet_lightning():
            trainer = L.Trainer(
                accelerator=lightning_accelerator(device),
                devices=run.devices,
                strategy=run.strategy,
                precision=precision,
                max_steps=-1 if max_steps is None else max_steps,
                # -1: no epoch limit (Lightning's None would mean 1000 epochs)
                max_epochs=-1 if run.max_epochs is None else run.max_epochs,
                max_time=run.max_time,
                callbacks=callbacks,
                logger=CSVLogger(checkpoint_dir, name="logs"),
                enable_progress_bar=run.progress,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                log_every_n_steps=1,
                deterministic=True if on_cpu else "warn",
                default_root_dir=checkpoint_dir,
                **trainer_kwargs,
            )
            trainer.fit(
                module,
                train_loader,
                val_loader,
                ckpt_path=None if resume is None else str(resume),
                # Lightning unpickles checkpoints fully by default; tensors and plain containers are all ghist stores.
                weights_only=True,
            )

        best = checkpoint.best_model_path or last.best_model_path
        best_epoch = None
        if best:
            state = _read_checkpoint(best)
            module.load_state_dict(state["state_dict"])
            best_epoch = int(state.get("epoch", -1))
    finally:
        if temporary:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    check_finite_weights(model.network, run.lr)
    if run.readout:
        train_eval = _eval_loader(tiles.train, batch_size, num_workers)
        fit_model_readout(model, train_eval, val_loader, device, spot_supervised=tiles.spots_key is not None)
    if val_loader is not None:
        calibrate_uncertainty(model, val_loader, device)
    model.network.cpu().to(memory_format=torch.contiguous_format)
    model.uncertainty_head.cpu()
    frame = history.frame()
    model._mark_trained(best_epoch, frame)
    logger.info(
        "Finished training after %d optimisation steps: best epoch %s (%s=%s)%s",
        trainer.global_step,
        best_epoch,
        monitor,
        _fmt(checkpoint.best_model_score),
        f"; removed the temporary checkpoints in {checkpoint_dir}" if temporary else "",
    )
    warn_if_weak(frame, best_epoch, trainer.global_step, model.n_types)
    return model


def _eval_loader(dataset: Any, batch_size: int, num_workers: int) -> Any:
    """Batches of ``dataset`` in order, as validation and the post-hoc fits read them."""
    from torch.utils.data import DataLoader

    from .._model._data import collate_tiles, worker_context

    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_tiles,
        num_workers=num_workers,
        multiprocessing_context=worker_context(num_workers),
    )


def _check_max_time(max_time: Any) -> Any:
    """``max_time`` checked as fit checks it (for the command line's ``--max-time``)."""
    from .._model._spec import check_max_time

    return check_max_time("max_time", max_time)


def _check_trainer_kwargs(trainer_kwargs: Mapping[str, Any], trainer_class: Any) -> None:
    """Keywords neither fit nor Lightning's Trainer knows are refused now, naming the nearest of fit's options."""
    import difflib
    import inspect

    known = set(inspect.signature(trainer_class.__init__).parameters) - {"self"}
    unknown = sorted(set(trainer_kwargs) - known)
    if unknown:
        options = list(inspect.signature(fit).parameters)
        hints = {name: difflib.get_close_matches(name, options, n=1) for name in unknown}
        said = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
        raise TypeError(f"`fit` got unknown keyword arguments {said}; neither fit nor Lightning's Trainer takes them.")


def _warn_if_old_checkpoints(checkpoint_dir: Path, resume: str | os.PathLike | None) -> None:
    """Say so when a run is about to replace the checkpoints of another run (not the one it resumes)."""
    if not checkpoint_dir.is_dir():
        return
    old = sorted(p.name for p in checkpoint_dir.glob("*.ckpt"))
    resuming_here = resume is not None and Path(resume).resolve().parent == checkpoint_dir.resolve()
    if old and not resuming_here:
        logger.warning(
            "`checkpoint_dir` %s already holds checkpoints of an earlier run (%s); `last.ckpt` will be replaced.",
            checkpoint_dir,
            ", ".join(old),
        )


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of :func:`fit`, read with ``torch.load(..., weights_only=True)`` (no code runs).

    Raises
    ------
    ValueError
        The file is empty, truncated, not a checkpoint, or holds objects other than tensors and plain containers
        (the message names the file).

    """
    from .._model._safe_load import safe_torch_load

    expected = "a Lightning checkpoint written by `ghist.tl.fit` (e.g. `<checkpoint_dir>/last.ckpt`)"
    path = Path(path)
    state = safe_torch_load(path, what="Checkpoint", expected=expected)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict) or "epoch" not in state:
        raise ValueError(f"Checkpoint {str(path)!r} has no `state_dict` and `epoch`; expected {expected}.")
    return state


def _reference_matrix(
    reference: AnnData | None, groupby: str | None, genes: Sequence[str], reference_profiles
) -> tuple[np.ndarray | None, list[str] | None]:
    if reference is None:
        if groupby is not None:
            raise ValueError("`reference_groupby` was given without a `reference`.")
        return None, None
    if not isinstance(reference, AnnData):
        raise TypeError(f"`reference` must be an AnnData, got {type(reference).__name__}.")
    if groupby is not None:
        reference = reference_profiles(reference, groupby, genes=list(genes))
    check_genes(reference.var_names, list(genes), where="the reference (`reference.var_names`)")
    matrix = reference[:, list(genes)].X
    matrix = np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float32)
    from .._validation import check_profiles  # finite, not all zero

    check_profiles(matrix, [str(n) for n in reference.obs_names], where="The reference profiles (`reference`)")
    if matrix.max() > 20:
        raise ValueError(
            f"The reference profiles reach {matrix.max():.0f}, which looks like raw counts; expected log1p-scale "
            "profiles from `ghist.pp.reference_profiles` (or pass single cells with `reference_groupby`)."
        )
    return matrix, [str(n) for n in reference.obs_names]


def _cuda_has_bf16() -> bool:
    """Native bfloat16 on the current CUDA device (Ampere, compute capability 8, and later).

    ``torch.cuda.is_bf16_supported()`` also answers True where bfloat16 is only emulated (e.g. a V100), which
    would make mixed precision slower than float32 there.
    """
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


class _quiet_lightning:
    """Silence Lightning's informational banners (accelerator, TPU, tips) and warnings that ghist handles itself."""

    def __init__(self):
        self._levels: dict[str, int] = {}
        self._warnings = warnings.catch_warnings()

    def __enter__(self):
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            log = logging.getLogger(name)
            self._levels[name] = log.level
            log.setLevel(logging.WARNING)
        self._warnings.__enter__()
        for pattern in _LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
