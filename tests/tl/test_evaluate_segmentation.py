"""`ghist.tl.evaluate_segmentation`: labels of a SpatialData scored against true labels, per image and pooled."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel, Labels2DModel
from spatialdata.transformations import Identity, Scale, Translation

import ghist
from ghist._segmentation_scores import segmentation_scores

SCORES = ["f1", "precision", "recall", "sq", "pq", "aji", "dice"]


def _case() -> tuple[np.ndarray, np.ndarray]:
    true = np.zeros((10, 10), dtype=np.int32)
    true[0:4, 0:4] = 1
    true[0:2, 6:10] = 2
    true[6:10, 6:10] = 3
    pred = np.zeros_like(true)
    pred[0:4, 0:3] = 5  # IoU 0.75 with true 1
    pred[0:4, 6:10] = 7  # IoU 0.5 with true 2: not matched
    pred[6:8, 0:2] = 9  # spurious
    return true, pred


def _labels(array: np.ndarray, transformation=None):
    return Labels2DModel.parse(array, dims=("y", "x"), transformations={"global": transformation or Identity()})


def _sdata(true: np.ndarray, pred: np.ndarray, pred_transformation=None) -> sd.SpatialData:
    return sd.SpatialData(labels={"truth": _labels(true), "pred": _labels(pred, pred_transformation)})


def test_same_grid_matches_array_scores():
    true, pred = _case()
    table = ghist.tl.evaluate_segmentation(_sdata(true, pred), labels_key="pred", true_key="truth", band_rows=3)
    assert list(table.index) == ["0"]
    expected = segmentation_scores(true, pred)
    for key, value in expected.items():
        assert table.loc["0", key] == pytest.approx(value), key
    # hand-computed in tests/test_segmentation_scores.py: F1 1/3, SQ 0.75, PQ 0.25, AJI 20/52, Dice 40/72
    assert table.loc["0", "pq"] == pytest.approx(0.25)
    assert table.loc["0", "aji"] == pytest.approx(20 / 52)


def test_other_pixel_grid_is_resampled():
    true, pred = _case()
    # the prediction at twice the resolution (a Scale maps it onto the truth), and shifted by a translation
    fine = np.kron(pred, np.ones((2, 2), dtype=pred.dtype))
    table = ghist.tl.evaluate_segmentation(
        _sdata(true, fine, Scale([0.5, 0.5], axes=("y", "x"))), labels_key="pred", true_key="truth"
    )
    assert table.loc["0", "pq"] == pytest.approx(0.25)
    assert table.loc["0", "dice"] == pytest.approx(40 / 72)
    shifted = np.zeros((12, 12), dtype=pred.dtype)
    shifted[2:, 2:] = pred
    table = ghist.tl.evaluate_segmentation(
        _sdata(true, shifted, Translation([-2, -2], axes=("y", "x"))), labels_key="pred", true_key="truth"
    )
    assert table.loc["0", "aji"] == pytest.approx(20 / 52)


def test_list_pools_sums_not_ratios():
    true, pred = _case()
    one = np.zeros((6, 6), dtype=np.int32)
    one[1:4, 1:4] = 1
    table = ghist.tl.evaluate_segmentation(
        [_sdata(true, pred), _sdata(one, 2 * one)], labels_key="pred", true_key="truth", names=["a", "b"]
    )
    assert list(table.index) == ["a", "b", "pooled"]
    assert table.loc["b", "pq"] == 1.0
    # pooled: 1 + 1 matched of 3 + 1 true and 3 + 1 predicted: F1 = 2 * 2 / 8 (the mean of ratios would be 2/3)
    assert table.loc["pooled", "f1"] == pytest.approx(0.5)
    # SQ: matched IoUs 0.75 and 1 over 2 pairs; AJI: (20 + 9) / (52 + 9)
    assert table.loc["pooled", "sq"] == pytest.approx(0.875)
    assert table.loc["pooled", "aji"] == pytest.approx(29 / 61)
    assert table.loc["pooled", "n_true"] == 4


def test_partial_coverage_warns(caplog):
    true, pred = _case()
    # the prediction covers rows 4-9 of the truth only (a crop placed by a translation)
    with caplog.at_level(logging.WARNING, logger="ghist"):
        table = ghist.tl.evaluate_segmentation(
            _sdata(true, pred[4:].copy(), Translation([4, 0], axes=("y", "x"))), labels_key="pred", true_key="truth"
        )
    assert "cover 60%" in caplog.text
    # every true nucleus still counts; of the predictions only the spurious one (rows 6-7) lies in the crop
    assert (table.loc["0", "n_true"], table.loc["0", "n_pred"], table.loc["0", "n_matched"]) == (3, 1, 0)


def test_bad_input():
    true, pred = _case()
    sdata = _sdata(true, pred)
    sdata.images["he"] = Image2DModel.parse(np.zeros((3, 10, 10), dtype=np.uint8), dims=("c", "y", "x"))
    evaluate = ghist.tl.evaluate_segmentation
    with pytest.raises(KeyError, match=r"true_key.*'missing' not found"):
        evaluate(sdata, labels_key="pred", true_key="missing")
    with pytest.raises(KeyError, match="not a labels element"):
        evaluate(sdata, labels_key="he", true_key="truth")
    with pytest.raises(ValueError, match="two different labels"):
        evaluate(sdata, labels_key="truth", true_key="truth")
    with pytest.raises(ValueError, match="iou_threshold"):
        evaluate(sdata, labels_key="pred", true_key="truth", iou_threshold=0.2)
    with pytest.raises(TypeError, match="SpatialData"):
        evaluate(true, labels_key="pred", true_key="truth")
    with pytest.raises(TypeError, match="empty"):
        evaluate([], labels_key="pred", true_key="truth")
    with pytest.raises(ValueError, match="names"):
        evaluate([sdata, sdata], labels_key="pred", true_key="truth", names=["a", "a"])
    # the same transformation but another shape: a missing Scale, refused rather than compared at wrong pixels
    with pytest.raises(ValueError, match="different shapes"):
        evaluate(_sdata(true, np.kron(pred, np.ones((2, 2), dtype=pred.dtype))), labels_key="pred", true_key="truth")
    with pytest.raises(ValueError, match="do not overlap"):
        evaluate(_sdata(true, pred, Translation([50, 50], axes=("y", "x"))), labels_key="pred", true_key="truth")
    floats = _sdata(true, pred)
    floats.labels["pred"].data = floats.labels["pred"].data.astype(np.float32)  # spatialdata 0.8 refuses to parse it
    with pytest.raises(ValueError, match=r"labels_key.*dtype float32; expected integer"):
        evaluate(floats, labels_key="pred", true_key="truth")
    # a bad second sample is refused before the first is scored, naming the sample
    without_pred = sd.SpatialData(labels={"truth": _labels(true)})
    with pytest.raises(KeyError, match="labels_key` \\(sample '1'\\)"):
        evaluate([sdata, without_pred], labels_key="pred", true_key="truth")
