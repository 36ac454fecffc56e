"""Whole-slide image files (SVS, NDPI, OME-TIFF, generic pyramidal TIFF) as lazy multiscale SpatialData images."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import GLOBAL_CS, IMAGE_KEY, MICRONS_CS, WSI_ATTRS_KEY
from .._spatial import PIXEL_SIZE_RANGE_UM, check_pixel_size, is_plausible_pixel_size
from .._validation import check_int
from ._backends import (
    OpenedSlide,
    _formats,
    choose_backend,
    finite_or_none,
    open_slide,
    resolution_tags,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

# Attribute of each level's DataArray: the file's own tile (h, w), the smallest unit a read decodes (bounds the cost
# of strided reads of a single-level slide).
READ_BLOCK_ATTR = "ghist_read_block"


def read_wsi(
    path: str | os.PathLike,
    *,
    pixel_size: float | None = None,
    image_key: str = IMAGE_KEY,
    chunk_size: int = 2048,
    max_levels: int | None = None,
    backend: str = "auto",
) -> SpatialData:
    """Open a whole-slide H&E file as a lazy, multiscale SpatialData image with a ``"microns"`` coordinate system.

    Every pyramid level stored in the file becomes one scale of the image (``scale0`` is full resolution), read
    lazily with dask straight from the file's tiles: opening a 100k x 80k px slide reads only its metadata. The
    full-resolution pixel grid is the ``"global"`` coordinate system (identity); ``"microns"`` scales it by the
    pixel size read from the file (``mpp`` of SVS/NDPI, ``PhysicalSizeX/Y`` of OME-TIFF, the TIFF resolution tags)
    or given as ``pixel_size``.

    Two libraries decode the files: :mod:`tiffslide` (built on :mod:`tifffile`; installed with ghist) for the TIFF
    family, and OpenSlide (the optional extra ``pip install "ghist[openslide]"``) for MRXS, VMS/VMU, SVSlide, DICOM
    and, when installed, Leica SCN and Ventana BIF. Whichever reads the file, the levels, the pixel size and its
    checks are the same. A pixel size from the file outside the plausible range of a microscope
    (:data:`ghist._spatial.PIXEL_SIZE_RANGE_UM`, 0.05-20 µm/px; e.g. 84.7 µm/px from the 300-dpi resolution tags of
    an image saved by an editor) is not used: pass ``pixel_size=``. A tile that does not decode (a truncated or
    corrupt file) raises :class:`ghist.io.SlideReadError` naming the file, level and tile when it is read.

    The result is ready for :func:`ghist.pp.detect_tissue`, :func:`ghist.pp.segment_nuclei` and
    :func:`ghist.tl.predict`, which read the pyramid level that matches the model's pixel size.

    Parameters
    ----------
    path
        A slide file: {formats}. Zeiss CZI, Leica LIF, Olympus VSI, Nikon ND2 and Philips iSyntax need Bio-Formats
        or the vendor's tools: convert them to a pyramidal OME-TIFF first.
    pixel_size
        µm per pixel at full resolution, within 0.05-20. Overrides the file's metadata, unreadable metadata included
        (a warning says so when they differ); required when the file has none, or none that is plausible.
    image_key
        Key of the image in the returned ``sdata.images``.
    chunk_size
        Side of the dask chunks, in pixels (a multiple of the file's tile size reads whole tiles).
    max_levels
        Keep at most this many pyramid levels (the finest ones); default: all.
    backend
        ``"auto"`` (by file type: OpenSlide for the formats only it reads, and for SCN/BIF when installed; tiffslide
        for the rest, OpenSlide if tiffslide cannot open the file), ``"tiffslide"``, ``"openslide"`` or
        ``"bioformats"`` (not bundled: the error says how to convert the file).

    Returns
    -------
    A :class:`spatialdata.SpatialData` with ``images[image_key]``: RGB ``uint8``, dims ``(c, y, x)``, one scale per
    slide level, coordinate systems ``"global"`` (full-resolution pixels) and ``"microns"``.
    ``sdata.attrs["ghist_wsi"]`` records the file, the backend that read it, its vendor, the pixel size and its
    source, the level shapes and downsamples.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ImportError
        The file type (or ``backend="openslide"``) needs OpenSlide and it is not installed; the message names the
        extra.
    ValueError
        The file is not a readable RGB slide, holds no plausible pixel size and ``pixel_size`` is not given, or an
        argument is invalid.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.io.read_wsi("TCGA-XX-0000.svs")  # doctest: +SKIP
    >>> ghist.pp.detect_tissue(sdata)  # doctest: +SKIP
    >>> ghist.pp.segment_nuclei(sdata, roi_key="tissue")  # doctest: +SKIP
    >>> ghist.tl.predict(sdata, roi_key="tissue")  # doctest: +SKIP

    """
    import xarray as xr
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale, set_transformation

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No slide file at {str(path)!r}.")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; expected a slide file ({_formats()}).")
    check_int("chunk_size", chunk_size, 64)
    check_int("max_levels", max_levels, 1, optional=True)
    if pixel_size is not None:
        pixel_size = check_pixel_size(pixel_size)
    choose_backend(path, backend)  # a bad or missing backend is named before the file is touched

    slide = open_slide(path, backend)
    mpp, source = _pixel_size(slide, path, pixel_size)
    n_levels = len(slide.levels) if max_levels is None else min(len(slide.levels), int(max_levels))
    levels = [_level_array(slide, i, chunk_size) for i in range(n_levels)]
    scales = {
        f"scale{i}": xr.Dataset(
            {
                "image": xr.DataArray(
                    level,
                    dims=("c", "y", "x"),
                    coords={"c": ["r", "g", "b"]},
                    attrs={READ_BLOCK_ATTR: list(slide.read_blocks[i])} if i < len(slide.read_blocks) else {},
                )
            }
        )
        for i, level in enumerate(levels)
    }
    image = xr.DataTree.from_dict(scales)
    transformations = {GLOBAL_CS: Identity(), MICRONS_CS: Scale([mpp[0], mpp[1]], axes=("y", "x"))}
    set_transformation(image, transformations, set_all=True)
    Image2DModel().validate(image)
    sdata = SpatialData(images={image_key: image})
    sdata.attrs[WSI_ATTRS_KEY] = {
        "path": str(path),
        "backend": slide.backend,
        "vendor": slide.vendor,
        "pixel_size_yx": [float(mpp[0]), float(mpp[1])],
        "pixel_size_source": source,
        "objective_power": slide.objective_power,
        "level_shapes": [list(level.shape[1:]) for level in levels],
        "level_downsamples": [float(d) for d in slide.downsamples[:n_levels]],
    }
    logger.info(
        "Opened %s with %s: %d x %d px at %.4g µm/px (%s), %d level(s)",
        path.name,
        slide.backend,
        levels[0].shape[2],
        levels[0].shape[1],
        math.sqrt(mpp[0] * mpp[1]),
        source,
        len(levels),
    )
    return sdata


read_wsi.__doc__ = read_wsi.__doc__.replace("{formats}", _formats())


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _pixel_size(slide: OpenedSlide, path: Path, pixel_size: float | None) -> tuple[tuple[float, float], str]:
    """µm per pixel (y, x) at full resolution, and where it came from; ``pixel_size`` wins over any metadata."""
    if pixel_size is not None:
        try:
            found = _file_pixel_size(slide)
        except Exception as err:  # whatever the metadata holds, the argument replaces it
            logger.debug("%s: pixel-size metadata unreadable (%s); using pixel_size=%s", path.name, err, pixel_size)
            found = None
        plausible = found is not None and all(is_plausible_pixel_size(v) for v in found)
        if plausible and not np.allclose(found, (pixel_size, pixel_size), rtol=0.01):
            logger.warning(
                "%s: using pixel_size=%.4g µm/px instead of the file's %.4g x %.4g µm/px.",
                path.name,
                pixel_size,
                found[1],
                found[0],
            )
        return (pixel_size, pixel_size), "argument"
    found = _file_pixel_size(slide)
    if found is None:
        raise ValueError(
            f"{str(path)!r} holds no pixel size (no MPP, OME PhysicalSize or TIFF resolution); pass "
            "`pixel_size=` (µm per pixel at full resolution, e.g. 0.25 for a 40x scan, 0.5 for 20x)."
        )
    if not (is_plausible_pixel_size(found[0]) and is_plausible_pixel_size(found[1])):
        tags = resolution_tags(path)
        why = f"from its TIFF resolution tags, {tags}: a print or screen resolution" if tags else "from its metadata"
        lo, hi = PIXEL_SIZE_RANGE_UM
        message = (
            f"{str(path)!r}: the file's pixel size, {found[1]:.4g} x {found[0]:.4g} µm/px ({why}), is not a microscope "
            f"pixel size ({lo}-{hi} µm/px), so it is not used; pass `pixel_size=` (µm per pixel at full resolution, "
            "e.g. 0.25 for a 40x scan, 0.5 for 20x)."
        )
        logger.warning(message)
        raise ValueError(message)
    return found, "file"


def _file_pixel_size(slide: OpenedSlide) -> tuple[float, float] | None:
    """(y, x) µm per pixel from the backend's MPP, else the OME PhysicalSize; ``None`` when neither is usable."""
    x, y = (finite_or_none(v) for v in slide.mpp)
    if x is None and y is None:
        x, y = _ome_pixel_size(slide.path)
    if x is None and y is None:
        return None
    x = x if x is not None else y
    y = y if y is not None else x
    return (y, x)


_UM_PER_UNIT = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_pixel_size(path: Path) -> tuple[float | None, float | None]:
    """``PhysicalSizeX/Y`` of the first OME image in µm (``None`` where absent, unparseable or in an unknown unit)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.is_ome or not tif.ome_metadata:
                return None, None
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
    except Exception:  # not a TIFF, or OME-XML that does not parse: no pixel size from it
        return None, None

    def size(axis: str) -> float | None:
        value = finite_or_none(pixels.get(f"PhysicalSize{axis}"))
        factor = _UM_PER_UNIT.get(str(pixels.get(f"PhysicalSize{axis}Unit", "µm")))
        return None if value is None or factor is None else value * factor

    return size("X"), size("Y")


def _level_array(slide: OpenedSlide, level: int, chunk_size: int) -> Any:
    """One pyramid level as a dask array ``(c, y, x)`` of RGB ``uint8``, read chunk by chunk through its guard."""
    import dask.array as da
    from dask.base import tokenize

    array, path = slide.levels[level], slide.path
    if array.shape[-1] == 1:
        raise ValueError(f"{str(path)!r} level {level} is greyscale ({array.shape[:2]}); expected an RGB H&E slide.")
    if array.shape[-1] not in (3, 4):
        raise ValueError(
            f"{str(path)!r} level {level} has shape {array.shape}; expected (y, x, 3) RGB or (y, x, 4) RGBA."
        )
    if np.dtype(array.dtype) != np.uint8:
        raise ValueError(f"{str(path)!r} level {level} has dtype {array.dtype}; expected uint8 RGB.")
    stat = path.stat()
    name = "ghist-wsi-" + tokenize(
        str(path.resolve()), stat.st_mtime_ns, stat.st_size, slide.backend, level, chunk_size
    )
    data = da.from_array(array, chunks=(chunk_size, chunk_size, array.shape[-1]), name=name, asarray=True, fancy=False)
    # RGBA slides keep the colour; alpha marks scanned vs unscanned areas, which are white (glass) already.
    return data[..., :3].transpose(2, 0, 1)
