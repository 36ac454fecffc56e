"""`ghist.tl.fit`: train a GHIST network on cut tiles with Lightning."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from anndata import AnnData

from .._validation import check_genes

if TYPE_CHECKING:
    from .._model import GHISTModel
    from ..pp import TileSet

logger = logging.getLogger(__name__)


def fit(
    tiles: TileSet,
    *,
    reference: AnnData | None = None,
    reference_groupby: str | None = None,
    cell_type_groups: Mapping[str, Sequence[str]] | None = None,
    width: int = 64,
    embed_dim: int = 256,
    max_epochs: int = 50,
    max_time: str | timedelta | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    color_jitter: float = 0.0,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str = "auto",
    precision: str | int | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
    **trainer_kwargs: Any,
) -> GHISTModel:
    """Train the GHIST network on tiles cut by :func:`ghist.pp.make_tiles`.

    Trains on the training band with AdamW (learning rate decaying linearly to 0 over the budget, the
    larger fraction used of ``max_epochs`` and ``max_time``), random flips and 90° rotations; after every epoch
    it scores the validation band (mean gene Pearson plus cell-type macro F1), writes a checkpoint, and at
    the end keeps the weights of the best epoch.

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
    width
        Channels of the first backbone level; 64 is the published architecture (29M parameters), 16-32 train
        quickly on a CPU.
    embed_dim
        Size of the per-cell embedding.
    max_epochs
        Maximum number of passes over the training tiles.
    max_time
        Wall-clock budget, e.g. ``"00:20:00"`` (``"DD:HH:MM:SS"`` or ``"HH:MM:SS"``) or a :class:`~datetime.timedelta`.
    batch_size
        Tiles per optimisation step.
    lr, weight_decay
        AdamW settings.
    augment
        Random flips and 90° rotations of training tiles.
    color_jitter
        With ``augment``, also scale and shift each training tile's standardised colour channels by random amounts
        up to this fraction (e.g. ``0.1``), so that stain differences between slides are not learnt; 0: off.
    accelerator, devices, strategy, precision
        ``accelerator`` is one of ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"mps"`` (``"auto"``: CUDA, then
        MPS, then the CPU, as :func:`ghist.tl.predict` chooses); the device it resolves to, ``devices``, ``strategy``
        and ``precision`` go to :class:`lightning.pytorch.Trainer`: e.g. ``accelerator="gpu", devices=4,
        strategy="ddp"`` or ``precision="16-mixed"``. ``precision=None`` picks ``"bf16-mixed"`` where bfloat16 is
        native: CPUs with AVX512-BF16 or AMX (about 3x faster training than float32) and CUDA GPUs from Ampere on
        (1.7x on an H200 at width 64, 256-px tiles); ``"32-true"`` elsewhere.
    seed
        Seed of weights, tile order and augmentation; the same seed gives the same model on the CPU.
    checkpoint_dir
        Where checkpoints (``last.ckpt`` after every epoch, and the best epoch) and the metrics CSV go; a new
        temporary directory by default.
    resume
        A checkpoint (e.g. ``<checkpoint_dir>/last.ckpt``) to continue training from. It is read with
        ``torch.load(..., weights_only=True)``: a checkpoint holding anything but tensors and plain containers (e.g.
        state of a user callback that pickles objects) is refused with a ``ValueError`` rather than unpickled.
    num_workers
        DataLoader worker processes.
    progress
        Show a progress bar.
    **trainer_kwargs
        Other :class:`lightning.pytorch.Trainer` arguments; ``callbacks=[...]`` are run after ghist's own
        (checkpointing, history, progress bar).

    Returns
    -------
    The trained :class:`ghist.GHISTModel` (weights of the best validation epoch; ``history_`` holds the per-epoch
    metrics).

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(image_size=256, n_genes=20, seed=0)
    >>> tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type", tile_size=64)
    >>> model = ghist.tl.fit(tiles, width=4, embed_dim=16, max_epochs=1, progress=False)  # doctest: +SKIP

    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from .._model import GHISTModel
    from .._model._data import collate_tiles
    from .._model._device import lightning_accelerator, resolve_device
    from .._model._module import EpochHistory, GHISTModule
    from ..pp import TileSet, reference_profiles

    if not isinstance(tiles, TileSet):
        raise TypeError(f"`tiles` must be a ghist TileSet from `ghist.pp.make_tiles`, got {type(tiles).__name__}.")
    if len(tiles.train) == 0:
        raise ValueError(f"{tiles!r}\nhas no training tiles; cut more tiles or use fewer folds.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if isinstance(color_jitter, bool) or not isinstance(color_jitter, int | float) or not 0 <= color_jitter < 1:
        raise ValueError(f"`color_jitter` must be a fraction in [0, 1), got {color_jitter!r}.")
    device = resolve_device(accelerator)
    if resume is not None:
        if not Path(resume).exists():
            raise FileNotFoundError(f"Checkpoint to resume from not found: {str(resume)!r}.")
        _read_checkpoint(resume)  # refuse a damaged or unsafe checkpoint before any training starts
    if isinstance(max_time, str):
        max_time = _parse_duration(max_time)

    profiles, profile_names = _reference_matrix(reference, reference_groupby, tiles.genes, reference_profiles)

    L.seed_everything(seed, workers=True, verbose=False)
    model = GHISTModel(
        tiles.genes,
        tiles.cell_types,
        reference=profiles,
        reference_names=profile_names,
        cell_type_groups=cell_type_groups,
        width=width,
        embed_dim=embed_dim,
        tile_size=tiles.tile_size,
        mean=tiles.mean,
        std=tiles.std,
        pixel_size=tiles.pixel_size,
    )
    module = GHISTModule(
        model.network,
        expr_scale=model.expr_scale,
        lr=lr,
        weight_decay=weight_decay,
        augment=augment,
        seed=seed,
        color_jitter=color_jitter,
    )

    train_loader = DataLoader(
        tiles.train,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_tiles,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
    has_val = len(tiles.val) > 0
    val_loader = (
        DataLoader(tiles.val, batch_size=batch_size, collate_fn=collate_tiles, num_workers=num_workers)
        if has_val
        else None
    )
    if not has_val:
        logger.warning("No validation tiles: the last epoch is kept instead of the best validation epoch.")

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="ghist_fit_"))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    monitor, mode = ("val_score", "max") if has_val else ("train_loss_epoch", "min")
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="best-{epoch:03d}",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
    )
    history = EpochHistory()
    callbacks: list[Callback] = [checkpoint, history]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    extra = trainer_kwargs.pop("callbacks", None) or []
    callbacks.extend([extra] if isinstance(extra, Callback) else extra)

    on_cpu, on_cuda = device.type == "cpu", device.type == "cuda"
    if precision is None:
        native_bf16 = _cpu_has_bf16() if on_cpu else on_cuda and _cuda_has_bf16()
        precision = "bf16-mixed" if native_bf16 else "32-true"
    # NHWC convolutions are what oneDNN (CPU) and cuDNN's tensor cores run fastest, above all in mixed precision.
    model.network.to(memory_format=torch.channels_last)
    trainer = L.Trainer(
        accelerator=lightning_accelerator(device),
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_epochs=max_epochs,
        max_time=max_time,
        callbacks=callbacks,
        logger=CSVLogger(checkpoint_dir, name="logs"),
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic=True if on_cpu else "warn",
        default_root_dir=checkpoint_dir,
        **trainer_kwargs,
    )
    logger.info(
        "Training GHIST (width=%d, %s) on %d tiles, validating on %d; checkpoints in %s",
        width,
        precision,
        len(tiles.train),
        len(tiles.val),
        checkpoint_dir,
    )
    with _quiet_lightning(not progress):
        trainer.fit(
            module,
            train_loader,
            val_loader,
            ckpt_path=None if resume is None else str(resume),
            # Lightning unpickles checkpoints fully by default; tensors and plain containers are all ghist stores.
            weights_only=True,
        )

    best = checkpoint.best_model_path or checkpoint.last_model_path
    best_epoch = None
    if best:
        state = _read_checkpoint(best)
        module.load_state_dict(state["state_dict"])
        best_epoch = int(state.get("epoch", -1))
    model.network.cpu().to(memory_format=torch.contiguous_format)
    model._mark_trained(best_epoch, history.frame())
    logger.info("Finished training: best epoch %s (%s=%s)", best_epoch, monitor, _fmt(checkpoint.best_model_score))
    return model


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of :func:`fit`, read with ``torch.load(..., weights_only=True)`` (no code runs).

    Raises
    ------
    ValueError
        The file is empty, truncated, not a checkpoint, or holds objects other than tensors and plain containers
        (the message names the file).

    """
    import torch

    from .._model._model import load_error_reason

    expected = "a Lightning checkpoint written by `ghist.tl.fit` (e.g. `<checkpoint_dir>/last.ckpt`)"
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"Checkpoint {str(path)!r} is empty; expected {expected}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, garbage and refused pickles raise many types
        raise ValueError(
            f"Checkpoint {str(path)!r} cannot be read safely (with `weights_only=True`) as {expected} "
            f"({load_error_reason(err)})."
        ) from err
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
    if not np.isfinite(matrix).all():
        raise ValueError("The reference profiles contain NaN or infinite values.")
    if matrix.max() > 20:
        raise ValueError(
            f"The reference profiles reach {matrix.max():.0f}, which looks like raw counts; expected log1p-scale "
            "profiles from `ghist.pp.reference_profiles` (or pass single cells with `reference_groupby`)."
        )
    return matrix, [str(n) for n in reference.obs_names]


def _cpu_has_bf16() -> bool:
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _cuda_has_bf16() -> bool:
    """Native bfloat16 on the current CUDA device (Ampere, compute capability 8, and later).

    ``torch.cuda.is_bf16_supported()`` also answers True where bfloat16 is only emulated (e.g. a V100), which
    would make mixed precision slower than float32 there.
    """
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _parse_duration(text: str) -> timedelta:
    parts = text.split(":")
    if not 3 <= len(parts) <= 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"`max_time` {text!r} is not 'HH:MM:SS' or 'DD:HH:MM:SS'.")
    values = [int(p) for p in parts]
    days = values[0] if len(values) == 4 else 0
    hours, minutes, seconds = values[-3:]
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


class _quiet_lightning:
    """Silence Lightning's informational banner (accelerator, TPU, ...) when progress is off."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._levels: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
                log = logging.getLogger(name)
                self._levels[name] = log.level
                log.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
