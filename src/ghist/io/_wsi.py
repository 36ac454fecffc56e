"""Whole-slide image files (SVS, NDPI, OME-TIFF, generic pyramidal TIFF) as lazy multiscale SpatialData images."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import GLOBAL_CS, IMAGE_KEY, MICRONS_CS
from .._validation import check_number

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

WSI_ATTRS_KEY = "ghist_wsi"  # ``sdata.attrs`` entry describing the slide file
_FORMATS = "Aperio SVS, Hamamatsu NDPI, OME-TIFF, Philips/Leica/Ventana TIFF and generic pyramidal TIFF"


def read_wsi(
    path: str | os.PathLike,
    *,
    pixel_size: float | None = None,
    image_key: str = IMAGE_KEY,
    chunk_size: int = 2048,
    max_levels: int | None = None,
) -> SpatialData:
    """Open a whole-slide H&E file as a lazy, multiscale SpatialData image with a ``"microns"`` coordinate system.

    Every pyramid level stored in the file becomes one scale of the image (``scale0`` is full resolution), read
    lazily with dask straight from the file's tiles (:mod:`tiffslide`, which builds on :mod:`tifffile`): opening a
    100k x 80k px slide reads only its metadata. The full-resolution pixel grid is the ``"global"`` coordinate
    system (identity); ``"microns"`` scales it by the pixel size read from the file (``mpp`` of SVS/NDPI,
    ``PhysicalSizeX/Y`` of OME-TIFF, the TIFF resolution tags) or given as ``pixel_size``.

    The result is ready for :func:`ghist.pp.detect_tissue`, :func:`ghist.pp.segment_nuclei` and
    :func:`ghist.tl.predict`, which read the pyramid level that matches the model's pixel size.

    Parameters
    ----------
    path
        A slide file readable by :mod:`tiffslide`: {formats}. (MRXS and other non-TIFF formats need an
        OpenSlide-based reader, e.g. convert them to OME-TIFF first.)
    pixel_size
        µm per pixel at full resolution. Overrides the file's metadata (a warning says so when they differ); required
        when the file has none.
    image_key
        Key of the image in the returned ``sdata.images``.
    chunk_size
        Side of the dask chunks, in pixels (a multiple of the file's tile size reads whole tiles).
    max_levels
        Keep at most this many pyramid levels (the finest ones); default: all.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with ``images[image_key]``: RGB ``uint8``, dims ``(c, y, x)``, one scale per
    slide level, coordinate systems ``"global"`` (full-resolution pixels) and ``"microns"``.
    ``sdata.attrs["ghist_wsi"]`` records the file, its vendor, the pixel size and its source, the level shapes and
    downsamples.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.io.read_wsi("TCGA-XX-0000.svs")  # doctest: +SKIP
    >>> ghist.pp.detect_tissue(sdata)  # doctest: +SKIP
    >>> ghist.pp.segment_nuclei(sdata, roi_key="tissue")  # doctest: +SKIP
    >>> ghist.tl.predict(sdata, roi_key="tissue")  # doctest: +SKIP

    """
    import dask.array as da
    import xarray as xr
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale, set_transformation

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No slide file at {str(path)!r}.")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; expected a slide file ({_FORMATS}).")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 64:
        raise ValueError(f"`chunk_size` must be an integer >= 64 pixels; got {chunk_size!r}.")
    if max_levels is not None and (
        isinstance(max_levels, bool) or not isinstance(max_levels, int | np.integer) or max_levels < 1
    ):
        raise ValueError(f"`max_levels` must be a positive integer or None; got {max_levels!r}.")
    check_number("pixel_size", pixel_size, optional=True)

    slide = _open(path)
    mpp, source = _pixel_size(slide, path, pixel_size)
    group = slide.zarr_group
    n_levels = slide.level_count if max_levels is None else min(slide.level_count, int(max_levels))
    levels = []
    for i in range(n_levels):
        array = group[str(i)] if n_levels > 1 or str(i) in group else group
        levels.append(_level_array(array, path, i, chunk_size, da))
    scales = {
        f"scale{i}": xr.Dataset({"image": xr.DataArray(level, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})})
        for i, level in enumerate(levels)
    }
    image = xr.DataTree.from_dict(scales)
    transformations = {GLOBAL_CS: Identity(), MICRONS_CS: Scale([mpp[0], mpp[1]], axes=("y", "x"))}
    set_transformation(image, transformations, set_all=True)
    Image2DModel().validate(image)
    sdata = SpatialData(images={image_key: image})
    sdata.attrs[WSI_ATTRS_KEY] = {
        "path": str(path),
        "vendor": slide.properties.get("tiffslide.vendor"),
        "pixel_size_yx": [float(mpp[0]), float(mpp[1])],
        "pixel_size_source": source,
        "objective_power": slide.properties.get("tiffslide.objective-power"),
        "level_shapes": [list(level.shape[1:]) for level in levels],
        "level_downsamples": [float(d) for d in slide.level_downsamples[:n_levels]],
    }
    logger.info(
        "Opened %s: %d x %d px at %.4g µm/px (%s), %d level(s)",
        path.name,
        levels[0].shape[2],
        levels[0].shape[1],
        math.sqrt(mpp[0] * mpp[1]),
        source,
        len(levels),
    )
    return sdata


read_wsi.__doc__ = read_wsi.__doc__.replace("{formats}", _FORMATS)


def _open(path: Path) -> Any:
    import tiffslide

    try:
        return tiffslide.TiffSlide(path)
    except Exception as err:  # tifffile raises several types for files that are not TIFF
        raise ValueError(f"Cannot read {str(path)!r} as a slide file ({_FORMATS}): {err}") from err


def _pixel_size(slide: Any, path: Path, pixel_size: float | None) -> tuple[tuple[float, float], str]:
    """µm per pixel (y, x) at full resolution, and where it came from."""
    x, y = slide.properties.get("tiffslide.mpp-x"), slide.properties.get("tiffslide.mpp-y")
    if x is None and y is None:
        x, y = _ome_pixel_size(slide)
    found = None
    if x is not None or y is not None:
        x = float(x if x is not None else y)
        y = float(y if y is not None else x)
        found = (y, x) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y) else None
    if pixel_size is not None:
        given = (float(pixel_size), float(pixel_size))
        if found is not None and not np.allclose(found, given, rtol=0.01):
            logger.warning(
                "%s: using pixel_size=%.4g µm/px instead of the file's %.4g x %.4g µm/px.",
                path.name,
                pixel_size,
                found[1],
                found[0],
            )
        return given, "argument"
    if found is None:
        raise ValueError(
            f"{str(path)!r} holds no pixel size (no MPP, OME PhysicalSize or TIFF resolution); pass "
            "`pixel_size=` (µm per pixel at full resolution, e.g. 0.25 for a 40x scan, 0.5 for 20x)."
        )
    return found, "file"


_UM_PER_UNIT = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_pixel_size(slide: Any) -> tuple[float | None, float | None]:
    """``PhysicalSizeX/Y`` of the first OME image in µm (``None`` where absent or in an unknown unit)."""
    import tifffile

    tif = getattr(slide, "ts_tifffile", None)
    if tif is None or not tif.is_ome or not tif.ome_metadata:
        return None, None
    try:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    except (KeyError, ValueError, TypeError):
        return None, None
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        factor = _UM_PER_UNIT.get(str(pixels.get(f"PhysicalSize{axis}Unit", "µm")))
        return None if value is None or factor is None else float(value) * factor

    return size("X"), size("Y")


def _level_array(array: Any, path: Path, level: int, chunk_size: int, da: Any) -> Any:
    """One pyramid level as a dask array ``(c, y, x)`` of RGB ``uint8``."""
    if array.ndim == 2:
        raise ValueError(f"{str(path)!r} level {level} is greyscale ({array.shape}); expected an RGB H&E slide.")
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(
            f"{str(path)!r} level {level} has shape {array.shape}; expected (y, x, 3) RGB or (y, x, 4) RGBA."
        )
    if np.dtype(array.dtype) != np.uint8:
        raise ValueError(f"{str(path)!r} level {level} has dtype {array.dtype}; expected uint8 RGB.")
    data = da.from_zarr(array, chunks=(chunk_size, chunk_size, array.shape[-1]))
    # RGBA slides keep the colour; alpha marks scanned vs unscanned areas, which are white (glass) already.
    return data[..., :3].transpose(2, 0, 1)
