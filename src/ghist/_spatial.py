"""Coordinate helpers shared by tiling (:func:`ghist.pp.make_tiles`) and prediction (:func:`ghist.tl.predict`).

Conventions
-----------
A raster element's *intrinsic* (pixel) space is continuous: pixel ``(row i, col j)`` covers the square
``[j, j + 1) x [i, i + 1)`` and its centre is ``(j + 0.5, i + 0.5)``, as in spatialdata. Matrices here are
3x3 homogeneous affines acting on ``(x, y, 1)`` column vectors. Resampling labels into an image's pixel
space takes, for every image pixel, the label pixel that contains the image pixel's centre (nearest
neighbour, never blending instance ids).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation
from xarray import DataArray

from ._constants import GLOBAL_CS, MICRONS_CS

logger = logging.getLogger(__name__)

_XY = ("x", "y")
# Relative pixel-size difference under which an image is used on its own grid, without resampling (scanners of one
# magnification differ by a few percent): the one rule for training tiles and prediction.
SAME_PIXEL_SIZE_TOLERANCE = 0.05
# Tolerance for treating a matrix entry as an exact integer / zero; also the nudge applied before flooring so that a
# pixel centre that lands on a label-pixel edge up to round-off goes consistently to the higher pixel.
_EPS = 1e-6


def working_scale(image_pixel_size: float, target_pixel_size: float) -> float:
    """Working pixels per image pixel for reading an image at ``target_pixel_size`` µm per pixel.

    Within :data:`SAME_PIXEL_SIZE_TOLERANCE` of the image's own size, 1 (no resampling). Within it of a whole
    downsampling factor ``k`` (e.g. 2.75 µm/px from a 0.688 µm/px scan, 3.997 -> 4), ``1 / k``: the working pixels
    are then exact ``k x k`` blocks, as pyramid levels and hand downsampling make them, rather than fractional
    areas whose sub-pixel phase drifts across the slide, which costs accuracy (``docs/benchmarks.md``). Otherwise
    the exact ratio. The one rule of
    :func:`ghist.pp.make_tiles` (``pixel_size=``) and :func:`ghist.tl.predict`.

    Examples
    --------
    >>> working_scale(0.688, 2.75)
    0.25
    >>> working_scale(0.5, 0.51)
    1.0

    """
    ratio = image_pixel_size / target_pixel_size
    if abs(ratio - 1) <= SAME_PIXEL_SIZE_TOLERANCE:
        return 1.0
    factor = round(1 / ratio)
    if factor >= 2 and abs(factor * ratio - 1) <= SAME_PIXEL_SIZE_TOLERANCE:
        return 1.0 / factor
    return ratio


# Micrometres per pixel a microscope image can plausibly have: 0.05 (beyond any light-microscope scan; 100x oil is
# about 0.06) to 20 (a Visium low-resolution image is about 10-25; a 72-dpi screen image read as µm is 352.8).
# Sizes outside are refused at every entry point, and a slide file's metadata outside is ignored.
PIXEL_SIZE_RANGE_UM = (0.05, 20.0)


def is_plausible_pixel_size(value: Any) -> bool:
    """Whether ``value`` is a finite number of µm per pixel within :data:`PIXEL_SIZE_RANGE_UM`."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return PIXEL_SIZE_RANGE_UM[0] <= float(value) <= PIXEL_SIZE_RANGE_UM[1]


def check_pixel_size(value: Any, name: str = "pixel_size", *, optional: bool = False, where: str = "") -> float | None:
    """The one plausibility check of a pixel size in µm per pixel; returns it as a float.

    Parameters
    ----------
    value
        The pixel size to check.
    name
        How the message names it (an argument, ``"the image's pixel size"``, ...).
    optional
        Let ``None`` through (returned as ``None``).
    where
        Added to the message after the name, e.g. ``" of model.json"``.

    Returns
    -------
    ``float(value)``, or ``None`` for an optional ``None``.

    Raises
    ------
    ValueError
        When ``value`` is not a finite number within :data:`PIXEL_SIZE_RANGE_UM`.

    Examples
    --------
    >>> check_pixel_size(0.5)
    0.5

    """
    if optional and value is None:
        return None
    if not is_plausible_pixel_size(value):
        lo, hi = PIXEL_SIZE_RANGE_UM
        raise ValueError(
            f"`{name}`{where} must be a microscope pixel size between {lo} and {hi} µm per pixel (e.g. 0.25 for a "
            f"40x scan, 0.5 for 20x); got {value!r}."
        )
    return float(value)


def _find_element(sdata: SpatialData, key: str) -> tuple[str, Any]:
    for attr in ("images", "labels", "shapes", "points"):
        if key in getattr(sdata, attr):
            return attr, getattr(sdata, attr)[key]
    raise KeyError(
        f"Element {key!r} not found in `sdata` (images {sorted(sdata.images)}, labels {sorted(sdata.labels)}, "
        f"shapes {sorted(sdata.shapes)}, points {sorted(sdata.points)})."
    )


def element_transformations(element: Any) -> dict[str, np.ndarray]:
    """Coordinate system name -> 3x3 affine mapping the element's intrinsic ``(x, y)`` to that system."""
    transformations = get_transformation(element, get_all=True)
    return {
        cs: np.asarray(t.to_affine_matrix(input_axes=_XY, output_axes=_XY), dtype=np.float64)
        for cs, t in transformations.items()
    }


def _pick_shared(shared: list[str], coordinate_system: str | None) -> str:
    if coordinate_system is not None:
        return coordinate_system
    return GLOBAL_CS if GLOBAL_CS in shared else shared[0]


def shared_coordinate_system(
    sdata: SpatialData, src_key: str, dst_key: str, coordinate_system: str | None = None
) -> str:
    """The coordinate system through which ``src_key`` and ``dst_key`` are related.

    ``coordinate_system`` when given (it must be shared), else ``"global"`` when both elements have it, else the
    first shared one in alphabetical order. Raises a :class:`ValueError` naming both elements' systems otherwise.
    """
    _, src = _find_element(sdata, src_key)
    _, dst = _find_element(sdata, dst_key)
    shared = sorted(set(get_transformation(src, get_all=True)) & set(get_transformation(dst, get_all=True)))
    if not shared:
        raise ValueError(
            f"Elements {src_key!r} (coordinate systems {sorted(get_transformation(src, get_all=True))}) and "
            f"{dst_key!r} (coordinate systems {sorted(get_transformation(dst, get_all=True))}) share no coordinate "
            "system; expected both to be registered to one, e.g. with "
            f"`spatialdata.transformations.set_transformation(element, transformation, {GLOBAL_CS!r})`."
        )
    if coordinate_system is not None and coordinate_system not in shared:
        raise ValueError(
            f"Coordinate system {coordinate_system!r} is not shared by {src_key!r} and {dst_key!r}; shared: {shared}."
        )
    return _pick_shared(shared, coordinate_system)


def element_affine(
    sdata: SpatialData,
    src_key: str,
    dst_key: str,
    coordinate_system: str | None = None,
) -> np.ndarray:
    """Affine that maps the intrinsic coordinates ``(x, y)`` of one element to those of another.

    Both elements are mapped to a coordinate system they share (see :func:`shared_coordinate_system`) and the
    destination's transformation is inverted. This is the one place where elements are related to each other:
    image -> labels pixels for tiling and prediction, labels -> spots for spot supervision and aggregation,
    shapes -> labels for regions of interest.

    Parameters
    ----------
    sdata
        The :class:`spatialdata.SpatialData` holding both elements.
    src_key
        Key of the source element (image, labels, shapes or points).
    dst_key
        Key of the destination element.
    coordinate_system
        Coordinate system to go through; must be shared by both elements.

    Returns
    -------
    3x3 matrix ``M`` with ``M @ (x_src, y_src, 1) = (x_dst, y_dst, 1)`` in continuous intrinsic coordinates.

    Examples
    --------
    >>> M = element_affine(sdata, "he", "nuclei")
    >>> M @ [10.5, 20.5, 1.0]  # where image pixel (row 20, col 10)'s centre falls in label pixels

    """
    cs = shared_coordinate_system(sdata, src_key, dst_key, coordinate_system)
    src = element_transformations(_find_element(sdata, src_key)[1])[cs]
    dst = element_transformations(_find_element(sdata, dst_key)[1])[cs]
    if abs(np.linalg.det(dst[:2, :2])) < 1e-12:
        raise ValueError(f"The transformation of {dst_key!r} to coordinate system {cs!r} is singular.")
    return np.linalg.inv(dst) @ src


def _clean(matrix: np.ndarray) -> np.ndarray:
    """Snap entries within round-off of an integer to it (e.g. 2.0000000000000004 -> 2)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rounded = np.round(matrix)
    return np.where(np.abs(matrix - rounded) < _EPS, rounded, matrix)


def is_integer_translation(matrix: np.ndarray) -> bool:
    """Whether ``matrix`` is the identity up to an integer translation (fast path: plain slicing)."""
    matrix = _clean(matrix)
    return bool(np.array_equal(matrix[:2, :2], np.eye(2)) and np.array_equal(matrix[:2, 2], np.round(matrix[:2, 2])))


def _values(array: Any) -> Any:
    """What to slice: a DataArray's data, or the array itself (numpy, dask, a :class:`ChunkCachedArray`)."""
    return array.data if isinstance(array, DataArray) else array


def _read_box(labels: Any, y_lo: int, y_hi: int, x_lo: int, x_hi: int) -> np.ndarray:
    """Labels ``[y_lo:y_hi, x_lo:x_hi]`` as numpy, zero outside the array (reads only that region)."""
    data = _values(labels)
    height, width = data.shape
    out = np.zeros((max(y_hi - y_lo, 0), max(x_hi - x_lo, 0)), dtype=data.dtype)
    ys, ye = max(y_lo, 0), min(y_hi, height)
    xs, xe = max(x_lo, 0), min(x_hi, width)
    if ys < ye and xs < xe:
        out[ys - y_lo : ye - y_lo, xs - x_lo : xe - x_lo] = np.asarray(data[ys:ye, xs:xe])
    return out


def read_labels_window(
    labels: Any,
    matrix: np.ndarray,
    y0: int,
    x0: int,
    height: int,
    width: int,
) -> np.ndarray:
    """The labels resampled (nearest neighbour) into a window of the image's pixel grid.

    Image pixel ``(y0 + i, x0 + j)`` gets the label of the label pixel containing its centre
    ``matrix @ (x0 + j + 0.5, y0 + i + 0.5, 1)``; pixels mapping outside the labels get 0. Only the region
    of the (possibly dask-backed) labels that the window covers is read. An identity or integer-translation
    ``matrix`` is a plain slice; an axis-aligned one (scale + translation) is an outer index.

    Parameters
    ----------
    labels
        2D labels ``(y, x)`` (a :class:`xarray.DataArray`, dask- or numpy-backed, a numpy array, or a
        :class:`ghist._chunk_cache.ChunkCachedArray`).
    matrix
        Image pixel -> label pixel affine, from :func:`element_affine`.
    y0, x0
        Top-left image pixel of the window (may lie outside the image).
    height, width
        Window size in image pixels.

    Returns
    -------
    ``(height, width)`` array of label ids, dtype of ``labels``.

    Examples
    --------
    >>> M = element_affine(sdata, "he", "nuclei")
    >>> window = read_labels_window(sdata.labels["nuclei"], M, 0, 0, 256, 256)

    """
    matrix = _clean(matrix)
    if is_integer_translation(matrix):
        tx, ty = int(matrix[0, 2]), int(matrix[1, 2])
        return _read_box(labels, y0 + ty, y0 + ty + height, x0 + tx, x0 + tx + width)

    xs = x0 + np.arange(width, dtype=np.float64) + 0.5
    ys = y0 + np.arange(height, dtype=np.float64) + 0.5
    if matrix[0, 1] == 0 and matrix[1, 0] == 0:  # axis-aligned: separable index maps
        lx = np.floor(matrix[0, 0] * xs + matrix[0, 2] + _EPS).astype(np.int64)
        ly = np.floor(matrix[1, 1] * ys + matrix[1, 2] + _EPS).astype(np.int64)
        y_lo, y_hi = int(ly.min()), int(ly.max()) + 1
        x_lo, x_hi = int(lx.min()), int(lx.max()) + 1
        box = _read_box(labels, y_lo, y_hi, x_lo, x_hi)
        return box[np.ix_(ly - y_lo, lx - x_lo)]

    gx, gy = np.meshgrid(xs, ys)
    lx = np.floor(matrix[0, 0] * gx + matrix[0, 1] * gy + matrix[0, 2] + _EPS).astype(np.int64)
    ly = np.floor(matrix[1, 0] * gx + matrix[1, 1] * gy + matrix[1, 2] + _EPS).astype(np.int64)
    y_lo, y_hi = int(ly.min()), int(ly.max()) + 1
    x_lo, x_hi = int(lx.min()), int(lx.max()) + 1
    box = _read_box(labels, y_lo, y_hi, x_lo, x_hi)
    return box[ly - y_lo, lx - x_lo]


def read_image_window(
    levels: list[tuple[float, float, Any]], scale: float, y0: int, x0: int, h: int, w: int
) -> np.ndarray:
    """An RGB window ``(3, h, w)`` ``uint8`` of the working grid, white outside the image.

    The working grid is the full-resolution pixel grid scaled by ``scale`` (working pixels per image pixel, e.g. the
    image's µm per pixel over a model's). It is read from the coarsest pyramid level that is at least as fine
    (``levels`` from :func:`ghist._validation.raster_levels`, finest first): as is when that level has the working
    pixel size, area-averaged when it is finer (anti-aliased, like the pyramid levels themselves and block-mean
    downsampling), interpolated bilinearly from full resolution when the working grid is finer than the image.
    A level's array is a ``(c, y, x)`` DataArray or anything sliced like one (:func:`ghist._chunk_cache.chunk_cached`
    levels, which tile sweeps read through). Used alike by :func:`ghist.pp.make_tiles` (``pixel_size=``) and
    :func:`ghist.tl.predict`, so that training and prediction tiles at one pixel size are made the same way.

    Examples
    --------
    >>> window = read_image_window(raster_levels(sdata.images["he"]), 0.5 / 2.0, 0, 0, 64, 64)

    """
    target = 1 / scale
    fine_enough = [lv for lv in levels if lv[0] <= target * 1.001 and lv[1] <= target * 1.001]
    dy, dx, level = fine_enough[-1] if fine_enough else levels[0]
    sy, sx = scale * dy, scale * dx  # working pixels per level pixel (<= 1 unless upsampling)
    if abs(sy - 1) < 1e-6 and abs(sx - 1) < 1e-6:  # a level at the working pixel size (scale 1: the image itself)
        window = np.full((3, h, w), 255, dtype=np.uint8)
        ye, xe = min(y0 + h, level.shape[-2]), min(x0 + w, level.shape[-1])
        if ye > y0 and xe > x0:
            window[:, : ye - y0, : xe - x0] = np.asarray(_values(level)[:, y0:ye, x0:xe])
        return window
    if sy < 1 or sx < 1:
        return _area_resample(level, y0, x0, h, w, sy, sx)
    return _bilinear_resample(levels[0][2], y0, x0, h, w, scale)


def _area_weights(start: int, size: int, scale: float, length: int) -> tuple[np.ndarray, int, int]:
    """Weights ``(size, n)`` averaging the source pixels under each output pixel, and the source range read.

    Output pixel ``r`` covers source ``[(start + r) / scale, (start + r + 1) / scale)``; each source pixel counts
    by the length of its overlap (area averaging: anti-aliased, like a pyramid level made by block means). Source
    pixels outside ``[0, length)`` are glass: their share goes to white, added by the caller.
    """
    edges = (start + np.arange(size + 1, dtype=np.float64)) / scale
    lo, hi = max(0, math.floor(edges[0])), min(length, math.ceil(edges[-1]))
    if hi <= lo:
        return np.zeros((size, 0)), lo, lo
    pixels = np.arange(lo, hi, dtype=np.float64)
    overlap = np.minimum(edges[1:, None], pixels[None, :] + 1) - np.maximum(edges[:-1, None], pixels[None, :])
    return np.clip(overlap, 0, None) * scale, lo, hi


def _area_resample(image: DataArray, y0: int, x0: int, h: int, w: int, sy: float, sx: float) -> np.ndarray:
    """Window of the working grid (``sy``, ``sx`` working pixels per image pixel, <= 1) by area averaging."""
    wy, ylo, yhi = _area_weights(y0, h, sy, image.shape[-2])
    wx, xlo, xhi = _area_weights(x0, w, sx, image.shape[-1])
    if yhi <= ylo or xhi <= xlo:
        return np.full((3, h, w), 255, dtype=np.uint8)
    window = np.asarray(_values(image)[:, ylo:yhi, xlo:xhi], dtype=np.float64)
    inside = wy.sum(axis=1)[:, None] * wx.sum(axis=1)[None, :]  # fraction of each output pixel over the image
    # optimize=True contracts one axis at a time (two matrix products); without it einsum loops over every
    # (y, x, i, j): 2.5 s instead of ~20 ms for a 64-px tile cut from 256 source pixels.
    tile = np.einsum("yi,cij,xj->cyx", wy, window, wx, optimize=True) + 255.0 * (1 - inside)
    return np.clip(tile, 0, 255).round().astype(np.uint8)


def _bilinear_resample(image: DataArray, y0: int, x0: int, h: int, w: int, scale: float) -> np.ndarray:
    """Window of the working grid finer than the image (``scale`` > 1 working pixels per image pixel), bilinear."""
    from scipy import ndimage

    height, width = image.shape[-2:]
    tile = np.full((3, h, w), 255, dtype=np.uint8)
    # Pixel centres: working pixel r sits at image coordinate (r + 0.5) / scale - 0.5.
    src_y0 = max(0, math.floor((y0 + 0.5) / scale - 0.5) - 1)
    src_x0 = max(0, math.floor((x0 + 0.5) / scale - 0.5) - 1)
    src_y1 = min(height, math.ceil((y0 + h + 0.5) / scale) + 2)
    src_x1 = min(width, math.ceil((x0 + w + 0.5) / scale) + 2)
    if src_y1 <= src_y0 or src_x1 <= src_x0:
        return tile
    window = np.asarray(_values(image)[:, src_y0:src_y1, src_x0:src_x1]).astype(np.float32)
    offset = ((y0 + 0.5) / scale - 0.5 - src_y0, (x0 + 0.5) / scale - 0.5 - src_x0)
    for c in range(3):
        tile[c] = np.clip(
            ndimage.affine_transform(
                window[c], [1 / scale, 1 / scale], offset=offset, output_shape=(h, w), order=1, cval=255.0
            ),
            0,
            255,
        ).round()
    return tile


def image_pixel_size(sdata: SpatialData, element_key: str) -> float | None:
    """Micrometres per pixel of a raster element, or ``None`` without a ``"microns"`` coordinate system.

    The element's own transformation to ``"microns"`` is used when it has one; otherwise the path through the
    coordinate-system graph of ``sdata`` (e.g. image -> ``"global"`` <- labels -> ``"microns"``). The size is the
    square root of the area of one pixel in µm² (exact for square pixels).

    Parameters
    ----------
    sdata
        The :class:`spatialdata.SpatialData`.
    element_key
        Key of the image or labels.

    Returns
    -------
    µm per pixel, or ``None``.

    Examples
    --------
    >>> image_pixel_size(sdata, "he")
    0.5

    """
    _, element = _find_element(sdata, element_key)
    own = element_transformations(element)
    if MICRONS_CS in own:
        matrix = own[MICRONS_CS]
    elif MICRONS_CS in sdata.coordinate_systems:
        from spatialdata.transformations import get_transformation_between_coordinate_systems

        try:
            t = get_transformation_between_coordinate_systems(sdata, element, MICRONS_CS)
        except (RuntimeError, ValueError, KeyError) as err:  # no path through the graph
            logger.debug("No path from %r to %r: %s", element_key, MICRONS_CS, err)
            return None
        matrix = np.asarray(t.to_affine_matrix(input_axes=_XY, output_axes=_XY), dtype=np.float64)
    else:
        return wsidata_pixel_size(sdata, element)
    area = abs(float(np.linalg.det(matrix[:2, :2])))
    return float(np.sqrt(area)) if area > 0 else None


def wsidata_pixel_size(sdata: Any, element: Any) -> float | None:
    """The slide's µm per pixel of a LazySlide/wsidata ``WSIData`` image (full resolution only), else ``None``.

    A ``WSIData`` keeps the pixel size in ``sdata.properties.mpp``, not as a ``"microns"`` transformation; it holds
    for the image of the slide's full-resolution shape only (not for a thumbnail).
    """
    properties = getattr(sdata, "properties", None)
    mpp, shape = getattr(properties, "mpp", None), getattr(properties, "shape", None)
    if mpp is None or shape is None or isinstance(mpp, bool) or not isinstance(mpp, int | float | np.number):
        return None
    from ._validation import raster_levels

    full = next(array for _, _, array in raster_levels(element))
    if [int(full.sizes["y"]), int(full.sizes["x"])] != [int(v) for v in shape]:
        return None
    return float(mpp) if 0 < float(mpp) < float("inf") else None


def region_in_pixels(sdata: SpatialData, shapes_key: str, element_key: str) -> Any:
    """Union of the geometries of ``sdata.shapes[shapes_key]`` in the pixel coordinates of another element.

    Circles (points with a ``"radius"`` column, as spatialdata stores Visium spots) become discs. Used for regions of
    interest: tissue polygons restricting :func:`ghist.pp.segment_nuclei` (image pixels) and
    :func:`ghist.tl.predict` (labels pixels).

    Examples
    --------
    >>> tissue = region_in_pixels(sdata, "tissue", "he")

    """
    import shapely
    from shapely.affinity import affine_transform

    from ._validation import require_key

    shapes = require_key(sdata, "shapes", shapes_key)
    matrix = element_affine(sdata, shapes_key, element_key)
    geoms = shapes.geometry.to_numpy()
    if "radius" in shapes.columns:
        geoms = shapely.buffer(geoms, shapes["radius"].to_numpy(dtype=float), quad_segs=16)
    if geoms.size == 0:
        raise ValueError(f"Shapes {shapes_key!r} hold no geometry; expected at least one region.")
    params = [matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]]
    return affine_transform(shapely.union_all(geoms), params)


def _extent(element: Any, matrix: np.ndarray) -> np.ndarray:
    """Bounding box ``(x_min, y_min, x_max, y_max)`` of a raster element's pixels mapped by ``matrix``."""
    from ._validation import scale0

    array = scale0(element)
    h, w = array.sizes["y"], array.sizes["x"]
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=np.float64) @ matrix.T
    return np.r_[corners[:, :2].min(axis=0), corners[:, :2].max(axis=0)]


@dataclass(frozen=True)
class ExtentOverlap:
    """Two raster elements' extents in a coordinate system they share, and how much of the second the first covers."""

    cs: str
    first: np.ndarray  # (x_min, y_min, x_max, y_max) in `cs`
    second: np.ndarray
    same_transformation: bool  # both map to `cs` by the same matrix
    pixel: float  # side of the coarser element's pixel in `cs`
    overlaps: bool  # the extents share an area (touching edges do not)
    covered: float  # fraction of the second's extent inside the first's (0 when they do not overlap)

    def describe(self, first_key: str, second_key: str) -> str:
        """Both extents, for error messages."""

        def box(key: str, b: np.ndarray) -> str:
            return f"{key!r} spans x {b[0]:.6g}..{b[2]:.6g}, y {b[1]:.6g}..{b[3]:.6g}"

        return f"in coordinate system {self.cs!r}: {box(first_key, self.first)}, {box(second_key, self.second)}"


def extent_overlap(sdata: SpatialData, first_key: str, second_key: str, cs: str | None = None) -> ExtentOverlap:
    """Where two raster elements lie in ``cs`` (default: the system they share) and how much they overlap.

    The one overlap rule of :func:`check_extents` (image and labels) and :func:`ghist.tl.evaluate_segmentation`
    (labels and true labels): extents are the elements' full pixel boxes mapped into ``cs``.

    Examples
    --------
    >>> extent_overlap(sdata, "he", "nuclei").covered
    1.0

    """
    cs = shared_coordinate_system(sdata, first_key, second_key) if cs is None else cs
    first_el, second_el = _find_element(sdata, first_key)[1], _find_element(sdata, second_key)[1]
    to_first, to_second = element_transformations(first_el)[cs], element_transformations(second_el)[cs]
    box_a, box_b = _extent(first_el, to_first), _extent(second_el, to_second)
    pixel = max(np.sqrt(abs(np.linalg.det(to_first[:2, :2]))), np.sqrt(abs(np.linalg.det(to_second[:2, :2]))), 1e-12)
    width = min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])
    height = min(box_a[3], box_b[3]) - max(box_a[1], box_b[1])
    overlaps = bool(width > 0 and height > 0)
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    covered = float(width * height / max(area_b, 1e-12)) if overlaps else 0.0
    return ExtentOverlap(cs, box_a, box_b, bool(np.allclose(to_first, to_second)), float(pixel), overlaps, covered)


def check_extents(sdata: SpatialData, image_key: str, labels_key: str) -> None:
    """Refuse labels that cannot be the nuclei of the image; warn where they only partly cover it.

    Both extents are compared in the coordinate system the elements share (tolerance: one pixel of the coarser
    element):

    - an image and labels with the same transformation but different pixel sizes (labels half or double the
      image, a missing ``Scale``) would cut every cell against the wrong pixels: :class:`ValueError`;
    - extents that do not overlap at all: :class:`ValueError`;
    - labels reaching beyond the image: a warning giving the covered fraction (an image wider than the labels,
      e.g. a Xenium H&E scanned wider than the morphology image, is usual and passes).

    Examples
    --------
    >>> check_extents(sdata, "he", "nuclei")

    """
    ext = extent_overlap(sdata, image_key, labels_key)
    if np.abs(ext.first - ext.second).max() <= ext.pixel + _EPS:
        return
    cs, covered, where = ext.cs, ext.covered, ext.describe(image_key, labels_key)
    if ext.same_transformation:
        raise ValueError(
            f"Image {image_key!r} and labels {labels_key!r} have the same transformation to {cs!r} but different "
            f"extents ({where}); labels of a different pixel size need a transformation (e.g. a `Scale`) that maps "
            "them onto the image, otherwise every nucleus would be matched with the wrong pixels."
        )
    if not ext.overlaps:
        raise ValueError(
            f"Image {image_key!r} and labels {labels_key!r} do not overlap ({where}); check their transformations."
        )
    if covered < 0.999:  # an image wider than the labels is usual (a larger H&E scan); nuclei outside it are not
        logger.warning(
            "Image %r covers %.0f%% of labels %r (%s): nuclei outside the image get no prediction.",
            image_key,
            100 * covered,
            labels_key,
            where,
        )
