"""Colour normalisation of H&E for the learned nucleus segmenter: Macenko's stain normalisation.

Why: a segmenter learns the colours of its training images. Nuclei on a slide stained darker or bluer (another lab,
another scanner) fall outside them and are missed: trained on CoNSeP, ghist's segmenter missed most nuclei of the
dense, dark tumour of a HER2ST breast section that the watershed outlines (the benchmarks page of the docs). So
every image, in training and when segmenting, is rewritten in the stains of the training images: its own
haematoxylin and eosin colours and their strongest concentrations are measured, each pixel is split into the two
stains' amounts, the amounts are rescaled to the training images' strongest and the stains' colours swapped for
theirs (Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009).

Why these statistics: they describe the stains, not the tissue. The mean and spread of an image's colours (Reinhard's
transfer, tried first) move with what the field holds: on CoNSeP images from one lab, mapping them lightened the
nuclei of dense fields and darkened those of sparse ones (the mapped nuclei's lightness correlated with nuclear
density at r = 0.61, against -0.10 after Macenko's map and -0.17 on the raw images).

How, in optical density (OD, ``-log((I + 1) / 256)`` per channel, where stains add up): the tissue pixels (OD above
:data:`OD_THRESHOLD` in every channel; glass is lighter) span a plane, that of their two main axes; the directions
at the 1st and 99th percentile of their angle in that plane are the two stains (haematoxylin the one absorbing
more red), and the 99th percentile of each stain's amount over the tissue is its strongest concentration. An
image's statistics come from its pixels read at the pyramid level nearest the segmenter's pixel size (not
coarser), from the whole image when it is small and from an even grid of windows over it otherwise, so a whole
slide is not read twice. The same rule serves training and segmentation, so both measure an image alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OD_THRESHOLD", "StainMap", "StainStatistics", "image_stain_statistics", "match_stain"]

#: Optical density a pixel exceeds in every channel to count as tissue (glass and empty background are lighter).
OD_THRESHOLD = 0.15
#: Percentile of the stain angles taken as each stain's direction (and 100 minus it): robust to a few odd pixels.
ANGLE_PERCENTILE = 1.0
#: Percentile of a stain's amounts taken as its strongest concentration.
MAX_PERCENTILE = 99.0
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
# Stains of an image without tissue (Macenko et al.'s reference): such an image is left as it is.
_DEFAULT_STAINS = ((0.6500, 0.7041, 0.2860), (0.2159, 0.8012, 0.5581))
_DEFAULT_MAX = (1.9705, 1.0308)

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class StainStatistics:
    """The two stains of an H&E image (or of several, pooled) and their strongest concentrations.

    Attributes
    ----------
    stains
        Unit optical-density vectors (R, G, B) of haematoxylin and of eosin.
    max_concentration
        The 99th percentile of each stain's amount over the tissue pixels.
    n_pixels
        Tissue pixels measured (0: no tissue; the defaults stand in and the image is not mapped).

    """

    stains: tuple[Triple, Triple]
    max_concentration: tuple[float, float]
    n_pixels: int

    @classmethod
    def of(cls, rgb: np.ndarray) -> StainStatistics:
        """Statistics of the tissue pixels of an ``(..., 3)`` uint8 RGB array.

        Colours are counted on the grid of :class:`StainMap`'s table (7 bits per channel) and each converted once.

        Examples
        --------
        >>> StainStatistics.of(np.full((4, 4, 3), 250, np.uint8)).n_pixels  # glass only
        0

        """
        counts = np.bincount(_colour_index(rgb).ravel(), minlength=_LEVELS**3)
        present = np.flatnonzero(counts)
        od = _od(_bin_colours(present)).astype(np.float64)
        tissue = (od > OD_THRESHOLD).all(axis=1)
        od, weight = od[tissue], counts[present][tissue].astype(np.float64)
        if weight.sum() == 0:
            return cls(_DEFAULT_STAINS, _DEFAULT_MAX, 0)
        # The plane of the stains: the two main axes of the OD vectors (about the origin, where both stains vanish).
        _, axes = np.linalg.eigh((weight[:, None] * od).T @ od / weight.sum())
        plane = axes[:, [2, 1]]
        plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
        along = od @ plane
        angle = np.arctan2(along[:, 1], along[:, 0])
        low, high = _weighted_percentile(angle, weight, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
        a, b = (plane @ np.array([math.cos(t), math.sin(t)]) for t in (low, high))
        stains = np.stack([a, b] if a[0] >= b[0] else [b, a])
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        amounts = od @ np.linalg.pinv(stains)
        strongest = [_weighted_percentile(amounts[:, k], weight, [MAX_PERCENTILE])[0] for k in range(2)]
        return cls(_pair_of_triples(stains), _pair(np.maximum(strongest, 1e-3)), int(weight.sum()))

    @classmethod
    def pooled(cls, parts: Sequence[StainStatistics]) -> StainStatistics:
        """The parts' stains and strongest concentrations averaged, each image weighing by its tissue pixels.

        Parts without tissue are left out; with none left, the defaults (and ``n_pixels == 0``).
        """
        n = np.array([p.n_pixels for p in parts], dtype=np.float64)
        if n.sum() == 0:
            return cls(_DEFAULT_STAINS, _DEFAULT_MAX, 0)
        w = n / n.sum()
        stains = np.einsum("i,ijk->jk", w, np.array([p.stains for p in parts]))
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        strongest = w @ np.array([p.max_concentration for p in parts])
        return cls(_pair_of_triples(stains), _pair(strongest), int(n.sum()))

    def __repr__(self) -> str:
        h, e = (", ".join(f"{v:.2f}" for v in s) for s in self.stains)
        mh, me = self.max_concentration
        return (
            f"StainStatistics(haematoxylin OD ({h}) up to {mh:.2f}, eosin OD ({e}) up to {me:.2f}, "
            f"{self.n_pixels:,} tissue pixels)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "stains": [list(s) for s in self.stains],
            "max_concentration": list(self.max_concentration),
            "n_pixels": self.n_pixels,
        }

    @classmethod
    def from_json(cls, value: Any) -> StainStatistics:
        """Read :meth:`to_json`'s dict; a ``ValueError`` names what is wrong."""
        expected = "{'stains': [[3 numbers], [3 numbers]], 'max_concentration': [2 numbers], 'n_pixels': int}"
        try:
            stains = np.array(value["stains"], dtype=np.float64)
            strongest = np.array(value["max_concentration"], dtype=np.float64)
            n = int(value["n_pixels"])
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"Stain statistics must be {expected}, got {value!r}.") from err
        if stains.shape != (2, 3) or strongest.shape != (2,) or not np.isfinite(stains).all():
            raise ValueError(f"Stain statistics must be {expected}, got {value!r}.")
        if not np.allclose(np.linalg.norm(stains, axis=1), 1, atol=1e-3) or not (strongest > 0).all():
            raise ValueError(f"Stain statistics need unit stain vectors and concentrations > 0, got {value!r}.")
        return cls(_pair_of_triples(stains), _pair(strongest), n)


def _pair(values: Any) -> tuple[float, float]:
    a, b = (float(v) for v in values)
    return a, b


def _pair_of_triples(rows: Any) -> tuple[Triple, Triple]:
    a, b = (tuple(float(v) for v in row) for row in rows)
    return a, b  # type: ignore[return-value]


def _od(rgb: np.ndarray) -> np.ndarray:
    """Optical density of ``(..., 3)`` RGB values (0-255)."""
    return -np.log((np.asarray(rgb, dtype=np.float32) + 1) / 256)


def _bin_colours(index: np.ndarray) -> np.ndarray:
    """``(n, 3)`` colours the table's bins ``index`` stand for."""
    levels = np.stack([index >> (2 * _BITS), (index >> _BITS) & (_LEVELS - 1), index & (_LEVELS - 1)], axis=-1)
    return _CENTRES[levels]


def _weighted_percentile(values: np.ndarray, weight: np.ndarray, q: Sequence[float]) -> list[float]:
    order = np.argsort(values)
    cumulative = np.cumsum(weight[order])
    at = np.searchsorted(cumulative, np.asarray(q) / 100 * cumulative[-1])
    return [float(v) for v in values[order][np.minimum(at, len(values) - 1)]]


class StainMap:
    """The colour map taking images of statistics ``source`` to ``target``, as a lookup table.

    Each colour is split into ``source``'s two stains (least squares in optical density), each amount is scaled by
    ``target``'s strongest concentration over ``source``'s, and the colour is rebuilt from ``target``'s stains. A
    ``source`` without tissue maps every colour to itself. Splitting every pixel is slow, so the map is tabulated
    once for every colour on a grid of 7 bits per channel (each colour takes the value at the centre of its bin, at
    most one level of 255 away): mapping a window is then one table lookup per pixel.

    Examples
    --------
    >>> rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    >>> glass = StainStatistics.of(np.full((2, 2, 3), 250, np.uint8))
    >>> int(np.abs(StainMap(glass, StainStatistics.of(rgb))(rgb).astype(int) - rgb).max()) <= 1
    True

    """

    def __init__(self, source: StainStatistics, target: StainStatistics):
        colours = _bin_colours(np.arange(_LEVELS**3))
        if source.n_pixels == 0:
            self.table = np.rint(colours).astype(np.uint8)
            return
        to_amounts = np.linalg.pinv(np.asarray(source.stains, np.float64)).astype(np.float32)
        gain = (np.asarray(target.max_concentration) / np.asarray(source.max_concentration)).astype(np.float32)
        od = (_od(colours) @ to_amounts) * gain @ np.asarray(target.stains, np.float32)
        self.table = np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` (``(..., 3)`` uint8) mapped."""
        return self.table[_colour_index(rgb)]


def _colour_index(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's bin in the table of 7 bits per channel."""
    q = np.asarray(rgb, dtype=np.uint8) >> _SHIFT
    return (q[..., 0].astype(np.int32) << (2 * _BITS)) | (q[..., 1].astype(np.int32) << _BITS) | q[..., 2]


def match_stain(rgb: np.ndarray, source: StainStatistics, target: StainStatistics) -> np.ndarray:
    """``rgb`` (``(..., 3)`` uint8) with its stains ``source`` mapped to ``target`` (:class:`StainMap`)."""
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
