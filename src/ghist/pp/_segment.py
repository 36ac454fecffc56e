"""Offline nucleus segmentation of H&E images, streamed chunk by chunk over the slide."""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel
from spatialdata.transformations import get_transformation
from tqdm.auto import tqdm
from xarray import DataArray, DataTree

from .._constants import IMAGE_KEY, LABELS_KEY, MICRONS_CS
from .._docs import doc_image_key, doc_params, doc_progress, doc_sdata
from .._validation import check_key_added, get_image

logger = logging.getLogger(__name__)

SegmentationMethod = Literal["watershed", "stardist", "cellpose"]
SEGMENTATION_METHODS: tuple[str, ...] = ("watershed", "stardist", "cellpose")

# Defaults of the watershed backend (``**method_kwargs``), physical sizes in µm.
WATERSHED_DEFAULTS: dict[str, Any] = {
    "threshold": "otsu",
    "threshold_factor": 0.85,
    "sigma_um": 0.5,
    "blob_sigma_um": (2.0, 3.0),
    "min_distance_um": 2.5,
    "max_hole_um2": 20.0,
    "background_gray": 215.0,
}

_Segmenter = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------------


@doc_params(
    sdata=doc_sdata,
    image_key=doc_image_key,
    progress=doc_progress,
    watershed_defaults=", ".join(f"``{k}={v!r}``" for k, v in WATERSHED_DEFAULTS.items()),
)
def segment_nuclei(
    sdata: SpatialData,
    *,
    image_key: str = IMAGE_KEY,
    key_added: str = LABELS_KEY,
    method: SegmentationMethod = "watershed",
    pixel_size: float | None = None,
    min_area_um2: float = 10.0,
    max_area_um2: float = 200.0,
    chunk_size: int = 2048,
    halo: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model: Any = None,
    roi_key: str | None = None,
    **method_kwargs: Any,
) -> None:
    """Segment the nuclei of an H&E image into instance labels, chunk by chunk.

    The image is cut into ``chunk_size`` blocks, each read with a ``halo`` of context around it and segmented on its
    own, so memory is bounded by the chunk size, not the slide size. A nucleus belongs to the block that holds its
    centroid and receives one id, even when it crosses a block border; ids are unique over the slide and numbered
    block after block. The labels are kept compressed in memory.

    Three ``method`` values are available.

    ``"watershed"`` (default, no model needed)
        Colour deconvolution (:func:`skimage.color.rgb2hed`) to the hematoxylin channel, Gaussian smoothing and a
        threshold (by default Otsu's, computed once over the tissue of a downsampled copy of the whole image, so all
        blocks share it) give the nuclear foreground; small holes are filled. Nucleus-sized blobs of hematoxylin
        (maxima of a scale-normalised Laplacian of Gaussian) seed a watershed that splits touching nuclei.
        Options (``**method_kwargs``): ``threshold`` (``"otsu"`` or a hematoxylin optical density),
        ``threshold_factor`` (multiplies Otsu's threshold; lower finds fainter nuclei), ``sigma_um`` (smoothing
        before thresholding), ``blob_sigma_um`` (scale of the seed detector, about a nucleus radius / √2),
        ``min_distance_um`` (closest two seeds may be), ``max_hole_um2`` (largest hole filled) and
        ``background_gray`` (pixels whose mean RGB value is above it count as glass, not tissue, for Otsu's
        threshold). Defaults: {watershed_defaults}.
    ``"stardist"``
        A :class:`stardist.models.StarDist2D` passed as ``model`` (or the path of a saved model folder); each block,
        percentile-normalised, goes through ``model.predict_instances(block, **method_kwargs)``. Needs
        ``pip install 'ghist[stardist]'``; no weights are downloaded.
    ``"cellpose"``
        A :class:`cellpose.models.CellposeModel` passed as ``model`` (or the path of its weights); each block goes
        through ``model.eval(block, **method_kwargs)``. Needs ``pip install 'ghist[cellpose]'``; no weights are
        downloaded.

    Parameters
    ----------
    {sdata}
    {image_key}
    key_added
        Key of the labels written into ``sdata.labels``.
    method
        ``"watershed"``, ``"stardist"`` or ``"cellpose"``.
    pixel_size
        Size of a full-resolution image pixel in µm. By default read from the image's transformation to the
        ``"microns"`` coordinate system.
    min_area_um2, max_area_um2
        Nuclei smaller or larger than these areas (µm²) are discarded.
    chunk_size
        Side of the square blocks processed one at a time, in pixels.
    halo
        Context read around each block, in pixels. By default twice the diameter of the largest nucleus allowed,
        plus a margin for smoothing.
    overwrite
        Replace an existing ``sdata.labels[key_added]``.
    {progress}
    model
        The model object (or path to its weights) of the ``"stardist"`` and ``"cellpose"`` methods.
    roi_key
        Shapes of ``sdata`` (e.g. from :func:`ghist.pp.detect_tissue`): only blocks touching them are read and
        segmented, so the glass of a whole slide costs nothing.
    **method_kwargs
        Options of the method, see above.

    Returns
    -------
    Nothing; writes ``sdata.labels[key_added]``: a :class:`~spatialdata.models.Labels2DModel` of ``int32`` nucleus ids
    (0 = background) with the image's transformations, so it lives in the image's pixel space. When ``sdata`` is
    backed by a Zarr store, the element is also written to disk.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=0)
    >>> ghist.pp.segment_nuclei(sdata, key_added="nuclei_he", progress=False)
    >>> sdata.labels["nuclei_he"]  # doctest: +SKIP

    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    if method not in SEGMENTATION_METHODS:
        raise ValueError(f"Unknown segmentation `method` {method!r}; expected one of {list(SEGMENTATION_METHODS)}.")
    image = get_image(sdata, image_key)
    check_key_added(sdata, key_added, "labels", overwrite=overwrite)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 64:
        raise ValueError(f"`chunk_size` must be an integer >= 64 pixels, got {chunk_size!r}.")
    for name, value in (("min_area_um2", min_area_um2), ("max_area_um2", max_area_um2)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"`{name}` must be a number of µm²; got {value!r}.")
    if not (np.isfinite(min_area_um2) and np.isfinite(max_area_um2) and 0 <= min_area_um2 < max_area_um2):
        raise ValueError(
            f"Expected 0 <= `min_area_um2` < `max_area_um2`, got min_area_um2={min_area_um2!r}, "
            f"max_area_um2={max_area_um2!r}."
        )
    element = sdata.images[image_key]
    pixel_size = _resolve_pixel_size(element, image_key, pixel_size)
    min_area_px = min_area_um2 / pixel_size**2
    max_area_px = max_area_um2 / pixel_size**2
    max_diameter_px = 2.0 * math.sqrt(max_area_px / math.pi)

    if method == "watershed":
        if model is not None:
            raise ValueError("`model` is used by method='stardist' or 'cellpose' only; method='watershed' needs none.")
        segmenter, margin = _watershed_segmenter(element, pixel_size, method_kwargs)
    elif method == "stardist":
        segmenter, margin = _stardist_segmenter(model, method_kwargs), 0.0
    else:
        segmenter, margin = _cellpose_segmenter(model, method_kwargs), 0.0
    if halo is None:
        halo = math.ceil(2.0 * max_diameter_px + margin) + 2
    elif isinstance(halo, bool) or not isinstance(halo, int | np.integer) or halo < 0:
        raise ValueError(f"`halo` must be a non-negative integer (pixels), got {halo!r}.")
    elif halo < max_diameter_px:
        logger.warning(
            "`halo`=%d px is smaller than the largest nucleus allowed (%.0f px across); nuclei crossing block "
            "borders may be cut or lost.",
            halo,
            max_diameter_px,
        )

    region = None
    if roi_key is not None:
        from .._spatial import region_in_pixels

        region = region_in_pixels(sdata, roi_key, image_key)
    store = _segment_blocks(
        image.data,
        segmenter,
        region=region,
        chunk_size=int(chunk_size),
        halo=int(halo),
        min_area_px=min_area_px,
        max_area_px=max_area_px,
        progress=progress,
    )
    n_nuclei = int(store.attrs["n_objects"])
    labels = Labels2DModel.parse(
        # ``inline_array`` and a name of our own: spatialdata takes "original-from-zarr" arrays for files on disk.
        da.from_array(store, chunks=store.chunks, name=f"ghist-segment-nuclei-{uuid.uuid4().hex}", inline_array=True),
        dims=("y", "x"),
        transformations=copy.deepcopy(get_transformation(element, get_all=True)),
    )
    sdata.labels[key_added] = labels
    logger.info("Segmented %d nuclei of image %r into `sdata.labels[%r]`.", n_nuclei, image_key, key_added)
    if sdata.is_backed():
        if f"labels/{key_added}" in sdata.elements_paths_on_disk():
            # spatialdata refuses to overwrite a folder inside its own store; the new labels live in memory, so the
            # old ones can be deleted from disk first.
            sdata.delete_element_from_disk(key_added)
        sdata.write_element(key_added)


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------


def _resolve_pixel_size(element: DataArray | DataTree, image_key: str, pixel_size: float | None) -> float:
    """Pixel size in µm: the argument, else the scale of the image's transformation to ``"microns"``."""
    if pixel_size is not None:
        if (
            isinstance(pixel_size, bool)
            or not np.isscalar(pixel_size)
            or not (np.isfinite(pixel_size) and pixel_size > 0)
        ):
            raise ValueError(f"`pixel_size` must be a positive number of µm per pixel, got {pixel_size!r}.")
        return float(pixel_size)
    transformations = get_transformation(element, get_all=True)
    if MICRONS_CS not in transformations:
        raise ValueError(
            f"Cannot tell the pixel size of image {image_key!r}: it has no transformation to a {MICRONS_CS!r} "
            f"coordinate system (it has {sorted(transformations)}). Pass `pixel_size` (µm per pixel)."
        )
    matrix = transformations[MICRONS_CS].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    linear = np.asarray(matrix, dtype=float)[:2, :2]
    scales = np.linalg.norm(linear, axis=0)
    if not np.all(scales > 0):
        raise ValueError(f"The {MICRONS_CS!r} transformation of image {image_key!r} is degenerate; pass `pixel_size`.")
    if not np.isclose(scales[0], scales[1], rtol=0.05):
        logger.warning(
            "Image %r has anisotropic pixels (%.4g x %.4g µm); using their geometric mean.", image_key, *scales
        )
    return float(np.sqrt(scales[0] * scales[1]))


# ----------------------------------------------------------------------------------------------------------------------
# Block loop and stitching
# ----------------------------------------------------------------------------------------------------------------------


def _blocks(height: int, width: int, chunk_size: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, height, chunk_size):
        for x0 in range(0, width, chunk_size):
            yield y0, min(y0 + chunk_size, height), x0, min(x0 + chunk_size, width)


def _read_rgb(image: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A ``(y, x, 3)`` uint8 window of a ``(c, y, x)`` (dask or numpy) array."""
    window = image[:, y0:y1, x0:x1]
    if hasattr(window, "compute"):
        window = window.compute()
    return np.ascontiguousarray(np.moveaxis(np.asarray(window), 0, -1))


def _segment_blocks(
    image: Any,
    segmenter: _Segmenter,
    *,
    chunk_size: int,
    halo: int,
    min_area_px: float,
    max_area_px: float,
    progress: bool,
    region: Any = None,
) -> zarr.Array:
    """Segment ``image`` (``c, y, x``) block by block into a compressed in-memory Zarr array of global ids.

    Each block is segmented with ``halo`` pixels of context. It keeps the objects whose centroid falls inside it,
    whose area is within bounds and that do not touch the cut edge of its window (those are too large to be whole),
    and writes them, with ids continuing those of the previous blocks, onto pixels no earlier block has claimed.
    """
    _, height, width = image.shape
    out = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=(height, width),
        chunks=(min(chunk_size, height), min(chunk_size, width)),
        dtype="int32",
        fill_value=0,
    )
    blocks = list(_blocks(height, width, chunk_size))
    if region is not None:  # blocks that do not touch the region of interest (e.g. glass) are not read at all
        import shapely

        boxes = shapely.box(*np.array([(x0, y0, x1, y1) for y0, y1, x0, x1 in blocks], dtype=float).T)
        inside = shapely.intersects(boxes, region)
        logger.info(
            "Segmenting %d of %d blocks (the rest lie outside the region of interest)", inside.sum(), len(blocks)
        )
        blocks = [b for b, ok in zip(blocks, inside) if ok]
    next_id = 1
    for y0, y1, x0, x1 in tqdm(blocks, desc="Segmenting nuclei", unit="chunk", disable=not progress):
        wy0, wy1, wx0, wx1 = max(y0 - halo, 0), min(y1 + halo, height), max(x0 - halo, 0), min(x1 + halo, width)
        local = np.asarray(segmenter(_read_rgb(image, wy0, wy1, wx0, wx1)))
        if local.shape != (wy1 - wy0, wx1 - wx0):
            raise RuntimeError(
                f"The segmentation method returned shape {local.shape} for a window of shape {(wy1 - wy0, wx1 - wx0)}."
            )
        keep = _owned_objects(
            local,
            core=(y0 - wy0, y1 - wy0, x0 - wx0, x1 - wx0),
            cut_edges=(wy0 > 0, wy1 < height, wx0 > 0, wx1 < width),
            min_area_px=min_area_px,
            max_area_px=max_area_px,
        )
        keep[0] = False
        n_kept = int(np.count_nonzero(keep))
        if n_kept == 0:
            continue
        if next_id + n_kept > np.iinfo(np.int32).max:
            raise OverflowError("More nuclei than int32 labels can number.")
        lut = np.zeros(keep.size, dtype=np.int32)  # local id -> global id (0 for dropped objects and background)
        lut[keep] = np.arange(next_id, next_id + n_kept, dtype=np.int32)
        ids = lut[local]
        current = out[wy0:wy1, wx0:wx1]
        free = current == 0
        current[free] = ids[free]
        out[wy0:wy1, wx0:wx1] = current
        next_id += n_kept
    out.attrs["n_objects"] = next_id - 1
    return out


def _owned_objects(
    local: np.ndarray,
    *,
    core: tuple[int, int, int, int],
    cut_edges: tuple[bool, bool, bool, bool],
    min_area_px: float,
    max_area_px: float,
) -> np.ndarray:
    """Boolean mask over the ids of ``local`` (index 0: background) of the objects to keep."""
    local = local.astype(np.int64, copy=False)
    if local.size and local.min() < 0:
        raise ValueError("The segmentation method returned negative labels.")
    n = int(local.max()) + 1 if local.size else 1
    flat = local.ravel()
    area = np.bincount(flat, minlength=n).astype(float)
    yy, xx = np.indices(local.shape, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=yy.ravel(), minlength=n) / area
        cx = np.bincount(flat, weights=xx.ravel(), minlength=n) / area
    cy0, cy1, cx0, cx1 = core
    keep = (area >= min_area_px) & (area <= max_area_px)
    keep &= (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    top, bottom, left, right = cut_edges
    for cut, edge in ((top, local[0]), (bottom, local[-1]), (left, local[:, 0]), (right, local[:, -1])):
        if cut:
            keep[np.unique(edge)] = False
    return keep


# ----------------------------------------------------------------------------------------------------------------------
# Watershed backend
# ----------------------------------------------------------------------------------------------------------------------


@functools.cache
def _hematoxylin_lut() -> np.ndarray:
    """``(256, 3)`` contribution of each 8-bit value of each RGB channel to the hematoxylin density."""
    from skimage.color import hed_from_rgb

    # Same colour deconvolution as :func:`skimage.color.rgb2hed`: optical densities log(max(v / 255, 1e-6)) /
    # log(1e-6) of the three channels, times the first column of the inverse stain matrix. Being linear per channel,
    # it is a table lookup on uint8 input.
    density = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)
    return (density[:, None] * hed_from_rgb[:, 0][None, :]).astype(np.float32)


def _hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (``float32``, >= 0) of a ``(..., 3)`` uint8 RGB array."""
    lut = _hematoxylin_lut()
    hema = lut[rgb[..., 0], 0] + lut[rgb[..., 1], 1] + lut[rgb[..., 2], 2]
    return np.maximum(hema, 0, out=hema)


def _downsampled_rgb(element: DataArray | DataTree, max_side: int = 2048) -> np.ndarray:
    """A ``(y, x, 3)`` copy of the image with its longer side about ``max_side``; uses a coarse scale when present."""
    if isinstance(element, DataTree):
        arrays = [next(iter(element[name].ds.data_vars.values())) for name in sorted(element.children)]
        arrays.sort(key=lambda a: a.sizes["y"] * a.sizes["x"])
        large = [a for a in arrays if max(a.sizes["y"], a.sizes["x"]) >= max_side]
        array = large[0] if large else arrays[-1]
    else:
        array = element
    data = array.data
    step = max(1, math.ceil(max(data.shape[1:]) / max_side))
    small = data[:, ::step, ::step]
    if hasattr(small, "compute"):
        small = small.compute()
    return np.moveaxis(np.asarray(small), 0, -1)


def _otsu_threshold(element: DataArray | DataTree, background_gray: float) -> float:
    """Otsu's threshold of the hematoxylin density over the tissue of a downsampled copy of the whole image."""
    from skimage.filters import threshold_otsu

    small = _downsampled_rgb(element)
    hema = _hematoxylin(small)
    tissue = small.mean(axis=-1) < background_gray
    values = hema[tissue] if np.count_nonzero(tissue) >= max(100, 0.01 * tissue.size) else hema.ravel()
    if values.size == 0 or np.ptp(values) == 0:
        raise ValueError("The H&E image is uniform; cannot threshold its hematoxylin channel.")
    return float(threshold_otsu(values))


def _watershed_segmenter(
    element: DataArray | DataTree, pixel_size: float, method_kwargs: dict[str, Any]
) -> tuple[_Segmenter, float]:
    """The per-window watershed segmenter and the margin (pixels) its filters need on top of the nucleus size."""
    from skimage.morphology import disk

    unknown = sorted(set(method_kwargs) - set(WATERSHED_DEFAULTS))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for method='watershed'; expected some of {sorted(WATERSHED_DEFAULTS)}."
        )
    opts = {**WATERSHED_DEFAULTS, **method_kwargs}
    for name in ("sigma_um", "min_distance_um", "max_hole_um2", "threshold_factor"):
        value = opts[name]
        if isinstance(value, bool) or not np.isscalar(value) or not np.isfinite(value) or value < 0:
            raise ValueError(f"Option `{name}` of method='watershed' must be a number >= 0, got {value!r}.")
    threshold = opts["threshold"]
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"Option `threshold` must be 'otsu' or a number, got {threshold!r}.")
        threshold = _otsu_threshold(element, float(opts["background_gray"])) * float(opts["threshold_factor"])
        logger.info("Hematoxylin threshold (Otsu over the tissue, whole image): %.4g", threshold)
    elif isinstance(threshold, bool) or not np.isscalar(threshold) or not np.isfinite(threshold):
        raise ValueError(f"Option `threshold` must be 'otsu' or a number, got {threshold!r}.")
    sigma = float(opts["sigma_um"]) / pixel_size
    blob_sigma = np.maximum(np.atleast_1d(np.asarray(opts["blob_sigma_um"], dtype=float)) / pixel_size, 0.5)
    footprint = disk(max(1, round(float(opts["min_distance_um"]) / pixel_size)))
    max_hole = float(opts["max_hole_um2"]) / pixel_size**2
    threshold = float(threshold)

    def segment(rgb: np.ndarray) -> np.ndarray:
        return _watershed_window(
            rgb, threshold=threshold, sigma=sigma, blob_sigma=blob_sigma, footprint=footprint, max_hole=max_hole
        )

    return segment, 4.0 * max(sigma, blob_sigma.max()) + footprint.shape[0]


def _fill_small_holes(mask: np.ndarray, max_hole: float) -> np.ndarray:
    """Fill the background components of ``mask`` no larger than ``max_hole`` pixels that do not touch its edge."""
    from scipy import ndimage as ndi

    holes, n = ndi.label(~mask)
    if n == 0:
        return mask
    size = np.bincount(holes.ravel(), minlength=n + 1)
    fill = size <= max_hole
    fill[0] = False
    edge = np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])
    fill[np.unique(edge)] = False
    return mask | fill[holes]


def _watershed_window(
    rgb: np.ndarray, *, threshold: float, sigma: float, blob_sigma: float, footprint: np.ndarray, max_hole: float
) -> np.ndarray:
    """Instance labels (``int32``) of the nuclei of one RGB window."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk
    from skimage.segmentation import watershed

    hema = _hematoxylin(rgb)
    smooth = ndi.gaussian_filter(hema, sigma) if sigma > 0 else hema
    mask = smooth > threshold
    mask = ndi.binary_opening(mask, structure=disk(1))
    mask = _fill_small_holes(mask, max_hole)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    # Nucleus-sized blobs of hematoxylin (scale-normalised Laplacian of Gaussian) seed the watershed, which splits
    # touching nuclei along the valleys of the blob response.
    blob = np.max([-ndi.gaussian_laplace(hema, b) * b**2 for b in np.atleast_1d(blob_sigma)], axis=0)
    seeds = mask & (blob > 0) & (blob == ndi.maximum_filter(blob, footprint=footprint))
    markers, n = ndi.label(seeds, structure=np.ones((3, 3)))
    labels = watershed(-blob, markers, mask=mask)
    # Foreground pieces that no seed reached become objects of their own.
    rest, n_rest = ndi.label(mask & (labels == 0))
    if n_rest:
        labels = np.where(rest > 0, rest + n, labels)
    return labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Optional model backends
# ----------------------------------------------------------------------------------------------------------------------


def _stardist_segmenter(model: Any, method_kwargs: dict[str, Any]) -> _Segmenter:
    try:
        from csbdeep.utils import normalize
        from stardist.models import StarDist2D
    except ImportError as err:
        raise ImportError(
            "method='stardist' needs the optional dependency `stardist`; install it with "
            "`pip install 'ghist[stardist]'`."
        ) from err
    if model is None:
        raise ValueError(
            "method='stardist' needs `model=`: a `stardist.models.StarDist2D` with weights, or the path of a saved "
            "StarDist model folder (ghist downloads no weights)."
        )
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"StarDist model folder {str(path)!r} not found.")
        model = StarDist2D(None, name=path.name, basedir=str(path.parent))
    if not hasattr(model, "predict_instances"):
        raise TypeError(f"`model` must be a StarDist2D model (with `predict_instances`), got {type(model).__name__}.")

    def segment(rgb: np.ndarray) -> np.ndarray:
        labels, _ = model.predict_instances(normalize(rgb, 1, 99.8, axis=(0, 1)), **method_kwargs)
        return np.asarray(labels, dtype=np.int32)

    return segment


def _cellpose_segmenter(model: Any, method_kwargs: dict[str, Any]) -> _Segmenter:
    try:
        from cellpose import models
    except ImportError as err:
        raise ImportError(
            "method='cellpose' needs the optional dependency `cellpose`; install it with "
            "`pip install 'ghist[cellpose]'`."
        ) from err
    if model is None:
        raise ValueError(
            "method='cellpose' needs `model=`: a `cellpose.models.CellposeModel` with weights, or the path of a "
            "weights file (ghist downloads no weights)."
        )
    if isinstance(model, str | os.PathLike):
        if not Path(model).is_file():
            raise FileNotFoundError(f"Cellpose weights file {str(model)!r} not found.")
        model = models.CellposeModel(pretrained_model=str(model))
    if not hasattr(model, "eval"):
        raise TypeError(f"`model` must be a Cellpose model (with `eval`), got {type(model).__name__}.")

    def segment(rgb: np.ndarray) -> np.ndarray:
        masks = model.eval(rgb, **method_kwargs)[0]
        return np.asarray(masks, dtype=np.int32)

    return segment


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation helper
# ----------------------------------------------------------------------------------------------------------------------


def _segmentation_scores(true: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> dict[str, float]:
    """Object-level precision, recall and F1 of ``pred`` against ``true`` instance labels.

    A true and a predicted object match when their intersection over union is at least ``iou``; each object matches
    at most one other (a maximum matching, which for ``iou > 0.5`` is the unique one).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"`true` and `pred` must have the same shape, got {true.shape} and {pred.shape}.")
    if not 0 < iou <= 1:
        raise ValueError(f"`iou` must be in (0, 1], got {iou!r}.")
    t_ids, t_idx = np.unique(true.ravel(), return_inverse=True)
    p_ids, p_idx = np.unique(pred.ravel(), return_inverse=True)
    t_area = np.bincount(t_idx, minlength=t_ids.size)
    p_area = np.bincount(p_idx, minlength=p_ids.size)
    t_fg, p_fg = t_ids != 0, p_ids != 0
    n_true, n_pred = int(t_fg.sum()), int(p_fg.sum())
    both = t_fg[t_idx] & p_fg[p_idx]
    codes, inter = np.unique(t_idx[both].astype(np.int64) * p_ids.size + p_idx[both], return_counts=True)
    ti, pi = np.divmod(codes, p_ids.size)
    ok = inter / (t_area[ti] + p_area[pi] - inter) >= iou
    graph = csr_matrix((np.ones(int(ok.sum())), (ti[ok], pi[ok])), shape=(t_ids.size, p_ids.size))
    tp = int(np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0)) if ok.any() else 0
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * tp / (n_true + n_pred) if n_true + n_pred else 1.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "n_true": n_true, "n_pred": n_pred}


def _segmentation_f1(true: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> float:
    """F1 score of the nuclei of ``pred`` matched to those of ``true`` at intersection over union ``iou``."""
    return _segmentation_scores(true, pred, iou)["f1"]
