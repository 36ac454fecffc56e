"""Colour normalisation of H&E for the learned nucleus segmenter: Reinhard's colour transfer in CIELAB.

Why: a segmenter learns the colours of its training images. Nuclei on a slide stained darker or bluer (another lab,
another scanner) fall outside them and are missed: trained on CoNSeP, ghist's segmenter missed most nuclei of the
dense, dark tumour of a HER2ST breast section that the watershed outlines (the benchmarks page of the docs). So
every image, in training and when segmenting, has the mean and standard deviation of its tissue pixels' L*, a* and
b* mapped to those of the training images pooled (Reinhard et al., "Color transfer between images", IEEE Computer
Graphics and Applications 21, 2001): the network only ever sees one colour distribution.

An image's statistics come from its tissue pixels (L* below :data:`TISSUE_LIGHTNESS`: glass is brighter), read at the
pyramid level nearest the segmenter's pixel size (not coarser), from the whole image when it is small and from an
even grid of windows over it otherwise, so a whole slide is not read twice. The same rule serves training and
segmentation, so both measure an image alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TISSUE_LIGHTNESS", "StainMap", "StainStatistics", "image_stain_statistics", "match_stain"]

#: L* (0-100) below which a pixel counts as tissue; glass and empty background are brighter.
TISSUE_LIGHTNESS = 88.0
#: Most pixels read to measure an image (a grid of 64 windows beyond that).
SAMPLE_PIXELS = 2**22
_WINDOWS_PER_SIDE = 8
# The map's table: 7 bits per channel (128^3 colours, 6 MB).
_BITS = 7
_SHIFT = 8 - _BITS
_LEVELS = 2**_BITS
_STEP = 2**_SHIFT
# The colour each bin of the table stands for, per channel: the centre of its 2**_SHIFT levels.
_CENTRES = np.arange(_LEVELS, dtype=np.float32) * _STEP + (_STEP - 1) / 2


@dataclass(frozen=True)
class StainStatistics:
    """Mean and standard deviation of L*, a*, b* over the tissue pixels of one image (or of several, pooled)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_pixels: int

    @classmethod
    def of(cls, rgb: np.ndarray) -> StainStatistics:
        """Statistics of the tissue pixels of an ``(..., 3)`` uint8 RGB array (all pixels when none is tissue).

        Colours are counted on the grid of :class:`StainMap`'s table (7 bits per channel) and each converted once.

        Examples
        --------
        >>> StainStatistics.of(np.full((4, 4, 3), 128, np.uint8)).std
        (0.0, 0.0, 0.0)

        """
        counts = np.bincount(_colour_index(rgb).ravel(), minlength=_LEVELS**3)
        present = np.flatnonzero(counts)
        weight = counts[present].astype(np.float64)
        levels = np.stack([present >> (2 * _BITS), (present >> _BITS) & (_LEVELS - 1), present & (_LEVELS - 1)], -1)
        lab = _lab(_CENTRES[levels][:, None, :]).reshape(-1, 3).astype(np.float64)
        tissue = lab[:, 0] < TISSUE_LIGHTNESS
        if tissue.any():
            lab, weight = lab[tissue], weight[tissue]
        mean = (weight[:, None] * lab).sum(axis=0) / weight.sum()
        var = (weight[:, None] * (lab - mean) ** 2).sum(axis=0) / weight.sum()
        return cls(_triple(mean), _triple(np.sqrt(var)), int(weight.sum()))

    @classmethod
    def pooled(cls, parts: Sequence[StainStatistics]) -> StainStatistics:
        """The statistics of all the parts' pixels together (each image weighs by its tissue pixels)."""
        n = np.array([p.n_pixels for p in parts], dtype=np.float64)
        means = np.array([p.mean for p in parts])
        second = np.array([p.std for p in parts]) ** 2 + means**2
        mean = (n[:, None] * means).sum(axis=0) / n.sum()
        var = (n[:, None] * second).sum(axis=0) / n.sum() - mean**2
        return cls(_triple(mean), _triple(np.sqrt(np.clip(var, 0, None))), int(n.sum()))

    def __repr__(self) -> str:
        mean, std = (", ".join(f"{v:.1f}" for v in values) for values in (self.mean, self.std))
        return f"StainStatistics(L*a*b* mean ({mean}), spread ({std}), {self.n_pixels:,} tissue pixels)"

    def to_json(self) -> dict[str, Any]:
        return {"lab_mean": list(self.mean), "lab_std": list(self.std), "n_pixels": self.n_pixels}

    @classmethod
    def from_json(cls, value: Any) -> StainStatistics:
        """Read :meth:`to_json`'s dict; a ``ValueError`` names what is wrong."""
        try:
            mean, std, n = value["lab_mean"], value["lab_std"], value["n_pixels"]
            mean, std = [float(v) for v in mean], [float(v) for v in std]
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(
                f"Stain statistics must be {{'lab_mean': [3 numbers], 'lab_std': [3 numbers], 'n_pixels': int}}, "
                f"got {value!r}."
            ) from err
        if len(mean) != 3 or len(std) != 3 or not np.isfinite(mean + std).all() or min(std) < 0:
            raise ValueError(f"Stain statistics need 3 finite means and 3 standard deviations >= 0, got {value!r}.")
        return cls(_triple(mean), _triple(std), int(n))


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float32) / 255.0)


class StainMap:
    """The colour map taking images of statistics ``source`` to ``target``, as a lookup table.

    Each CIELAB channel is standardised with ``source`` and rescaled to ``target`` (a channel without spread in
    ``source`` is only shifted). The conversion to CIELAB and back is slow per pixel, so the map is tabulated once
    for every colour on a grid of 7 bits per channel (each colour takes the value at the centre of its bin, at most
    one level of 255 away): mapping a window is then one table lookup per pixel.

    Examples
    --------
    >>> rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    >>> same = StainStatistics.of(rgb)
    >>> int(np.abs(StainMap(same, same)(rgb).astype(int) - rgb).max()) <= 1
    True

    """

    def __init__(self, source: StainStatistics, target: StainStatistics):
        from skimage.color import lab2rgb

        mean_s, mean_t = np.asarray(source.mean, np.float32), np.asarray(target.mean, np.float32)
        std_s, std_t = np.asarray(source.std, np.float32), np.asarray(target.std, np.float32)
        gain = np.where(std_s > 1e-6, std_t / np.maximum(std_s, 1e-6), 1.0).astype(np.float32)
        table = np.empty((_LEVELS, _LEVELS, _LEVELS, 3), dtype=np.uint8)
        g, b = np.meshgrid(_CENTRES, _CENTRES, indexing="ij")
        for i, r in enumerate(_CENTRES):  # one red level at a time: bounded float temporaries
            rgb = np.stack([np.full_like(g, r), g, b], axis=-1)
            lab = (_lab(rgb) - mean_s) * gain + mean_t
            with warnings.catch_warnings():  # colours mapped outside sRGB are clipped to it: expected at the extremes
                warnings.filterwarnings("ignore", message=".*negative Z values", category=UserWarning)
                table[i] = np.clip(np.rint(lab2rgb(lab) * 255.0), 0, 255).astype(np.uint8)
        self.table = table.reshape(-1, 3)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` (``(..., 3)`` uint8) mapped."""
        return self.table[_colour_index(rgb)]


def _colour_index(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's bin in the table of 7 bits per channel."""
    q = np.asarray(rgb, dtype=np.uint8) >> _SHIFT
    return (q[..., 0].astype(np.int32) << (2 * _BITS)) | (q[..., 1].astype(np.int32) << _BITS) | q[..., 2]


def match_stain(rgb: np.ndarray, source: StainStatistics, target: StainStatistics) -> np.ndarray:
    """``rgb`` (``(..., 3)`` uint8) with its colour statistics ``source`` mapped to ``target`` (:class:`StainMap`)."""
    return StainMap(source, target)(rgb)


def image_stain_statistics(element: Any, pixel_size: float, working_pixel_size: float) -> StainStatistics:
    """Statistics of an image element (DataArray or DataTree, ``(c, y, x)``) whose finest pixels are ``pixel_size``.

    Read at the coarsest pyramid level not coarser than ``working_pixel_size``: whole when it has at most
    :data:`SAMPLE_PIXELS` pixels, else an even 8 x 8 grid of windows adding up to that many.
    """
    from .._validation import raster_levels

    levels = raster_levels(element)
    fine_enough = [lv for lv in levels if pixel_size * max(lv[0], lv[1]) <= working_pixel_size * 1.05]
    _, _, level = fine_enough[-1] if fine_enough else levels[0]
    data = level.data if hasattr(level, "data") else level
    h, w = int(data.shape[-2]), int(data.shape[-1])
    if h * w <= SAMPLE_PIXELS:
        parts = [data[:3]]
    else:
        side = int(math.sqrt(SAMPLE_PIXELS) / _WINDOWS_PER_SIDE)
        ys = np.linspace(0, max(h - side, 0), _WINDOWS_PER_SIDE).astype(int)
        xs = np.linspace(0, max(w - side, 0), _WINDOWS_PER_SIDE).astype(int)
        parts = [data[:3, y : y + side, x : x + side] for y in ys for x in xs]
    if hasattr(data, "dask"):
        import dask

        parts = list(dask.compute(*parts))
    pixels = [np.moveaxis(np.asarray(p), 0, -1) for p in parts]
    return StainStatistics.of(np.concatenate([p.reshape(-1, 3) for p in pixels]).astype(np.uint8))
