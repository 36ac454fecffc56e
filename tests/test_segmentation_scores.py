"""Segmentation scores against cases worked out by hand, and against a per-object reference on random labels."""

from __future__ import annotations

import numpy as np
import pytest

from ghist._segmentation_scores import SUM_KEYS, scores_from_sums, segmentation_scores, segmentation_sums


def _case() -> tuple[np.ndarray, np.ndarray]:
    true = np.zeros((10, 10), dtype=np.int32)
    true[0:4, 0:4] = 1  # 16 px
    true[0:2, 6:10] = 2  # 8 px
    true[6:10, 6:10] = 3  # 16 px, missed
    pred = np.zeros_like(true)
    pred[0:4, 0:3] = 5  # 12 px inside true 1: IoU 12/16 = 0.75, matched
    pred[0:4, 6:10] = 7  # 16 px covering true 2 (8 px): IoU 8/16 = 0.5, not above 0.5
    pred[6:8, 0:2] = 9  # 4 px, spurious
    return true, pred


def test_hand_computed_case():
    true, pred = _case()
    s = segmentation_scores(true, pred)
    assert (s["n_true"], s["n_pred"], s["n_matched"]) == (3, 3, 1)
    assert s["f1"] == pytest.approx(2 * 1 / (3 + 3))  # 1/3
    assert s["precision"] == pytest.approx(1 / 3)
    assert s["recall"] == pytest.approx(1 / 3)
    assert s["sq"] == pytest.approx(0.75)  # the one matched pair
    assert s["pq"] == pytest.approx(1 / 3 * 0.75)  # 0.25
    # AJI: true 1 -> pred 5 (12 / 16), true 2 -> pred 7 (8 / 16), true 3 overlaps nothing (+16 to the union),
    # pred 9 is never paired (+4): (12 + 8) / (16 + 16 + 16 + 4) = 20 / 52
    assert s["aji"] == pytest.approx(20 / 52)
    # Dice: foregrounds 40 and 32 px, 12 + 8 in common: 2 * 20 / 72
    assert s["dice"] == pytest.approx(40 / 72)


def test_threshold_is_strict_and_adjustable():
    true, pred = _case()
    # at 0.74 the pair of IoU 0.75 still matches; at 0.75 it does not (strictly above)
    assert segmentation_scores(true, pred, iou_threshold=0.74)["n_matched"] == 1
    assert segmentation_scores(true, pred, iou_threshold=0.75)["n_matched"] == 0
    for bad in (0.3, 1.0, 1.5):
        with pytest.raises(ValueError, match="iou_threshold"):
            segmentation_scores(true, pred, iou_threshold=bad)


def test_merge_and_split_aji():
    # two true 4x4 squares side by side, predicted as one 4x8 object: IoU 16/32 = 0.5 each, no match
    true = np.zeros((4, 8), dtype=np.int64)
    true[:, :4], true[:, 4:] = 1, 2
    merged = np.ones_like(true)
    s = segmentation_scores(true, merged)
    assert (s["n_matched"], s["f1"], s["sq"], s["pq"]) == (0, 0.0, 0.0, 0.0)
    # both true objects pair with the merged one: (16 + 16) / (32 + 32)
    assert s["aji"] == pytest.approx(0.5)
    assert s["dice"] == 1.0
    # one true 4x4 square split in a 4x2 part (IoU 8/16 = 0.5) and a 4x3 part reaching one column outside it
    # (overlap 8, union 16 + 12 - 8 = 20, IoU 0.4): AJI pairs the first, the second's 12 px join the union
    true = np.zeros((4, 6), dtype=np.int64)
    true[:, :4] = 1
    split = np.zeros_like(true)
    split[:, :2], split[:, 2:5] = 1, 2
    s = segmentation_scores(true, split)
    assert s["aji"] == pytest.approx(8 / (16 + 12))
    assert s["n_matched"] == 0


def test_relabelling_large_ids_and_identity():
    true, pred = _case()
    expected = segmentation_scores(true, pred)
    # ids far above the pixel count take the sorting path; the scores depend only on the partition
    big = np.where(pred > 0, pred.astype(np.int64) * 10**9 + 12345, 0)
    assert segmentation_scores(true, big) == pytest.approx(expected)
    perfect = segmentation_scores(true, np.choose(true, [0, 4, 8, 2]))
    assert all(perfect[k] == 1.0 for k in ("f1", "sq", "pq", "aji", "dice"))


def test_empty_images():
    true, _ = _case()
    empty = np.zeros_like(true)
    assert segmentation_scores(empty, empty)["pq"] == 1.0
    s = segmentation_scores(true, empty)
    assert (s["f1"], s["recall"], s["precision"], s["pq"], s["aji"], s["dice"]) == (0, 0, 0, 0, 0, 0)
    # labels without any background pixel: every pixel belongs to an object
    full = np.ones((3, 3), dtype=np.uint8)
    assert segmentation_scores(full, full)["n_true"] == 1


def test_pooling_adds_sums():
    true, pred = _case()
    one = segmentation_sums(true, pred)
    assert set(one) == set(SUM_KEYS)
    pooled = scores_from_sums({k: one[k] + one[k] for k in SUM_KEYS})
    # the same image twice pools to the same ratios and twice the counts
    single = scores_from_sums(one)
    assert pooled["pq"] == pytest.approx(single["pq"])
    assert pooled["n_true"] == 2 * single["n_true"]


def test_bad_input():
    true, pred = _case()
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(true, pred[:5])
    with pytest.raises(TypeError, match="integer"):
        segmentation_scores(true, pred.astype(float))
    with pytest.raises(ValueError, match="negative"):
        segmentation_scores(true, -pred)


def _reference(true: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> dict[str, float]:
    """The definitions object by object, written plainly (loops) to check the vectorised code."""
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [j for j in np.unique(pred) if j]
    masks_t = {i: true == i for i in t_ids}
    masks_p = {j: pred == j for j in p_ids}
    iou_sum, matched, c, u, used = 0.0, 0, 0, 0, set()
    for i in t_ids:
        best, best_j = -1.0, None
        for j in p_ids:
            inter = (masks_t[i] & masks_p[j]).sum()
            union = (masks_t[i] | masks_p[j]).sum()
            if inter / union > thr:
                matched += 1
                iou_sum += inter / union
            if inter and inter / union > best:
                best, best_j = inter / union, j
        if best_j is None:
            u += masks_t[i].sum()
        else:
            used.add(best_j)
            c += (masks_t[i] & masks_p[best_j]).sum()
            u += (masks_t[i] | masks_p[best_j]).sum()
    u += sum(masks_p[j].sum() for j in p_ids if j not in used)
    f1 = 2 * matched / (len(t_ids) + len(p_ids))
    sq = iou_sum / matched if matched else 0.0
    return {"f1": f1, "sq": sq, "pq": f1 * sq, "aji": c / u}


def _jittered_disks(seed: int, size: int = 64, n: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping disks and a prediction of them: most moved, resized and relabelled, some missed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    true = np.zeros((size, size), dtype=np.int32)
    pred = np.zeros_like(true)
    for k in range(n):
        (cy, cx), r = rng.uniform(4, size - 4, 2), rng.uniform(2.5, 5)
        true[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = k + 1
        if rng.random() < 0.85:
            cy, cx = np.array([cy, cx]) + rng.normal(0, 1, 2)
            pred[(yy - cy) ** 2 + (xx - cx) ** 2 <= (r * rng.uniform(0.8, 1.2)) ** 2] = 100 - k
    return true, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_reference_on_random_labels(seed):
    true, pred = _jittered_disks(seed)
    s = segmentation_scores(true, pred)
    assert 0 < s["n_matched"] < min(s["n_true"], s["n_pred"])  # a mix of matches and misses
    for key, value in _reference(true, pred).items():
        assert s[key] == pytest.approx(value), key


def test_windows_merge_to_the_whole():
    from ghist._segmentation_scores import merge_overlaps, overlaps, sums_from_overlaps

    true, pred = _jittered_disks(0)
    whole = segmentation_sums(true, pred)
    # bands of rows cut objects in pieces: their areas and intersections add up again
    parts = [overlaps(true[y : y + 10], pred[y : y + 10]) for y in range(0, true.shape[0], 10)]
    assert sums_from_overlaps(merge_overlaps(parts)) == pytest.approx(whole)
    # windows of only background, or without any overlap, merge too
    empty = np.zeros((5, 5), dtype=np.int32)
    assert sums_from_overlaps(merge_overlaps([overlaps(empty, empty)]))["n_true"] == 0
    both = merge_overlaps([overlaps(empty, empty), overlaps(true[:10], np.zeros_like(true[:10]))])
    assert sums_from_overlaps(both)["n_pred"] == 0
