from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel
from spatialdata.transformations import Affine, Identity, Scale, Sequence, Translation

from ghist._spatial import (
    element_affine,
    extent_overlap,
    image_pixel_size,
    is_integer_translation,
    read_labels_window,
)


def _sdata(image_t: dict, labels_t: dict, shape=(40, 50)) -> SpatialData:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(3, *shape), dtype=np.uint8)
    labels = rng.integers(0, 5, size=shape).astype(np.int32)
    return SpatialData(
        images={"he": Image2DModel.parse(image, dims=("c", "y", "x"), transformations=image_t)},
        labels={"nuclei": Labels2DModel.parse(labels, dims=("y", "x"), transformations=labels_t)},
    )


def _affine(matrix) -> Affine:
    return Affine(np.asarray(matrix, dtype=float), input_axes=("x", "y"), output_axes=("x", "y"))


def _brute_force(labels: np.ndarray, M: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The definition: each image pixel takes the label pixel containing its centre (0 outside)."""
    out = np.zeros((h, w), dtype=labels.dtype)
    for i in range(h):
        for j in range(w):
            x, y, _ = M @ np.array([x0 + j + 0.5, y0 + i + 0.5, 1.0])
            c, r = int(np.floor(x + 1e-6)), int(np.floor(y + 1e-6))
            if 0 <= r < labels.shape[0] and 0 <= c < labels.shape[1]:
                out[i, j] = labels[r, c]
    return out


# ------------------------------------------------------------------------------------------ element_affine
def test_matrix_identity():
    sdata = _sdata({"global": Identity()}, {"global": Identity()})
    np.testing.assert_allclose(element_affine(sdata, "he", "nuclei"), np.eye(3))


def test_matrix_composes_both_transformations():
    A = np.array(
        [[0.7 * np.cos(0.3), -0.7 * np.sin(0.3), 5.0], [0.7 * np.sin(0.3), 0.7 * np.cos(0.3), -2.0], [0, 0, 1]]
    )
    sdata = _sdata({"global": _affine(A)}, {"global": Sequence([Scale([2.0, 2.0], axes=("y", "x"))])})
    M = element_affine(sdata, "he", "nuclei")
    np.testing.assert_allclose(M, np.diag([0.5, 0.5, 1.0]) @ A, atol=1e-12)
    # a point goes image -> global -> labels
    p = np.array([12.5, 7.5, 1.0])
    np.testing.assert_allclose(M @ p, (A @ p) / np.array([2.0, 2.0, 1.0]))


def test_matrix_prefers_global_and_honours_coordinate_system():
    sdata = _sdata(
        {"global": Scale([2.0, 2.0], axes=("y", "x")), "aligned": Translation([3.0, 4.0], axes=("x", "y"))},
        {"global": Identity(), "aligned": Identity()},
    )
    np.testing.assert_allclose(element_affine(sdata, "he", "nuclei"), np.diag([2.0, 2.0, 1.0]))
    M = element_affine(sdata, "he", "nuclei", coordinate_system="aligned")
    np.testing.assert_allclose(M[:2, 2], [3.0, 4.0])


def test_extent_overlap():
    """The one overlap rule of check_extents and evaluate_segmentation: boxes in the shared system, share covered."""
    same = extent_overlap(_sdata({"global": Identity()}, {"global": Identity()}), "he", "nuclei")
    assert (same.cs, same.same_transformation, same.overlaps, same.covered, same.pixel) == (
        "global",
        True,
        True,
        1.0,
        1.0,
    )
    np.testing.assert_allclose(same.first, [0, 0, 50, 40])
    # labels at twice the pixel size, moved right by half the image: an eighth of their extent lies over the image
    half = extent_overlap(
        _sdata(
            {"global": Identity()},
            {"global": Sequence([Scale([2.0, 2.0], ("x", "y")), Translation([25, 0], ("x", "y"))])},
        ),
        "he",
        "nuclei",
    )
    np.testing.assert_allclose(half.second, [25, 0, 125, 80])
    assert not half.same_transformation
    assert half.pixel == pytest.approx(2.0)
    assert half.covered == pytest.approx(25 * 40 / (100 * 80))
    apart = extent_overlap(_sdata({"global": Identity()}, {"global": Translation([50, 0], ("x", "y"))}), "he", "nuclei")
    assert (apart.overlaps, apart.covered) == (False, 0.0)  # edges that touch share no area
    assert "'nuclei' spans x 50..100" in apart.describe("he", "nuclei")


def test_matrix_without_shared_coordinate_system():
    sdata = _sdata({"global": Identity()}, {"other": Identity()})
    with pytest.raises(ValueError, match=r"'he'.*\['global'\].*'nuclei'.*\['other'\]"):
        element_affine(sdata, "he", "nuclei")
    shared = _sdata({"global": Identity()}, {"global": Identity()})
    with pytest.raises(ValueError, match="'aligned' is not shared"):
        element_affine(shared, "he", "nuclei", coordinate_system="aligned")
    with pytest.raises(KeyError, match="'nope'"):
        element_affine(sdata, "nope", "nuclei")


# ------------------------------------------------------------------------------------------ read_labels_window
def test_window_integer_translation_is_a_padded_slice():
    labels = np.arange(1, 31, dtype=np.int32).reshape(5, 6)
    M = np.array([[1.0, 0, 2], [0, 1.0, -1], [0, 0, 1]])
    assert is_integer_translation(M)
    out = read_labels_window(labels, M, 0, 0, 4, 6)
    expected = np.zeros((4, 6), dtype=np.int32)
    expected[1:4, 0:4] = labels[0:3, 2:6]
    np.testing.assert_array_equal(out, expected)


def test_window_upsampled_labels_repeat_each_pixel():
    labels = np.random.default_rng(1).integers(0, 9, size=(10, 12)).astype(np.int32)
    M = np.diag([0.5, 0.5, 1.0])  # image at twice the labels' resolution
    out = read_labels_window(labels, M, 0, 0, 20, 24)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1))
    # a window straddling the edge reads zeros outside
    part = read_labels_window(labels, M, 16, 20, 8, 8)
    np.testing.assert_array_equal(part[:4, :4], np.repeat(np.repeat(labels[8:10, 10:12], 2, 0), 2, 1))
    assert (part[4:] == 0).all()
    assert (part[:, 4:] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(0.3, 3.0),
    angle=st.floats(-0.6, 0.6),
    tx=st.floats(-10, 10),
    ty=st.floats(-10, 10),
    rotate=st.booleans(),
    y0=st.integers(-5, 20),
    x0=st.integers(-5, 20),
    h=st.integers(1, 17),
    w=st.integers(1, 17),
)
def test_window_matches_definition(scale, angle, tx, ty, rotate, y0, x0, h, w):
    labels = np.random.default_rng(2).integers(0, 50, size=(23, 29)).astype(np.int32)
    a = angle if rotate else 0.0
    M = np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty], [0, 0, 1]])
    expected = _brute_force(labels, M, y0, x0, h, w)
    np.testing.assert_array_equal(read_labels_window(labels, M, y0, x0, h, w), expected)
    lazy = da.from_array(labels, chunks=(7, 6))
    from xarray import DataArray

    np.testing.assert_array_equal(read_labels_window(DataArray(lazy, dims=("y", "x")), M, y0, x0, h, w), expected)


def test_window_agrees_with_scipy_nearest_neighbour():
    """scipy's order-0 affine_transform (pixel centres at integers) is an independent oracle away from ties."""
    rng = np.random.default_rng(3)
    labels = np.zeros((60, 60), dtype=np.int32)
    labels[5:55, 5:55] = rng.integers(1, 100, size=(50, 50))
    a, s = 0.37, 0.83
    M = np.array([[s * np.cos(a), -s * np.sin(a), 21.3], [s * np.sin(a), s * np.cos(a), 2.7], [0, 0, 1]])
    y0, x0, h, w = 3, 4, 30, 30
    ours = read_labels_window(labels, M, y0, x0, h, w)
    # output (row i, col j) reads input at (row, col) = R @ (i + y0 + 0.5, j + x0 + 0.5) + (ty, tx) - 0.5
    R = np.array([[M[1, 1], M[1, 0]], [M[0, 1], M[0, 0]]])
    offset = R @ np.array([y0 + 0.5, x0 + 0.5]) + np.array([M[1, 2], M[0, 2]]) - 0.5
    theirs = ndimage.affine_transform(labels, R, offset=offset, output_shape=(h, w), order=0, mode="constant")
    assert (ours == theirs).mean() > 0.99


class _RecordingArray:
    """Array-like that records every region dask reads from it."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.reads: list[tuple[slice, ...]] = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def _read_bounds(reads) -> tuple[int, int, int, int]:
    boxes = [(k[0].start, k[0].stop, k[1].start, k[1].stop) for k in reads if isinstance(k, tuple)]
    assert boxes, "nothing was read"
    return min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes)


def test_window_reads_only_the_needed_region():
    from xarray import DataArray

    source = _RecordingArray(np.ones((100, 100), dtype=np.int32))
    lazy = DataArray(da.from_array(source, chunks=(10, 10), asarray=True), dims=("y", "x"))
    source.reads.clear()
    read_labels_window(lazy, np.eye(3), 12, 31, 5, 5)  # rows 12..16, cols 31..35
    y_lo, y_hi, x_lo, x_hi = _read_bounds(source.reads)
    assert y_lo >= 10
    assert y_hi <= 20
    assert x_lo >= 30
    assert x_hi <= 40
    source.reads.clear()
    read_labels_window(lazy, np.diag([2.0, 2.0, 1.0]), 0, 0, 8, 8)  # label rows/cols 0..15
    y_lo, y_hi, x_lo, x_hi = _read_bounds(source.reads)
    assert y_lo >= 0
    assert y_hi <= 20
    assert x_lo >= 0
    assert x_hi <= 20


# ------------------------------------------------------------------------------------------ pixel size
def test_pixel_size():
    sdata = _sdata(
        {"global": Scale([0.5, 0.5], axes=("y", "x")), "microns": Scale([0.125, 0.125], axes=("y", "x"))},
        {"global": Identity(), "microns": Scale([0.25, 0.25], axes=("y", "x"))},
    )
    assert image_pixel_size(sdata, "he") == pytest.approx(0.125)
    assert image_pixel_size(sdata, "nuclei") == pytest.approx(0.25)
    assert image_pixel_size(_sdata({"global": Identity()}, {"global": Identity()}), "he") is None


def test_pixel_size_through_the_coordinate_system_graph():
    # only the labels know microns: image -> global <- labels -> microns
    sdata = _sdata(
        {"global": Scale([0.5, 0.5], axes=("y", "x"))},
        {"global": Identity(), "microns": Scale([0.2125, 0.2125], axes=("y", "x"))},
    )
    assert image_pixel_size(sdata, "he") == pytest.approx(0.2125 * 0.5)
