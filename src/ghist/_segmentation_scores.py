"""Instance segmentation scores: the field's one-to-one matching at IoU > 0.5, F1, SQ, PQ, AJI and pixel Dice.

Every score is a ratio of sums (:func:`segmentation_sums`), so scores over several images pool by adding the sums of
each image (:func:`scores_from_sums`) rather than by averaging per-image ratios.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

# The sums every score is a ratio of; pooling images adds them key by key.
SUM_KEYS = (
    "n_true",
    "n_pred",
    "n_matched",
    "iou_sum",
    "aji_intersection",
    "aji_union",
    "fg_intersection",
    "fg_true",
    "fg_pred",
)


def _check_labels(true, pred) -> tuple[np.ndarray, np.ndarray]:
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"`true` and `pred` must have the same shape, got {true.shape} and {pred.shape}.")
    for name, labels in (("true", true), ("pred", pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(
                f"`{name}` must be integer instance labels (0: background, one id per nucleus), got dtype "
                f"{labels.dtype}."
            )
        if labels.size and labels.min() < 0:
            raise ValueError(f"`{name}` has negative labels; instance labels are >= 0 (0: background).")
    return true, pred


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids present (sorted), each pixel's index among them, and each id's area."""
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:
        # ids of a usual size: a lookup table is linear in the pixels, where np.unique sorts them
        area = np.bincount(flat, minlength=top + 1)
        present = np.flatnonzero(area)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[present] = np.arange(present.size)
        return present, lut[flat], area[present]
    ids, index = np.unique(flat, return_inverse=True)
    index = index.ravel()
    return ids, index, np.bincount(index)


class Overlaps(NamedTuple):
    """Areas of the objects of two instance labelings and the areas of their pairwise intersections.

    Every field adds up over disjoint windows of the same labelings, so a slide can be scored window by window
    (:func:`merge_overlaps`). Ids are the labels' own; background (0) is left out.
    """

    true_ids: np.ndarray
    true_area: np.ndarray
    pred_ids: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray  # id of the true object of each overlapping pair
    pair_pred: np.ndarray
    pair_area: np.ndarray  # pixels the two share


def overlaps(true, pred) -> Overlaps:
    """The :class:`Overlaps` of two instance labelings of the same shape (a sparse contingency table)."""
    true, pred = _check_labels(true, pred)
    t_flat = true.ravel().astype(np.int64, copy=False)
    p_flat = pred.ravel().astype(np.int64, copy=False)
    t_ids, t_idx, t_area = _compact(t_flat)
    p_ids, p_idx, p_area = _compact(p_flat)
    both = (t_flat != 0) & (p_flat != 0)
    codes, inter = np.unique(t_idx[both] * p_ids.size + p_idx[both], return_counts=True)
    ti, pi = np.divmod(codes, p_ids.size)
    t_keep, p_keep = t_ids != 0, p_ids != 0
    return Overlaps(t_ids[t_keep], t_area[t_keep], p_ids[p_keep], p_area[p_keep], t_ids[ti], p_ids[pi], inter)


def _sum_by(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, index = np.unique(keys, axis=0, return_inverse=True)
    return unique, np.bincount(index.ravel(), weights=values, minlength=len(unique)).astype(np.int64)


def merge_overlaps(parts: list[Overlaps]) -> Overlaps:
    """The :class:`Overlaps` of a labeling from those of disjoint windows of it (areas added id by id)."""
    t_ids, t_area = _sum_by(np.concatenate([p.true_ids for p in parts]), np.concatenate([p.true_area for p in parts]))
    p_ids, p_area = _sum_by(np.concatenate([p.pred_ids for p in parts]), np.concatenate([p.pred_area for p in parts]))
    pairs = np.stack([np.concatenate([p.pair_true for p in parts]), np.concatenate([p.pair_pred for p in parts])], 1)
    pairs, inter = _sum_by(pairs.reshape(-1, 2), np.concatenate([p.pair_area for p in parts]))
    return Overlaps(t_ids, t_area, p_ids, p_area, pairs[:, 0], pairs[:, 1], inter)


def check_iou_threshold(iou_threshold: float) -> float:
    """``iou_threshold`` must be in [0.5, 1): from 0.5 up the matching is one-to-one by construction."""
    ok = isinstance(iou_threshold, numbers.Real) and not isinstance(iou_threshold, bool)
    if not ok or not 0.5 <= float(iou_threshold) < 1:
        raise ValueError(
            f"`iou_threshold` must be a number in [0.5, 1), got {iou_threshold!r}: below 0.5 an object can overlap "
            "several others by more than the threshold and the matching is no longer unique."
        )
    return float(iou_threshold)


def sums_from_overlaps(ov: Overlaps, iou_threshold: float = 0.5) -> dict[str, float]:
    """The sums the scores are ratios of (keys: ``SUM_KEYS``) from the :class:`Overlaps` of two labelings."""
    iou_threshold = check_iou_threshold(iou_threshold)
    t_pos = np.searchsorted(ov.true_ids, ov.pair_true)
    p_pos = np.searchsorted(ov.pred_ids, ov.pair_pred)
    inter = ov.pair_area
    union = ov.true_area[t_pos] + ov.pred_area[p_pos] - inter
    iou = inter / np.maximum(union, 1)
    matched = iou > iou_threshold

    # AJI (Kumar et al. 2017): each true object is paired with the predicted object of highest IoU (ties: lowest
    # id); the union also takes the areas of true objects that overlap nothing and of predicted objects never paired
    order = np.lexsort((p_pos, -iou, t_pos))
    first = order[np.unique(t_pos[order], return_index=True)[1]]
    used = np.zeros(ov.pred_ids.size, dtype=bool)
    used[p_pos[first]] = True
    overlapping = np.zeros(ov.true_ids.size, dtype=bool)
    overlapping[t_pos[first]] = True
    aji_union = union[first].sum() + ov.true_area[~overlapping].sum() + ov.pred_area[~used].sum()

    return {
        "n_true": float(ov.true_ids.size),
        "n_pred": float(ov.pred_ids.size),
        "n_matched": float(matched.sum()),
        "iou_sum": float(iou[matched].sum()),
        "aji_intersection": float(inter[first].sum()),
        "aji_union": float(aji_union),
        "fg_intersection": float(inter.sum()),
        "fg_true": float(ov.true_area.sum()),
        "fg_pred": float(ov.pred_area.sum()),
    }


def segmentation_sums(true, pred, iou_threshold: float = 0.5) -> dict[str, float]:
    """The sums the scores of :func:`segmentation_scores` are ratios of (keys: ``SUM_KEYS``).

    Parameters
    ----------
    true, pred
        Instance labels of the same shape (0: background).
    iou_threshold
        A true and a predicted object match when their IoU is strictly above this; at 0.5 or above each object has at
        most one such partner, so the matching is one-to-one by construction.

    """
    check_iou_threshold(iou_threshold)
    return sums_from_overlaps(overlaps(true, pred), iou_threshold)


def scores_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """Scores (and counts) from the sums of :func:`segmentation_sums`, of one image or added over several.

    When neither side has any object, every score is 1 (nothing to find, nothing found). Otherwise a score whose
    denominator is empty is 0: SQ and PQ are 0 without a matched pair, precision is 0 without predictions.
    """
    n_true, n_pred, n_matched = sums["n_true"], sums["n_pred"], sums["n_matched"]
    if n_true == 0 and n_pred == 0:
        ratios = dict.fromkeys(("f1", "precision", "recall", "sq", "pq", "aji", "dice"), 1.0)
    else:
        f1 = 2 * n_matched / (n_true + n_pred)
        sq = sums["iou_sum"] / n_matched if n_matched else 0.0
        fg = sums["fg_true"] + sums["fg_pred"]
        ratios = {
            "f1": f1,
            "precision": n_matched / n_pred if n_pred else 0.0,
            "recall": n_matched / n_true if n_true else 0.0,
            "sq": sq,
            "pq": f1 * sq,
            "aji": sums["aji_intersection"] / sums["aji_union"] if sums["aji_union"] else 0.0,
            "dice": 2 * sums["fg_intersection"] / fg if fg else 1.0,
        }
    return {**ratios, "n_true": int(n_true), "n_pred": int(n_pred), "n_matched": int(n_matched)}


def segmentation_scores(true, pred, iou_threshold: float = 0.5) -> dict[str, float]:
    """Object- and pixel-level agreement of predicted nucleus instance labels with true ones.

    Parameters
    ----------
    true, pred
        Integer instance labels of the same shape (0: background, one id per object; ids need not be consecutive).
    iou_threshold
        A true and a predicted object match when their intersection over union is strictly above this (in
        [0.5, 1), so each object matches at most one other).

    Returns
    -------
    ``f1`` (detection F1 = 2 matched / (true + predicted)), ``precision``, ``recall``, ``sq`` (mean IoU of the
    matched pairs), ``pq`` (F1 x SQ, panoptic quality), ``aji`` (aggregated Jaccard index of Kumar et al.: each true
    object with its best-IoU prediction, unpaired predictions added to the union), ``dice`` (pixel Dice of the
    foregrounds), and the counts ``n_true``, ``n_pred``, ``n_matched``.

    Examples
    --------
    >>> true = np.zeros((4, 4), int); true[:2, :2] = 1
    >>> segmentation_scores(true, true)["pq"]
    1.0

    """
    return scores_from_sums(segmentation_sums(true, pred, iou_threshold))
