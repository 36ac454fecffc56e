"""The pixel size a model is trained at: from the tiles or the user, checked, and recorded in checkpoints for resume."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._constants import CKPT_PIXEL_SIZE_KEY
from .._spatial import SAME_PIXEL_SIZE_TOLERANCE, check_pixel_size

if TYPE_CHECKING:
    from ..pp import TileSet

logger = logging.getLogger("ghist.tl._fit")


def model_pixel_size(tiles: TileSet, pixel_size: float | None) -> float:
    """The model's µm per pixel: the tiles' own (checked against ``pixel_size`` when both exist), else ``pixel_size``.

    A model without a pixel size would make :func:`ghist.tl.predict` cut slides at whatever resolution they come
    in, so training without one is refused.
    """
    check_pixel_size(pixel_size, optional=True)
    known = tiles.pixel_size
    if known is None:
        if pixel_size is None:
            raise ValueError(
                f"The pixel size (µm per pixel) of the tiles' images is unknown: no sample of {tiles.path} had a "
                "'microns' coordinate system, and a model must know its pixel size so that `ghist.tl.predict` "
                "reads new slides at the same resolution. Pass it: `ghist.tl.fit(tiles, pixel_size=<µm per pixel>)`, "
                "or give the images (and labels) a 'microns' coordinate system before `ghist.pp.make_tiles`, e.g. "
                "`set_transformation(sdata.images['he'], Scale([p, p], axes=('y', 'x')), 'microns')` from "
                "`spatialdata.transformations`."
            )
        return float(pixel_size)
    if pixel_size is not None and abs(pixel_size / known - 1) > SAME_PIXEL_SIZE_TOLERANCE:
        raise ValueError(
            f"`pixel_size={pixel_size:g}` differs from the pixel size the tiles were cut at ({known:.4g} µm/px, from "
            f"the images' 'microns' coordinate system) by more than {SAME_PIXEL_SIZE_TOLERANCE:.0%}. Leave "
            "`pixel_size=None`, or cut the tiles at the size you want with `ghist.pp.make_tiles(..., pixel_size=)`."
        )
    unknown = [name for name, size in zip(tiles.samples, tiles.pixel_sizes, strict=True) if size is None]
    if unknown:
        logger.warning(
            "Samples %s have no 'microns' coordinate system: assumed to be at the other samples' %.4g µm/px.",
            unknown,
            known,
        )
    return float(known)


def check_resumed_pixel_size(state: Mapping[str, Any], resume: str | os.PathLike, pixel_size: float) -> None:
    trained_at = state.get(CKPT_PIXEL_SIZE_KEY)
    if trained_at is not None and abs(pixel_size / float(trained_at) - 1) > SAME_PIXEL_SIZE_TOLERANCE:
        raise ValueError(
            f"Checkpoint {str(resume)!r} was trained at {float(trained_at):.4g} µm/px, but this run's pixel size is "
            f"{pixel_size:.4g} µm/px (`pixel_size={pixel_size:g}` or the tiles' own); resume with the tiles and "
            "`pixel_size` of that run."
        )


def pixel_size_recorder(pixel_size: float) -> Any:
    """A callback writing ``pixel_size`` into every checkpoint, so that a resumed run can check it."""
    from lightning.pytorch.callbacks import Callback

    class _RecordPixelSize(Callback):
        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            checkpoint[CKPT_PIXEL_SIZE_KEY] = float(pixel_size)

    return _RecordPixelSize()
