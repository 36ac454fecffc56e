"""The declared settings of a GHIST model and of one training run: each option's default, range and documentation.

Two frozen dataclasses, in the way scvi-tools separates a model's settings from ``train()``'s:

- :class:`ArchitectureSpec`: what a model *is* (network sizes, heads, input scale). Set once when the model is
  built, saved in ``model.json`` (``init_params``), checked again whenever a file is loaded.
- :class:`TrainingSpec`: how one :func:`ghist.tl.fit` run trains it (budget, optimiser, augmentation, devices).
  Not saved: it describes a run, not the model.

Each field is declared with :func:`option`: its default, its check (type, range, finiteness; the check is the one
place that range lives) and its documentation, from which the Parameters sections of :func:`ghist.tl.fit` and
:class:`ghist.GHISTModel` are written. :func:`ghist.tl.fit`'s keywords are the fields marked ``fit=True`` of both
classes (see :func:`fit_options`); adding an option means one field here and the code that uses it.

This module is imported when ``ghist.tl`` is (for fit's signature and docstring), so it does not import torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import numpy as np

from .._constants import EXPR_SCALE
from .._validation import SEED_RANGE, check_seed

_SAME = object()  # `fit_default`: the field's own default

#: What :class:`lightning.pytorch.Trainer` accepts as ``precision`` (``None``: ghist chooses).
PRECISIONS = (
    "32-true",
    "32",
    32,
    "bf16-mixed",
    "bf16-true",
    "bf16",
    "16-mixed",
    "16-true",
    "16",
    16,
    "64-true",
    "64",
    64,
    "transformer-engine",
    "transformer-engine-float16",
    None,
)
#: Largest backbone width: 256 is about 460M parameters (2 GB of float32 weights), four times the published 64.
MAX_WIDTH = 256
#: Largest per-cell embedding.
MAX_EMBED_DIM = 4096
#: Tile sides the network accepts: five levels halve a tile four times, and batch norm needs more than one value
#: per channel at the deepest; above the maximum one batch of tiles alone would need gigabytes.
TILE_SIZE_RANGE = (32, 2048)
#: Most neighbours the context may average over.
MAX_CONTEXT_NEIGHBOURS = 256
#: Largest scale of the network's expression target relative to ``log1p`` counts.
MAX_EXPR_SCALE = 1000.0
#: The output non-linearities by name (``_model/_network.OUTPUT_ACTIVATIONS`` holds their functions) and the one
#: decision of which a model gets when none is chosen: softplus with cell-level targets, relu under spot supervision.
OUTPUT_ACTIVATION_CHOICES = ("relu", "softplus")
DEFAULT_OUTPUT_ACTIVATION = {"cells": "softplus", "spots": "relu"}


def default_output_activation(spots: bool) -> str:
    """The output activation of a model trained on spots (``spots=True``) or on cells when none is chosen."""
    return DEFAULT_OUTPUT_ACTIVATION["spots" if spots else "cells"]


class SettingError(ValueError):
    """A setting of :class:`ArchitectureSpec` or :class:`TrainingSpec` out of its type or range."""


class SettingTypeError(SettingError, TypeError):
    """A setting of the wrong type where no value of it could be read as one (e.g. a string for a flag)."""


# ------------------------------------------------------------------------------------------------------ checks
def _integer(low: int, high: int | None = None, *, optional: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> int | None:
        if optional and value is None:
            return None
        ok = not isinstance(value, bool | np.bool_) and isinstance(value, numbers.Integral)
        if not ok or value < low:
            raise SettingError(
                f"`{name}` must be an integer >= {low}{' (or None)' if optional else ''}, got {value!r}."
            )
        if high is not None and value > high:
            raise SettingError(f"`{name}` must be an integer <= {high}, got {value!r}.")
        return int(value)

    return check


def _number(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
    if math.isinf(high):
        span = f"{'>' if open_low else '>='} {low:g}"
    else:
        span = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def check(name: str, value: Any) -> float:
        ok = not isinstance(value, bool | np.bool_) and isinstance(value, numbers.Real) and math.isfinite(value)
        if ok:
            value = float(value)
            ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
        if not ok:
            raise SettingError(f"`{name}` must be a finite number {span}, got {value!r}.")
        return value

    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise SettingTypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def _one_of(*choices: Any) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise SettingError(f"`{name}` must be one of {list(choices)}; got {value!r}.")
        return value

    return check


def _channels(low: float, high: float, *, open_low: bool = False) -> Callable[[str, Any], tuple[float, ...]]:
    each = _number(low, high, open_low=open_low)

    def check(name: str, value: Any) -> tuple[float, ...]:
        if isinstance(value, str | bytes) or not hasattr(value, "__len__") or len(value) != 3:
            raise SettingError(f"`{name}` must hold 3 channel statistics (R, G, B), got {value!r}.")
        return tuple(each(f"{name}[{i}]", v) for i, v in enumerate(value))

    return check


def _pixel_size(name: str, value: Any) -> float | None:
    from .._spatial import check_pixel_size

    try:
        return check_pixel_size(value, name, optional=True)
    except ValueError as err:
        raise SettingError(str(err)) from None


def _seed(name: str, value: Any) -> int:
    try:
        return check_seed(value, name)
    except ValueError as err:
        raise SettingError(str(err)) from None


def check_max_time(name: str, value: Any) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(":")
        if not 3 <= len(parts) <= 4 or not all(p.strip().isdigit() for p in parts):
            raise SettingError(f"`{name}` {value!r} is not 'HH:MM:SS' or 'DD:HH:MM:SS'.")
        numbers_ = [int(p) for p in parts]
        days = numbers_[0] if len(numbers_) == 4 else 0
        parsed = timedelta(days=days, hours=numbers_[-3], minutes=numbers_[-2], seconds=numbers_[-1])
    elif isinstance(value, timedelta):
        parsed = value
    else:
        raise SettingError(
            f"`{name}` must be a string 'HH:MM:SS' (or 'DD:HH:MM:SS') or a datetime.timedelta, got {value!r} "
            f"({type(value).__name__}); e.g. '00:10:00' for ten minutes."
        )
    if parsed.total_seconds() < 1:
        raise SettingError(f"`{name}` must allow at least one step (1 second or more), got {value!r}.")
    return parsed


def _loss_weights(name: str, value: Any) -> dict[str, float]:
    from ._losses import check_loss_weights

    return check_loss_weights(value)


def _accelerator(name: str, value: Any) -> str:
    from ._device import ACCELERATORS

    if not isinstance(value, str) or value not in ACCELERATORS:
        raise SettingError(f"`{name}` must be one of {list(ACCELERATORS)}; got {value!r}.")
    return value


def _lightning(name: str, value: Any) -> Any:
    """Passed to Lightning as given (it checks devices and strategies against the machine)."""
    return value


def option(
    default: Any,
    doc: str,
    check: Callable[[str, Any], Any],
    *,
    fit: bool = True,
    fit_default: Any = _SAME,
    legacy: Any = _SAME,
    annotation: str = "Any",
) -> Any:
    """Declare one setting: its default, its ``check(name, value) -> value`` and its documentation.

    ``fit``: :func:`ghist.tl.fit` takes it as a keyword (``fit_default`` when fit's default differs, e.g. ``None``
    for "fit chooses"); otherwise fit sets it itself. ``legacy``: the value a model saved before the setting existed
    was trained with (default: ``default``). ``annotation``: the type shown in fit's signature.
    """
    meta = {"doc": doc, "check": check, "fit": fit, "fit_default": fit_default, "legacy": legacy, "type": annotation}
    return dataclasses.field(default=default, metadata=meta)


class _Spec:
    """Shared behaviour of the two specs: checked on construction, JSON out, numpydoc text."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    @classmethod
    def build(cls, **settings: Any):
        """The spec from keyword settings, refusing unknown names with the known ones."""
        unknown = sorted(set(settings) - set(cls.names()))
        if unknown:
            raise TypeError(f"Unknown {cls.__name__} settings {unknown}; expected some of {cls.names()}.")
        return cls(**settings)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any):
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def docs(cls, *, fit: bool | None = None) -> str:
        """The numpydoc Parameters entries of the fields (``fit``: only those fit takes, or only those it does not)."""
        fields = [f for f in dataclasses.fields(cls) if fit is None or f.metadata["fit"] == fit]
        return "\n".join(f"{f.name}\n{_indent(f.metadata['doc'])}" for f in fields)


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else line for line in inspect.cleandoc(text).splitlines())


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec(_Spec):
    """What a GHIST model is: set when it is built, saved with it (``model.json``), checked again on loading."""

    width: int = option(
        64,
        f"""Channels of the first backbone level, at most {MAX_WIDTH}; 64 is the published architecture (29M
        parameters), 16-32 train quickly on a CPU.""",
        _integer(1, MAX_WIDTH),
        annotation="int",
    )
    embed_dim: int = option(
        256,
        f"Size of the per-cell embedding (at most {MAX_EMBED_DIM}).",
        _integer(1, MAX_EMBED_DIM),
        annotation="int",
    )
    tile_size: int = option(
        256,
        f"""Side of the square tiles the network sees, in pixels ({TILE_SIZE_RANGE[0]} to {TILE_SIZE_RANGE[1]});
        :func:`ghist.tl.fit` takes the tiles' own.""",
        _integer(*TILE_SIZE_RANGE),
        fit=False,
    )
    mean: tuple[float, float, float] = option(
        (0.0, 0.0, 0.0),
        """Per-channel mean (0-255 scale) used to standardise H&E tiles; :func:`ghist.tl.fit` takes the tiles'
        own.""",
        _channels(0.0, 255.0),
        fit=False,
    )
    std: tuple[float, float, float] = option(
        (1.0, 1.0, 1.0),
        """Per-channel standard deviation (0-255 scale, > 0) used to standardise H&E tiles; :func:`ghist.tl.fit`
        takes the tiles' own.""",
        _channels(0.0, 255.0, open_low=True),
        fit=False,
    )
    pixel_size: float | None = option(
        None,
        """µm per pixel of the training images, which :func:`ghist.tl.predict` resamples every slide to (within
        the plausible microscope range of ``ghist._spatial.PIXEL_SIZE_RANGE_UM``). In :func:`ghist.tl.fit`, needed
        only when the tiles do not know it (their images had no ``"microns"`` coordinate system): training without
        it raises a ``ValueError``. When the tiles know it, a value more than 5% off is refused and the tiles' own
        is kept. With ``resume``, it must be the one the checkpoint was trained at.""",
        _pixel_size,
        annotation="float | None",
    )
    expr_scale: float = option(
        EXPR_SCALE,
        f"The network learns ``expr_scale * log1p(counts)`` (at most {MAX_EXPR_SCALE:g}).",
        _number(0.0, MAX_EXPR_SCALE, open_low=True),
        fit=False,
    )
    context_neighbours: int = option(
        0,
        f"""Neighbourhood context: with ``k > 0`` (at most {MAX_CONTEXT_NEIGHBOURS}) each cell's embedding is mixed
        with the mean embedding of its ``k`` nearest cells (nucleus centroids) before the expression and cell-type
        heads, through a small MLP that starts as the identity. Neighbours are the cells of the same tile; in
        :func:`ghist.tl.predict` each cell is predicted from the tile where it lies farthest from the edges, so its
        neighbours across tile borders are in view (predict reports how often that held:
        ``uns["ghist"]["context_in_view"]``). 0 (default): no context (see ``docs/benchmarks.md``, "Training
        options").""",
        _integer(0, MAX_CONTEXT_NEIGHBOURS),
        annotation="int",
    )
    output_activation: str = option(
        DEFAULT_OUTPUT_ACTIVATION["cells"],
        """Non-linearity that keeps predicted expression non-negative: ``"softplus"`` or ``"relu"``. With ReLU a
        gene whose pre-activation turns negative in every cell gets no gradient again and is predicted 0
        everywhere; softplus never predicts an exact zero, which a spot, the sum of its cells, may need.
        :func:`ghist.tl.fit`'s ``None`` (its default) picks ``"softplus"`` with cell-level targets and ``"relu"``
        with spot supervision, the better of the two in each (``docs/benchmarks.md``). Saved with the model;
        models saved before it existed load with ``"relu"``.""",
        _one_of(*OUTPUT_ACTIVATION_CHOICES),
        fit_default=None,
        legacy="relu",
        annotation="str | None",
    )
    morphometrics: bool = option(
        False,
        """Also feed each nucleus' size (``log1p`` of its area in pixels) and texture (the spread of the first
        backbone level's features over its pixels) to the cell embedding, whose other input, means over the
        nucleus, is blind to size. Off by default (no measured gain yet); models saved before it existed load
        without.""",
        _flag,
        annotation="bool",
    )
    cell_offset: bool = option(
        False,
        """Add a direct path from each cell's embedding to its genes in the expression heads. With a
        ``reference`` the first estimate is a mixture of reference profiles, and the refinement sees only that
        mixture and the tile: two cells of one type with the same mixture get the same expression, whatever their
        nuclei look like. Off by default until more seeds confirm its gain; models saved before it existed load
        without.""",
        _flag,
        annotation="bool",
    )
    readout: bool = option(
        False,
        """The network holds a residual readout (:class:`~ghist._model._readout.ResidualReadout`), a linear
        correction from each cell's embedding that :func:`ghist.tl.fit` fits after training (its own
        ``readout``); models saved before it existed load without.""",
        _flag,
        fit=False,
    )

    @classmethod
    def from_saved(cls, params: Mapping[str, Any]) -> ArchitectureSpec:
        """The spec of a saved model's ``init_params`` (genes and the other vocabularies removed).

        A setting the file does not name gets the value models saved before it existed were trained with;
        unknown names and values out of range are refused with a ``ValueError``.
        """
        unknown = sorted(set(params) - set(cls.names()))
        if unknown:
            raise SettingError(f"unknown model settings {unknown}; expected some of {cls.names()}.")
        filled = dict(params)
        for f in dataclasses.fields(cls):
            if f.name not in filled:
                filled[f.name] = f.default if f.metadata["legacy"] is _SAME else f.metadata["legacy"]
        return cls(**filled)


@dataclasses.dataclass(frozen=True)
class TrainingSpec(_Spec):
    """How one :func:`ghist.tl.fit` run trains a model (not saved with it)."""

    max_steps: int | None = option(
        None,
        """Maximum number of optimisation steps (batches); ``None``: no step limit if ``max_epochs`` or
        ``max_time`` is given, else 3,000 (``ghist.tl._fit.DEFAULT_MAX_STEPS``).""",
        _integer(1, optional=True),
        annotation="int | None",
    )
    max_epochs: int | None = option(
        None,
        "Maximum number of passes over the training tiles; ``None``: no epoch limit.",
        _integer(1, optional=True),
        annotation="int | None",
    )
    max_time: timedelta | None = option(  # noqa: RUF009 (`option` returns a dataclasses.field)
        None,
        """Wall-clock budget of training, e.g. ``"00:20:00"`` (``"DD:HH:MM:SS"`` or ``"HH:MM:SS"``) or a
        :class:`~datetime.timedelta` (a bare number is refused: its unit would be a guess). With ``resume``, the
        time already used by the run resumed counts.""",
        check_max_time,
        annotation="str | timedelta | None",
    )
    early_stopping: bool = option(
        True,
        "Stop when the validation score has not improved for ``patience`` epochs (not without validation tiles).",
        _flag,
        annotation="bool",
    )
    patience: int | None = option(
        None,
        """Epochs without improvement before stopping early; ``None``: the epochs of about 500 optimisation steps,
        at least 10.""",
        _integer(1, optional=True),
        annotation="int | None",
    )
    batch_size: int = option(8, "Tiles per optimisation step.", _integer(1), annotation="int")
    lr: float = option(
        1e-3,
        """AdamW learning rate (decays linearly to 0 over the budget). Training stops with a
        ``TrainingDivergedError`` at the first non-finite loss: lower it then.""",
        _number(0.0, open_low=True),
        annotation="float",
    )
    weight_decay: float = option(1e-4, "AdamW weight decay (>= 0).", _number(0.0), annotation="float")
    augment: bool = option(True, "Random flips and 90° rotations of training tiles.", _flag, annotation="bool")
    color_jitter: float = option(
        0.0,
        """With ``augment``, also scale and shift each training tile's standardised colour channels by random
        amounts up to this fraction in [0, 1) (e.g. ``0.1``), so that stain differences between slides are not
        learnt; 0: off.""",
        _number(0.0, 1.0, open_high=True),
        annotation="float",
    )
    stain_jitter: float = option(
        0.0,
        """With ``augment``, also rescale and shift each training tile's haematoxylin, eosin and DAB
        concentrations (colour deconvolution) by random fractions up to this value in [0, 1) (``0.05``: Tellez et
        al.'s "light" HED augmentation), for robustness to staining and scanners of unseen sections; 0: off. The
        bundled model is trained with 0.05 (``docs/benchmarks.md``).""",
        _number(0.0, 1.0, open_high=True),
        annotation="float",
    )
    loss_weights: Mapping[str, float] | None = option(
        None,
        """Weights of the loss terms, overriding :data:`ghist._model._losses.DEFAULT_LOSS_WEIGHTS` (e.g.
        ``{"expr_pearson": 1.0}`` adds one minus the mean per-gene Pearson correlation over each batch's measured
        cells, which weighs every gene the same whatever its variance; ``{"pixel": 0.0}`` drops a term). Finite,
        >= 0.""",
        _loss_weights,
        annotation="Mapping[str, float] | None",
    )
    readout: bool = option(
        True,
        """After training, fit a linear correction of each cell's predicted expression from its embedding in
        closed form: ridge regression of the training cells' residuals (measured minus predicted) on the
        embedding, each gene's penalty chosen on the validation cells, no correction for a gene where none helps
        there (see ``ghist._model._readout``). It is saved with the model; ``model.readout_`` reports the genes
        corrected and the validation error before and after. Needs per-cell targets and validation tiles:
        skipped, with a log line, under spot supervision or without validation tiles. The embedding carries
        within-type signal (nucleus size, context) that the expression heads, trained by SGD within the budget,
        hardly read.""",
        _flag,
        annotation="bool",
    )
    seed: int = option(
        0,
        f"""Seed of weights, tile order and augmentation, in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]; the same seed
        gives the same model on the CPU.""",
        _seed,
        annotation="int",
    )
    accelerator: str = option(
        "auto",
        """One of ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"mps"`` (``"auto"``: CUDA, then MPS, then the
        CPU, as :func:`ghist.tl.predict` chooses); the device it resolves to, ``devices``, ``strategy`` and
        ``precision`` go to :class:`lightning.pytorch.Trainer`: e.g. ``accelerator="gpu", devices=4,
        strategy="ddp"`` or ``precision="16-mixed"``. Data-parallel training (``strategy="ddp"``, several GPUs or
        nodes through Lightning, or ``devices=2, accelerator="cpu"`` with gloo) splits each epoch's tiles between
        the processes, scores validation over all of them and, on GPUs, synchronises batch norm
        (``sync_batchnorm=True`` unless given); ``batch_size`` is per process. From a notebook use
        ``strategy="ddp_notebook"``; on a cluster, launch the script as Lightning documents (``srun``).""",
        _accelerator,
        annotation="str",
    )
    devices: Any = option(  # noqa: RUF009 (`option` returns a dataclasses.field)
        "auto", "Devices Lightning trains on (see ``accelerator``).", _lightning, annotation="int | str | Sequence[int]"
    )
    strategy: Any = option(  # noqa: RUF009
        "auto", "Lightning's training strategy (see ``accelerator``).", _lightning, annotation="str"
    )
    precision: str | int | None = option(
        None,
        """Lightning's precision (see ``accelerator``). ``None`` picks ``"bf16-mixed"`` on CUDA GPUs from Ampere on
        and ``"32-true"`` everywhere else, so that a seed gives the same model on any CPU. ``"bf16-mixed"`` on a
        CPU with AVX512-BF16 or AMX trains faster per step but may learn less per step at small widths: compare on
        your data before relying on it (``docs/benchmarks.md``).""",
        _one_of(*PRECISIONS),
        annotation="str | int | None",
    )
    num_workers: int = option(0, "DataLoader worker processes.", _integer(0), annotation="int")
    progress: bool = option(
        True, "Show a progress bar (Lightning's banners and tips are never shown).", _flag, annotation="bool"
    )


def fit_options() -> list[dataclasses.Field]:
    """The spec fields :func:`ghist.tl.fit` takes as keywords, architecture first; names are unique."""
    fields = [f for cls in (ArchitectureSpec, TrainingSpec) for f in dataclasses.fields(cls) if f.metadata["fit"]]
    names = [f.name for f in fields]
    assert len(names) == len(set(names)), names  # one keyword, one meaning
    return fields


def split_fit_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], TrainingSpec, dict[str, Any]]:
    """Fit's keywords -> ``(architecture settings, the checked TrainingSpec, the rest for Lightning's Trainer)``.

    The one place where fit's keyword API maps onto the specs. Architecture settings are returned unchecked: fit
    completes them from the tiles (tile size, statistics, pixel size, the activation's default) before building
    the :class:`ArchitectureSpec`.
    """
    arch_names = {f.name for f in dataclasses.fields(ArchitectureSpec) if f.metadata["fit"]}
    train_names = {f.name for f in dataclasses.fields(TrainingSpec) if f.metadata["fit"]}
    defaults = {f.name: _fit_default(f) for f in fit_options()}
    arch = {k: options.get(k, defaults[k]) for k in arch_names}
    training = TrainingSpec(**{k: options.get(k, defaults[k]) for k in train_names})
    rest = {k: v for k, v in options.items() if k not in arch_names | train_names}
    return arch, training, rest


def _fit_default(f: dataclasses.Field) -> Any:
    return f.default if f.metadata["fit_default"] is _SAME else f.metadata["fit_default"]


def with_fit_options(func: Callable) -> Callable:
    """Give ``func(..., **options)`` the spec's fit keywords in its signature and docstring.

    The signature lists fit's own parameters, then every field of :func:`fit_options` (keyword-only, with fit's
    default), then ``**trainer_kwargs``; the docstring's ``{fit_options}`` becomes the fields' documentation.
    """
    signature = inspect.signature(func)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    spec = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=_fit_default(f), annotation=f.metadata["type"]
        )
        for f in fit_options()
    ]
    rest = inspect.Parameter("trainer_kwargs", inspect.Parameter.VAR_KEYWORD, annotation="Any")
    func.__signature__ = signature.replace(parameters=[*own, *spec, rest])  # type: ignore[attr-defined]
    if func.__doc__:
        docs = "\n".join(cls.docs(fit=True) for cls in (ArchitectureSpec, TrainingSpec))
        func.__doc__ = inspect.cleandoc(func.__doc__).replace("{fit_options}", docs)
    return func


def model_docs() -> str:
    """The Parameters entries of :class:`ArchitectureSpec`, for :class:`ghist.GHISTModel`'s docstring."""
    return ArchitectureSpec.docs()
