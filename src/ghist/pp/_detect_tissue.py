"""Tissue detection on a low-resolution level of an H&E slide, as polygons that restrict segmentation and prediction."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import IMAGE_KEY, TISSUE_KEY
from .._docs import doc_image_key, doc_params

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_MAX_OTSU = 0.1  # saturation: glass is ~0.02, the palest stroma ~0.1; Otsu above that would cut tissue in two
_FALLBACK_SIDE = 2048  # working image side when the slide has no pixel size
# Bounds that keep tissue detection in bounded time and memory whatever the slide: the working image has at most
# _MAX_WORKING_PX pixels (coarser than `resolution` beyond that, with a warning); a level of up to _MAX_DENSE_PX pixels
# is averaged down whole (a single-level 40k x 40k scan: a minute or so); a larger one (no pyramid level near the
# working resolution) is sampled at a stride, one pixel per working pixel, so that at most _READ_BUDGET_PX pixels of
# file tiles are decoded (only the tiles that hold a sample).
_MAX_WORKING_PX = 2**26
_MAX_DENSE_PX = 2**31
_READ_BUDGET_PX = 2**28
_MIN_WORKING_SIDE = 4
PYRAMID_HINT = (
    "write the slide as a tiled pyramid, e.g. `vips tiffsave slide.tif pyramid.tif --tile --pyramid "
    "--compression jpeg --Q 90 --bigtiff`, or with tifffile (`TiffWriter.write(level0, subifds=n, tile=(512, 512))` "
    "then each downsampled level with `subfiletype=1`), and read that with `ghist.io.read_wsi`"
)


@doc_params(image_key=doc_image_key)
def detect_tissue(
    sdata: SpatialData,
    *,
    image_key: str = IMAGE_KEY,
    key_added: str = TISSUE_KEY,
    resolution: float = 8.0,
    threshold: float | str = "otsu",
    min_area_um2: float = 20_000.0,
    closing_um: float = 40.0,
    overwrite: bool = False,
) -> gpd.GeoDataFrame:
    """Find the tissue of an H&E slide: polygons around stained areas, from a low-resolution pyramid level.

    A slide is mostly glass; segmentation and prediction restricted to the tissue (``roi_key=key_added``) skip it.
    The image is read at about ``resolution`` µm per pixel (the coarsest pyramid level that is at least that fine,
    averaged down further if needed), so a whole TCGA slide costs a few seconds. A pixel is tissue when its colour
    saturation (HSV ``S``: glass is grey-white, H&E stains are coloured) exceeds ``threshold``; the mask is closed
    over ``closing_um``, its holes (lumens, fat) are filled and pieces smaller than ``min_area_um2`` are dropped.
    Each remaining piece becomes one polygon in the image's full-resolution pixel space, with the image's
    coordinate transformations.

    Parameters
    ----------
    sdata
        SpatialData holding the H&E image (multiscale images use their pyramid).
    {image_key}
    key_added
        Key of the new shapes element in ``sdata.shapes``.
    resolution
        µm per pixel of the working image. Without a ``"microns"`` coordinate system, the image is worked on at
        about 2048 px on its longer side and the µm arguments are read as full-resolution pixels.
    threshold
        Saturation in ``[0, 1]`` above which a pixel is tissue, or ``"otsu"``: Otsu's threshold of the working
        image's saturation, capped at 0.1 so that pale tissue stays in on slides that are mostly tissue.
    min_area_um2
        Smallest tissue piece kept, in µm².
    closing_um
        Gaps narrower than about this (µm) between stained areas are closed.
    overwrite
        Replace an existing ``sdata.shapes[key_added]``.

    Returns
    -------
    The tissue polygons (columns ``area_um2`` or ``area_px``), also added as ``sdata.shapes[key_added]`` (and to
    the Zarr store backing ``sdata``, all or nothing). Without
    any tissue: an empty frame, nothing written, and a warning.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=0)
    >>> tissue = ghist.pp.detect_tissue(sdata)
    >>> ghist.tl.predict(sdata, model, roi_key="tissue")  # doctest: +SKIP

    """
    import geopandas as gpd
    import shapely
    from scipy import ndimage as ndi
    from skimage import measure, morphology
    from skimage.filters import threshold_otsu
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    from .._spatial import check_pixel_size, image_pixel_size
    from .._validation import check_number, get_image, raster_levels, require_key
    from .._write import check_writable, write_element

    get_image(sdata, image_key)  # RGB uint8 (c, y, x) or raise
    element = require_key(sdata, "images", image_key)
    check_writable(sdata, key_added, "shapes", overwrite=overwrite)  # memory and the backing store, before any work
    check_pixel_size(resolution, "resolution")
    check_number("min_area_um2", min_area_um2, positive=False)
    check_number("closing_um", closing_um, positive=False)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"`threshold` must be 'otsu' or a saturation in [0, 1]; got {threshold!r}.")
    elif isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise ValueError(f"`threshold` must be 'otsu' or a saturation in [0, 1]; got {threshold!r}.")

    pixel_size = image_pixel_size(sdata, image_key)
    levels = [(dx, array) for _, dx, array in raster_levels(element)]
    full_h, full_w = levels[0][1].shape[1:]
    target = resolution / pixel_size if pixel_size else max(1.0, max(full_h, full_w) / _FALLBACK_SIDE)
    target = _check_target(target, full_h, full_w, resolution, pixel_size, image_key)
    um = pixel_size or 1.0  # µm per full-resolution pixel (1: the µm arguments are pixels)
    rgb, factor = _working_image(levels, target, image_key)

    saturation = _saturation(rgb)
    cut = min(float(threshold_otsu(saturation)), _MAX_OTSU) if threshold == "otsu" else float(threshold)
    mask = saturation > cut
    px_um = um * factor  # µm per working pixel (y and x)
    radius = round(closing_um / px_um / 2)
    if radius > 0:  # padded so that tissue touching the border is closed like any other
        closed = ndi.binary_closing(np.pad(mask, radius), structure=morphology.disk(radius))
        mask = closed[radius:-radius, radius:-radius]
    mask = ndi.binary_fill_holes(mask)
    pieces, n_pieces = ndi.label(mask)
    sizes = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    mask = (sizes >= min_area_um2 / px_um**2)[pieces] & (pieces > 0)

    polygons = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.uint8), 0.5):
        if len(contour) < 4:
            continue
        # contour vertices lie between working pixels; working pixel (i, j) covers full-res [j*f, (j+1)*f)
        xy = (contour[:, ::-1] - 1 + 0.5) * factor
        polygon = shapely.make_valid(shapely.Polygon(xy)).buffer(0)
        if not polygon.is_empty and polygon.area * um**2 >= min_area_um2:
            polygons.append(polygon)
    polygons = _drop_nested(polygons)
    area = np.array([p.area for p in polygons], dtype=np.float64) * (um**2 if pixel_size else 1.0)
    frame = gpd.GeoDataFrame({"area_um2" if pixel_size else "area_px": area}, geometry=polygons)
    transformations = get_transformation(element, get_all=True)
    if frame.empty:
        logger.warning(
            "No tissue found in %r (saturation threshold %.3g): nothing added to `sdata.shapes`; check the image or "
            "pass a lower `threshold`.",
            image_key,
            cut,
        )
        return frame
    shapes = ShapesModel.parse(frame, transformations=transformations)
    shapes = write_element(sdata, key_added, shapes, overwrite=overwrite)
    fraction = frame.geometry.area.sum() / float(full_h * full_w)
    logger.info(
        "Added `sdata.shapes[%r]`: %d tissue piece(s) covering %.0f%% of %r (worked at %.3g µm/px, saturation > %.3g)",
        key_added,
        len(frame),
        100 * fraction,
        image_key,
        px_um if pixel_size else float("nan"),
        cut,
    )
    return shapes


def _check_target(
    target: float, full_h: int, full_w: int, resolution: float, pixel_size: float | None, image_key: str
) -> float:
    """Full-resolution pixels per working pixel, checked against the image: named errors, bounded working size."""
    if target < 1 / 1.001:
        raise ValueError(
            f"`resolution={resolution!r}` µm/px is finer than image {image_key!r} itself ({pixel_size:.4g} µm/px): "
            f"tissue detection works on a coarser copy; pass a resolution of at least {pixel_size:.4g} (default 8)."
        )
    target = max(target, 1.0)
    if min(full_h, full_w) / target < _MIN_WORKING_SIDE:
        what = f"{resolution!r} µm/px" if pixel_size else f"{target:.4g} px"
        raise ValueError(
            f"Image {image_key!r} ({full_h} x {full_w} px) is under {_MIN_WORKING_SIDE} working pixels across at "
            f"`resolution={what}`: pass a finer `resolution`."
        )
    coarsest = math.sqrt(full_h * full_w / _MAX_WORKING_PX)
    if target < coarsest:
        logger.warning(
            "Image %r (%d x %d px) at `resolution=%s` would be a working image of %.3g Gpx: detecting tissue at %.3g "
            "full-resolution px per working px instead.",
            image_key,
            full_h,
            full_w,
            resolution,
            full_h * full_w / target**2 / 1e9,
            coarsest,
        )
        target = coarsest
    return target


def _read_block(array: Any) -> tuple[int, int]:
    """The smallest block a read of ``array`` decodes: the file's tile (recorded by read_wsi), else a dask chunk."""
    from ..io._wsi import READ_BLOCK_ATTR

    block = array.attrs.get(READ_BLOCK_ATTR)
    if block is not None and len(block) == 2:
        return int(block[0]), int(block[1])
    chunks = getattr(array.data, "chunks", None)
    if chunks is not None and len(chunks) == 3:
        return int(max(chunks[1])), int(max(chunks[2]))
    return 1, 1  # in memory: reading a pixel costs a pixel


def _working_image(levels: list[tuple[float, Any]], target: float, image_key: str) -> tuple[np.ndarray, float]:
    """RGB float image ``(3, h, w)`` in [0, 1] at about ``target`` full-resolution pixels per pixel, and its factor.

    The coarsest level at least as fine as ``target`` is averaged down by whole blocks; a level too large to read
    whole (a single-level giant slide) is sampled at a stride instead, so that at most :data:`_READ_BUDGET_PX` of
    its pixels are decoded.
    """
    import dask.array as da

    downsample, array = [pair for pair in levels if pair[0] <= target * 1.001][-1]
    k = max(1, int(target / downsample))
    data = array.data if hasattr(array.data, "dask") else da.from_array(np.asarray(array.data))
    h, w = data.shape[1:]
    if h * w > _MAX_DENSE_PX:
        bh, bw = _read_block(array)
        samples = max(1, _READ_BUDGET_PX // (bh * bw))  # each sample decodes at most one block
        stride = max(k, math.ceil(math.sqrt(h * w / samples)))
        if min(h, w) // stride < _MIN_WORKING_SIDE:
            raise ValueError(
                f"Image {image_key!r} has no pyramid level coarse enough for tissue detection ({h} x {w} px stored "
                f"in blocks of {bh} x {bw} px): reading it would decode {h * w / 1e9:.3g} Gpx. Make a pyramid: "
                f"{PYRAMID_HINT}."
            )
        logger.warning(
            "Image %r: %d x %d px with no pyramid level near the working resolution; tissue detected from one pixel "
            "every %d (a coarse mask, from at most %.2g Gpx decoded). For a full mask, %s.",
            image_key,
            h,
            w,
            stride,
            _READ_BUDGET_PX / 1e9,
            PYRAMID_HINT,
        )
        sampled = data[:, stride // 2 :: stride, stride // 2 :: stride]
        return np.asarray(sampled.compute(), dtype=np.float32) / 255.0, downsample * stride
    if k > 1:
        data = da.coarsen(np.mean, data.astype(np.float32), {1: k, 2: k}, trim_excess=True)
    rgb = np.asarray(data.compute() if hasattr(data, "compute") else data, dtype=np.float32) / 255.0
    return rgb, downsample * k


def _saturation(rgb: np.ndarray) -> np.ndarray:
    high, low = rgb.max(axis=0), rgb.min(axis=0)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)


def _drop_nested(polygons: list) -> list:
    """Holes are filled, so a contour inside another polygon is the outline of a filled hole: drop it."""
    import shapely

    polygons = sorted(polygons, key=lambda p: -p.area)
    kept: list = []
    for polygon in polygons:
        if not any(shapely.contains(outer, polygon.representative_point()) for outer in kept):
            kept.append(polygon)
    return kept
