from __future__ import annotations

import sys

import numpy as np
import pytest
import spatialdata as sd
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed
from spatialdata.models import Image2DModel
from spatialdata.transformations import Affine, Identity, Scale, get_transformation

import ghist
from ghist._segmentation_scores import segmentation_scores
from ghist.pp._segment import _resolve_pixel_size
from ghist.pp._segment_backends import _hematoxylin

PIXEL_SIZE = 0.5


def _he_disks(size: int = 256, *, seed: int = 0, n_target: int = 70) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image of elliptical nuclei (some touching) on eosin stroma, and its true labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), dtype=np.int32)
    centres: list[tuple[float, float, float]] = []
    for _ in range(5000):
        if len(centres) == n_target:
            break
        r = rng.uniform(5.5, 8.5)  # 2.75-4.25 µm radius: 24-57 µm²
        cy, cx = rng.uniform(r, size - r, 2)
        if all(np.hypot(cy - y, cx - x) >= r + q - 0.5 for y, x, q in centres):
            centres.append((cy, cx, r))
    for i, (cy, cx, r) in enumerate(centres, start=1):
        a, b, theta = r * rng.uniform(1.0, 1.25), r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = ((u / a) ** 2 + (v / b) ** 2 <= 1) & (labels == 0)
        labels[inside] = i
    hema = np.where(labels > 0, rng.uniform(0.9, 1.3, labels.max() + 1)[labels], 0.05)
    hema = ndi.gaussian_filter(hema, 1.0) + rng.normal(0, 0.03, labels.shape)
    eosin = 0.25 + ndi.gaussian_filter(rng.normal(0, 0.1, labels.shape), 4)
    rgb = hed2rgb(np.stack([hema, eosin, np.zeros_like(hema)], axis=-1))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8), labels


def _sdata(rgb: np.ndarray, *, microns: bool = True, scale_factors: list[int] | None = None) -> sd.SpatialData:
    transformations = {"global": Identity()}
    if microns:
        transformations["microns"] = Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("y", "x"))
    image = Image2DModel.parse(
        np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), transformations=transformations, scale_factors=scale_factors
    )
    return sd.SpatialData(images={"he": image})


@pytest.fixture(scope="module")
def synthetic():
    return _he_disks()


@pytest.fixture(scope="module")
def segmented(synthetic):
    rgb, _ = synthetic
    sdata = _sdata(rgb)
    ghist.pp.segment_nuclei(sdata, progress=False)
    return sdata


def _labels(sdata: sd.SpatialData, key: str = "nuclei") -> np.ndarray:
    return np.asarray(sdata.labels[key].data.compute())


def _on_labels_grid(sdata: sd.SpatialData, key: str, truth_key: str = "nuclei") -> tuple[np.ndarray, np.ndarray]:
    """True labels, and the predicted labels (in the H&E's pixel space) sampled at the true labels' pixel centres."""
    truth = np.asarray(sdata.labels[truth_key].data)
    pred = _labels(sdata, key)
    xy = ("x", "y")
    to_global = get_transformation(sdata.labels[truth_key], "global").to_affine_matrix(xy, xy)
    from_global = np.linalg.inv(get_transformation(sdata.images["he"], "global").to_affine_matrix(xy, xy))
    rows, cols = np.indices(truth.shape)
    x, y, _ = from_global @ to_global @ np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5, np.ones(rows.size)])
    xi, yi = np.floor(x).astype(int), np.floor(y).astype(int)
    inside = (xi >= 0) & (yi >= 0) & (xi < pred.shape[1]) & (yi < pred.shape[0])
    sampled = np.zeros(truth.size, dtype=pred.dtype)
    sampled[inside] = pred[yi[inside], xi[inside]]
    return truth, sampled.reshape(truth.shape)


@pytest.fixture(scope="module")
def tissue():
    return ghist.datasets.synthetic(image_size=384, n_genes=10, seed=0)


@pytest.mark.parametrize("he_transform", ["identity", "scale"])
def test_f1_on_synthetic_tissue(he_transform):
    sdata = ghist.datasets.synthetic(image_size=384, n_genes=10, image_transform=he_transform, seed=0)
    ghist.pp.segment_nuclei(sdata, key_added="segmented", progress=False)
    truth, pred = _on_labels_grid(sdata, "segmented")
    scores = segmentation_scores(truth, pred)
    assert scores["f1"] >= 0.8, scores
    assert abs(scores["n_pred"] - scores["n_true"]) <= 0.15 * scores["n_true"], scores


def test_f1_on_disks(synthetic, segmented):
    _, truth = synthetic
    scores = segmentation_scores(truth, _labels(segmented))
    assert scores["f1"] >= 0.9, scores


def test_result_element(segmented):
    labels = segmented.labels["nuclei"]
    assert labels.dtype == np.int32
    assert tuple(labels.dims) == ("y", "x")
    assert labels.shape == segmented.images["he"].shape[1:]
    assert get_transformation(labels, get_all=True) == get_transformation(segmented.images["he"], get_all=True)
    ids = np.unique(_labels(segmented))
    ids = ids[ids > 0]
    assert ids.size > 0
    # ids are unique per object and numbered from 1 with few gaps
    assert ids[0] == 1
    assert ids[-1] <= ids.size + 2
    lab = _labels(segmented)
    objects = ndi.find_objects(lab)
    n_parts = [ndi.label(lab[sl] == i)[1] for i, sl in enumerate(objects, start=1) if sl is not None]
    assert max(n_parts) == 1


@pytest.mark.parametrize("chunk_size", [64, 100])
def test_chunk_size_invariance(tissue, chunk_size):
    sdata = sd.SpatialData(images={"he": tissue.images["he"]}, labels={"truth": tissue.labels["nuclei"]})
    ghist.pp.segment_nuclei(sdata, key_added="whole", progress=False)
    ghist.pp.segment_nuclei(sdata, key_added="chunked", chunk_size=chunk_size, progress=False)
    whole, chunked = _labels(sdata, "whole"), _labels(sdata, "chunked")
    assert chunked.shape[0] > 3 * chunk_size
    # the same objects, up to relabelling
    assert segmentation_scores(whole, chunked, iou_threshold=0.9)["f1"] >= 0.97
    assert (whole > 0).sum() == pytest.approx((chunked > 0).sum(), rel=0.02)
    # ids run from 1 with few gaps
    ids = np.unique(chunked)[1:]
    assert ids[0] == 1
    assert ids[-1] <= 1.02 * ids.size
    # no detected nucleus crossing a chunk border is split into two ids
    borders = np.arange(chunk_size, whole.shape[0], chunk_size)
    crossing = (set(np.unique(whole[borders, :])) | set(np.unique(whole[:, borders]))) - {0}
    assert len(crossing) >= 20
    for i in crossing:
        ids, counts = np.unique(chunked[whole == i], return_counts=True)
        counts = counts[ids > 0]
        assert (counts >= 0.2 * (whole == i).sum()).sum() <= 1, f"nucleus {i} split at a chunk border"
    truth, pred = _on_labels_grid(sdata, "chunked", truth_key="truth")
    assert segmentation_scores(truth, pred)["f1"] >= 0.8


def test_halo_too_small_warns(synthetic, caplog):
    rgb, _ = synthetic
    sdata = _sdata(rgb)
    with caplog.at_level("WARNING", logger="ghist"):
        ghist.pp.segment_nuclei(sdata, chunk_size=64, halo=4, progress=False)
    assert "halo" in caplog.text


def test_multiscale_and_pixel_size_argument(synthetic):
    rgb, truth = synthetic
    sdata = _sdata(rgb, microns=False, scale_factors=[2])
    with pytest.raises(ValueError, match="pixel_size"):
        ghist.pp.segment_nuclei(sdata, progress=False)
    assert "nuclei" not in sdata.labels
    ghist.pp.segment_nuclei(sdata, pixel_size=PIXEL_SIZE, progress=False)
    assert segmentation_scores(truth, _labels(sdata))["f1"] >= 0.8


def test_size_filters(synthetic, segmented):
    rgb, _ = synthetic
    sdata = _sdata(rgb)
    ghist.pp.segment_nuclei(sdata, min_area_um2=40.0, max_area_um2=60.0, progress=False)
    lab = _labels(sdata)
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas > 0] * PIXEL_SIZE**2
    assert areas.size > 0
    assert areas.min() >= 40.0
    assert areas.max() <= 60.0
    assert areas.size < np.unique(_labels(segmented)).size - 1


def test_overwrite(synthetic):
    rgb, _ = synthetic
    sdata = _sdata(rgb)
    ghist.pp.segment_nuclei(sdata, key_added="seg", progress=False)
    first = _labels(sdata, "seg")
    with pytest.raises(ValueError, match="overwrite=True"):
        ghist.pp.segment_nuclei(sdata, key_added="seg", progress=False)
    ghist.pp.segment_nuclei(sdata, key_added="seg", overwrite=True, progress=False, threshold_factor=2.0)
    assert (_labels(sdata, "seg") > 0).sum() < (first > 0).sum()
    with pytest.raises(ValueError, match="unique"):
        ghist.pp.segment_nuclei(sdata, key_added="he", overwrite=True, progress=False)


def test_backed_store_is_written(synthetic, tmp_path):
    rgb, _ = synthetic
    path = tmp_path / "sample.zarr"
    _sdata(rgb).write(path)
    sdata = sd.read_zarr(path)
    ghist.pp.segment_nuclei(sdata, progress=False)
    assert "nuclei" in sd.read_zarr(path).labels
    ghist.pp.segment_nuclei(sdata, overwrite=True, progress=False, threshold_factor=2.0)
    on_disk = np.asarray(sd.read_zarr(path).labels["nuclei"].data.compute())
    np.testing.assert_array_equal(on_disk, _labels(sdata))


def test_input_validation(synthetic):
    rgb, _ = synthetic
    sdata = _sdata(rgb)
    with pytest.raises(ValueError, match="watershed"):
        ghist.pp.segment_nuclei(sdata, method="unet", progress=False)
    with pytest.raises(KeyError, match="missing"):
        ghist.pp.segment_nuclei(sdata, image_key="missing", progress=False)
    with pytest.raises(TypeError, match="blob_sigma_um"):
        ghist.pp.segment_nuclei(sdata, sigma=1.0, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        ghist.pp.segment_nuclei(sdata, chunk_size=8, progress=False)
    with pytest.raises(ValueError, match="min_area_um2"):
        ghist.pp.segment_nuclei(sdata, min_area_um2=50, max_area_um2=20, progress=False)
    with pytest.raises(ValueError, match="pixel_size"):
        ghist.pp.segment_nuclei(sdata, pixel_size=-1.0, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        ghist.pp.segment_nuclei(sdata, threshold="li", progress=False)
    with pytest.raises(ValueError, match="model"):
        ghist.pp.segment_nuclei(sdata, model=object(), progress=False)
    with pytest.raises(ValueError, match="halo"):
        ghist.pp.segment_nuclei(sdata, halo=-1, progress=False)
    float_image = Image2DModel.parse(np.moveaxis(rgb, -1, 0).astype(np.float32) / 255, dims=("c", "y", "x"))
    with pytest.raises(ValueError, match="uint8"):
        ghist.pp.segment_nuclei(sd.SpatialData(images={"he": float_image}), pixel_size=0.5, progress=False)
    assert not sdata.labels


def test_fixed_threshold(synthetic):
    rgb, truth = synthetic
    sdata = _sdata(rgb)
    ghist.pp.segment_nuclei(sdata, threshold=0.3, progress=False)
    assert segmentation_scores(truth, _labels(sdata))["f1"] >= 0.8
    empty = _sdata(rgb)
    ghist.pp.segment_nuclei(empty, threshold=10.0, progress=False)
    assert not _labels(empty).any()


@pytest.mark.parametrize(("method", "modules"), [("stardist", ["stardist", "csbdeep"]), ("cellpose", ["cellpose"])])
def test_optional_backend_missing(synthetic, monkeypatch, method, modules):
    rgb, _ = synthetic
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"ghist\[{method}\]"):
        ghist.pp.segment_nuclei(_sdata(rgb), method=method, model=object(), progress=False)


def test_pixel_size_from_microns_transformation(synthetic):
    rgb, _ = synthetic
    image = np.moveaxis(rgb, -1, 0)
    angle = np.deg2rad(30)
    rotation = 0.25 * np.array([[np.cos(angle), -np.sin(angle), 5], [np.sin(angle), np.cos(angle), 7], [0, 0, 1]])
    rotation[2, 2] = 1
    element = Image2DModel.parse(
        image, dims=("c", "y", "x"), transformations={"microns": Affine(rotation, ("x", "y"), ("x", "y"))}
    )
    sdata = sd.SpatialData(images={"he": element})
    assert _resolve_pixel_size(sdata, "he", None) == pytest.approx(0.25)
    assert _resolve_pixel_size(sdata, "he", 0.7) == 0.7
    # ghist's one rule also finds the size through the graph: image -> "global" <- labels -> "microns"
    assert ghist._spatial.image_pixel_size(sdata, "he") == pytest.approx(0.25)


def test_hematoxylin_matches_skimage():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :4] = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)]
    np.testing.assert_allclose(_hematoxylin(rgb), rgb2hed(rgb)[..., 0], atol=1e-5)
