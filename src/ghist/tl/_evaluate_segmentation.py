"""`ghist.tl.evaluate_segmentation`: nucleus labels scored against true ones (F1, SQ, PQ, AJI, Dice)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import LABELS_KEY
from .._segmentation_scores import (
    SUM_KEYS,
    check_iou_threshold,
    merge_overlaps,
    overlaps,
    scores_from_sums,
    sums_from_overlaps,
)
from .._spatial import element_affine, extent_overlap, read_labels_window
from .._validation import check_int, get_labels

logger = logging.getLogger(__name__)

POOLED = "pooled"  # index of the row of scores pooled over several SpatialData


def _check_sample(sdata: SpatialData, labels_key: str, true_key: str, where: str) -> None:
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`{where}, got {type(sdata).__name__}.")
    for arg, key in (("labels_key", labels_key), ("true_key", true_key)):
        try:
            get_labels(sdata, key)
        except KeyError as err:
            raise KeyError(f"`{arg}`{where}: {err.args[0]}") from None
        except ValueError as err:
            raise ValueError(f"`{arg}`{where}: {err}") from None


def _check_grids(sdata: SpatialData, labels_key: str, true_key: str, where: str) -> np.ndarray:
    """True-labels pixels -> predicted-labels pixels, after refusing grids that cannot describe the same nuclei."""
    ext = extent_overlap(sdata, labels_key, true_key)
    cs = ext.cs
    if ext.same_transformation and not np.allclose(ext.first, ext.second):
        shape_t, shape_p = get_labels(sdata, true_key).shape, get_labels(sdata, labels_key).shape
        raise ValueError(
            f"Labels {labels_key!r} {shape_p} and {true_key!r} {shape_t}{where} have the same transformation to "
            f"{cs!r} but different shapes; labels of another pixel grid need a transformation (e.g. a `Scale`) that "
            "maps them onto the other's, else nuclei would be compared at the wrong pixels."
        )
    if not ext.overlaps:
        raise ValueError(
            f"Labels {labels_key!r} and {true_key!r}{where} do not overlap in coordinate system {cs!r}; check their "
            "transformations."
        )
    if ext.covered < 0.999:
        logger.warning(
            "Labels %r cover %.0f%% of the true labels %r%s: true nuclei outside them count as missed.",
            labels_key,
            100 * ext.covered,
            true_key,
            where,
        )
    return element_affine(sdata, true_key, labels_key, cs)


def _sample_sums(
    sdata: SpatialData, labels_key: str, true_key: str, matrix: np.ndarray, iou_threshold: float, band_rows: int
) -> dict[str, float]:
    true = get_labels(sdata, true_key)
    pred = get_labels(sdata, labels_key)
    height, width = true.shape
    parts = []
    # bands of rows keep memory flat in the slide's size; the overlaps of the bands add up to the whole
    for y0 in range(0, height, band_rows):
        rows = min(band_rows, height - y0)
        t = np.asarray(true.data[y0 : y0 + rows])
        p = read_labels_window(pred, matrix, y0, 0, rows, width)
        parts.append(overlaps(t, p))
    return sums_from_overlaps(merge_overlaps(parts), iou_threshold)


def evaluate_segmentation(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    labels_key: str = LABELS_KEY,
    true_key: str,
    iou_threshold: float = 0.5,
    names: Sequence[str] | None = None,
    band_rows: int = 2048,
) -> pd.DataFrame:
    """Score nucleus instance labels against true ones with the field's definitions.

    A predicted and a true nucleus match when their intersection over union (IoU) is above ``iou_threshold``
    (0.5: each nucleus matches at most one other). Scores are computed on the pixel grid of the true labels; the
    predicted labels are resampled onto it (nearest neighbour) through the coordinate system both elements share,
    so they may have another pixel size or offset. True nuclei outside the predicted labels count as missed (a
    warning says how much of the truth they cover).

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` holding both labels, or a list of them (one per image).
    labels_key
        Key of the labels to score in ``sdata.labels`` (e.g. from :func:`ghist.pp.segment_nuclei`).
    true_key
        Key of the true (annotated) nucleus labels in ``sdata.labels``.
    iou_threshold
        IoU a matched pair must exceed, in [0.5, 1).
    names
        Row names of the images of a list (default ``"0"``, ``"1"``, ...).
    band_rows
        Rows of the true labels read at a time (memory scales with ``band_rows`` x width, not with the slide).

    Returns
    -------
    One row per image, and for a list a last row ``"pooled"``; columns ``f1`` (detection F1 = 2 matched /
    (true + predicted)), ``precision``, ``recall``, ``sq`` (mean IoU of the matched pairs), ``pq`` (F1 x SQ,
    panoptic quality), ``aji`` (aggregated Jaccard index of Kumar et al. 2017: each true nucleus with its best-IoU
    prediction, unpaired predictions added to the union), ``dice`` (pixel Dice of the foregrounds), ``n_true``,
    ``n_pred``, ``n_matched``. The pooled row is computed from the images' summed counts, matched IoUs,
    intersections and unions (every nucleus weighs the same), not as the mean of per-image ratios.

    Examples
    --------
    >>> sdata = ghist.datasets.synthetic(image_size=256, seed=0)
    >>> ghist.pp.segment_nuclei(sdata, key_added="watershed")
    >>> ghist.tl.evaluate_segmentation(sdata, labels_key="watershed", true_key="nuclei")

    """
    iou_threshold = check_iou_threshold(iou_threshold)
    check_int("band_rows", band_rows, 1)
    samples = [sdata] if isinstance(sdata, SpatialData) else sdata
    if isinstance(samples, str | bytes) or not isinstance(samples, Sequence) or not samples:
        raise TypeError(
            f"`sdata` must be a SpatialData or a non-empty list of them, got {type(sdata).__name__}"
            + (" (empty)" if isinstance(samples, Sequence) and not samples else "")
            + "."
        )
    if labels_key == true_key:
        raise ValueError(f"`labels_key` and `true_key` are both {labels_key!r}; expected two different labels.")
    if names is None:
        names = [str(i) for i in range(len(samples))]
    names = [str(n) for n in names]
    if len(names) != len(samples) or len(set(names)) != len(names) or POOLED in names:
        raise ValueError(
            f"`names` must give {len(samples)} distinct names other than {POOLED!r}, one per SpatialData; got {names}."
        )
    many = not isinstance(sdata, SpatialData)
    wheres = [f" (sample {n!r})" if many else "" for n in names]
    matrices = []
    for sample, where in zip(samples, wheres, strict=True):  # every sample checked before any is scored
        _check_sample(sample, labels_key, true_key, where)
        matrices.append(_check_grids(sample, labels_key, true_key, where))

    sums = [
        _sample_sums(sample, labels_key, true_key, matrix, iou_threshold, band_rows)
        for sample, matrix in zip(samples, matrices, strict=True)
    ]
    rows = [scores_from_sums(s) for s in sums]
    index = list(names)
    if many:
        rows.append(scores_from_sums({k: sum(s[k] for s in sums) for k in SUM_KEYS}))
        index.append(POOLED)
    table = pd.DataFrame(rows, index=pd.Index(index, name="image"))
    logger.info(
        "Segmentation %r against %r: PQ %.3f, F1 %.3f (%s)",
        labels_key,
        true_key,
        table["pq"].iloc[-1],
        table["f1"].iloc[-1],
        "pooled" if many else "one image",
    )
    return table
