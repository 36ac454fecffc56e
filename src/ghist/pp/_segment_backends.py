"""Per-window nucleus segmenters of ``segment_nuclei``: the watershed, ghist's learned model, the field's models."""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from xarray import DataArray, DataTree

logger = logging.getLogger(__name__)

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

# Lengths of the watershed options (sigmas, minimum distance) above this are no nucleus' scale (µm).
MAX_LENGTH_UM = 50.0

_Segmenter = Callable[[np.ndarray], np.ndarray]


class Backend(NamedTuple):
    """A per-window segmenter, safe to call from several threads, and the margin (pixels) it needs around a nucleus.

    ``area_um2``: the nucleus areas (min, max) the method keeps by default, when it knows them (a learned model).
    """

    segment: _Segmenter
    margin: float
    area_um2: tuple[float, float] | None = None


def make_backend(
    method: str, element: DataArray | DataTree, pixel_size: float, model: Any, method_kwargs: dict[str, Any]
) -> Backend:
    """The backend of ``method``; the arguments are checked here, before any block is read."""
    if method == "watershed":
        if model is not None:
            raise ValueError(
                "`model` is used by the learned methods ('ghist', 'instanseg', 'stardist', 'cellpose'); "
                "method='watershed' needs none."
            )
        segment, margin = _watershed_segmenter(element, pixel_size, method_kwargs)
        # Pure numpy/scipy/skimage on arrays of its own: safe to run in several threads.
        return Backend(segment, margin)
    if method == "ghist":
        return _ghist_backend(model, element, pixel_size, method_kwargs)
    from . import _segment_pretrained as pretrained

    margin = 0.0
    if method == "instanseg":
        segment, margin = pretrained.instanseg_segmenter(model, pixel_size, method_kwargs)
    elif method == "stardist":
        segment = pretrained.stardist_segmenter(model, method_kwargs)
    else:
        segment = pretrained.cellpose_segmenter(model, method_kwargs)
    # One model object is shared by the worker threads. TensorFlow/PyTorch models are not documented as safe to call
    # concurrently and already use every core for one window, so calls are serialised; reading the next window and
    # stitching the last one still overlap with them.
    return Backend(_serialised(segment), margin)


def _serialised(segment: _Segmenter) -> _Segmenter:
    lock = threading.Lock()

    def locked(rgb: np.ndarray) -> np.ndarray:
        with lock:
            return segment(rgb)

    return locked


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
    # filter sizes follow from these lengths: bound them by the scale of a nucleus before any footprint is allocated
    blob_sigmas = np.atleast_1d(np.asarray(opts["blob_sigma_um"], dtype=object))
    lengths = [("sigma_um", opts["sigma_um"]), ("min_distance_um", opts["min_distance_um"])]
    lengths += [("blob_sigma_um", value) for value in blob_sigmas]
    for name, value in lengths:
        real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not real or not np.isfinite(value) or not 0 <= value <= MAX_LENGTH_UM:
            raise ValueError(
                f"Option `{name}` of method='watershed' is a length at the scale of a nucleus: a number in "
                f"[0, {MAX_LENGTH_UM:g}] µm, got {value!r}."
            )
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
# ghist's learned segmenter
# ----------------------------------------------------------------------------------------------------------------------


def _ghist_backend(
    model: Any, element: DataArray | DataTree, pixel_size: float, method_kwargs: dict[str, Any]
) -> Backend:
    """The learned segmenter: its forward passes serialised inside the model, its watershed in every thread.

    With ``normalise_stain=True`` (the default) and a model that knows its training images' colours, the image's own
    colour statistics are measured once, here, and every window is mapped from them (:mod:`ghist.pp._stain_norm`).
    """
    from ._segmenter_model import POSTPROCESS_KEYS, resolve_segmenter
    from ._stain_norm import StainMap, image_stain_statistics

    segmenter = resolve_segmenter(model)
    options = dict(method_kwargs)
    normalise = options.pop("normalise_stain", True)
    unknown = sorted(set(options) - set(POSTPROCESS_KEYS))
    if unknown:
        expected = [*POSTPROCESS_KEYS, "normalise_stain"]
        raise TypeError(f"Unknown option(s) {unknown} for method='ghist'; expected some of {expected}.")
    if not isinstance(normalise, bool | np.bool_):
        raise TypeError(f"Option `normalise_stain` of method='ghist' must be True or False, got {normalise!r}.")
    stain_map = None
    if normalise and segmenter.stain_reference is not None:
        stain = image_stain_statistics(element, pixel_size, segmenter.pixel_size)
        logger.info("Stain normalised to the segmenter's training images: %r -> %r", stain, segmenter.stain_reference)
        stain_map = StainMap(stain, segmenter.stain_reference)
    for name in ("fg_threshold", "marker_threshold"):
        if name in options and (
            isinstance(options[name], bool) or not isinstance(options[name], int | float) or not 0 < options[name] < 1
        ):
            raise ValueError(f"Option `{name}` of method='ghist' must be a number in (0, 1), got {options[name]!r}.")

    def segment(rgb: np.ndarray) -> np.ndarray:
        return segmenter.segment(rgb, pixel_size, stain_map=stain_map, **options)

    area = (segmenter.min_area_um2, segmenter.max_area_um2)
    return Backend(segment, segmenter.margin_px(pixel_size), area)
