"""fit_segmenter, NucleusSegmenter files and segment_nuclei(method="ghist")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import spatialdata as sd
import torch
from spatialdata.models import Image2DModel, Labels2DModel
from spatialdata.transformations import Identity, Scale

import ghist
from ghist.pp import NucleusSegmenter, fit_segmenter, segment_nuclei

TINY = {"widths": (8, 12), "unshuffle": 2}


class Payload:
    """An object a pickle would rebuild by running code: a safe loader must refuse it."""


def toy_sdata(side: int = 96, seed: int = 0, *, labels_dtype=np.int32, channels: int = 3) -> sd.SpatialData:
    """Dark purple disks on pink, with their instance labels, 0.5 µm per pixel."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((side, side, 3), dtype=np.uint8)
    rgb[:] = (235, 170, 210)
    labels = np.zeros((side, side), dtype=np.int32)
    yy, xx = np.mgrid[:side, :side]
    n = 0
    for _ in range(60):
        cy, cx, r = rng.uniform(6, side - 6), rng.uniform(6, side - 6), rng.uniform(3, 5.5)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (labels[disk] > 0).any():
            continue
        n += 1
        labels[disk] = n
        rgb[disk] = (70, 40, 120)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    transformations = {"global": Identity(), "microns": Scale([0.5, 0.5], axes=("y", "x"))}
    image = np.moveaxis(rgb, -1, 0)[:channels]
    sdata = sd.SpatialData(
        images={"he": Image2DModel.parse(image, dims=("c", "y", "x"), transformations=transformations)},
        labels={"nuclei": Labels2DModel.parse(labels, dims=("y", "x"), transformations=dict(transformations))},
    )
    # spatialdata >= 0.8 refuses float labels when parsing and building: other dtypes go in afterwards, as a store
    # written by another tool can hold them (what is tested is ghist's own check)
    sdata.labels["nuclei"].data = sdata.labels["nuclei"].data.astype(labels_dtype)
    return sdata


def seeded_segmenter(**kwargs) -> NucleusSegmenter:
    torch.manual_seed(0)
    return NucleusSegmenter(pixel_size=0.5, **{**TINY, **kwargs})


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_maps_and_labels(tmp_path):
    seg = seeded_segmenter(fg_threshold=0.45, marker_threshold=0.55)
    seg.training = {"steps": 3}
    rgb = np.moveaxis(np.asarray(toy_sdata().images["he"].data), 0, -1)
    seg.save(tmp_path / "seg")
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["segmenter.json", "weights.pt"]
    loaded = NucleusSegmenter.load(tmp_path / "seg")
    maps = seg.predict_maps(rgb)
    assert maps.std() > 0  # the untrained network's maps are not constant, so equality says something
    np.testing.assert_array_equal(loaded.predict_maps(rgb), maps)
    low = {"fg_threshold": float(np.median(maps[0])), "marker_threshold": float(np.median(maps[1]))}
    labels = seg.segment(rgb, 0.5, **low)
    assert labels.max() > 0
    np.testing.assert_array_equal(loaded.segment(rgb, 0.5, **low), labels)
    assert (loaded.fg_threshold, loaded.marker_threshold, loaded.training) == (0.45, 0.55, {"steps": 3})
    assert "trained 3 steps" in repr(loaded)


def test_save_refuses_to_replace_what_is_not_a_segmenter(tmp_path):
    seg = seeded_segmenter()
    seg.save(tmp_path / "seg")
    with pytest.raises(FileExistsError, match="overwrite"):
        seg.save(tmp_path / "seg")
    seg.save(tmp_path / "seg", overwrite=True)  # an earlier segmenter may be replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a ghist nucleus segmenter"):
        seg.save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"config.json": "{}", "weights_best.h5": ""}, "StarDist"),
        ({"model.json": "{}", "weights.pt": ""}, "expression model"),
        ({"readme.txt": "x"}, "not a ghist nucleus segmenter folder"),
        ({"segmenter.json": '{"format": "something-else"}', "weights.pt": ""}, "does not describe"),
        ({"segmenter.json": "{not json", "weights.pt": ""}, "not readable JSON"),
    ],
)
def test_load_names_folders_of_other_tools(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        NucleusSegmenter.load(tmp_path)
    with pytest.raises(ValueError, match=match):
        segment_nuclei(toy_sdata(32), method="ghist", model=tmp_path, key_added="learned", progress=False)


def test_load_refuses_pickles_and_weights_of_another_network(tmp_path):
    seeded_segmenter().save(tmp_path / "seg")
    settings = json.loads((tmp_path / "seg" / "segmenter.json").read_text())
    (tmp_path / "seg" / "segmenter.json").write_text(json.dumps({**settings, "widths": [8, 16]}))
    with pytest.raises(ValueError, match="do not fit"):
        NucleusSegmenter.load(tmp_path / "seg")

    (tmp_path / "seg" / "segmenter.json").write_text(json.dumps(settings))
    torch.save({"stem.0.0.weight": Payload()}, tmp_path / "seg" / "weights.pt")
    with pytest.raises(ValueError, match="cannot be read safely"):
        NucleusSegmenter.load(tmp_path / "seg")
    with pytest.raises(FileNotFoundError):
        NucleusSegmenter.load(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------------
# segment_nuclei(method="ghist") arguments
# ----------------------------------------------------------------------------------------------------------------------


def test_segment_nuclei_method_and_model_errors(tmp_path):
    sdata = toy_sdata(32)
    with pytest.raises(ValueError, match="Unknown segmentation `method` 'hovernet'"):
        segment_nuclei(sdata, method="hovernet", key_added="learned", progress=False)
    with pytest.raises(ValueError, match="needs `model=`"):
        segment_nuclei(sdata, method="ghist", key_added="learned", progress=False)
    with pytest.raises(ValueError, match="neither a folder nor a bundled"):
        segment_nuclei(sdata, method="ghist", model="no-such-model", key_added="learned", progress=False)
    with pytest.raises(TypeError, match="NucleusSegmenter"):
        segment_nuclei(sdata, method="ghist", model=torch.nn.Linear(2, 2), key_added="learned", progress=False)
    with pytest.raises(TypeError, match="Unknown option"):
        segment_nuclei(
            sdata, method="ghist", model=seeded_segmenter(), key_added="learned", progress=False, threshold=0.3
        )
    with pytest.raises(ValueError, match="must be a number in"):
        segment_nuclei(
            sdata, method="ghist", model=seeded_segmenter(), key_added="learned", progress=False, fg_threshold=2
        )
    with pytest.raises(ValueError, match="method='watershed' needs none"):
        segment_nuclei(sdata, method="watershed", model=seeded_segmenter(), key_added="learned", progress=False)
    assert "learned" not in sdata.labels


def test_segment_nuclei_uses_a_model_at_another_pixel_size(monkeypatch):
    """A 0.25 µm/px image through a 0.5 µm/px model: labels on the image's grid, area range from the model.

    The network is replaced by perfect maps of the window it is given (dark pixels are nuclei), so what is tested is
    the resampling to the working grid, the watershed and the way back.
    """
    from scipy import ndimage as ndi

    from ghist._model._nucleus_net import nucleus_targets
    from ghist._segmentation_scores import segmentation_scores

    seen = []

    def perfect_maps(rgb):
        seen.append(rgb.shape)
        return nucleus_targets(ndi.label(rgb.mean(axis=-1) < 128)[0])

    seg = seeded_segmenter()
    monkeypatch.setattr(seg, "predict_maps", perfect_maps)
    seg.min_area_um2, seg.max_area_um2 = 5.0, 100.0
    toy = toy_sdata(96)
    rgb = np.moveaxis(np.asarray(toy.images["he"].data), 0, -1)
    true = np.repeat(np.repeat(np.asarray(toy.labels["nuclei"].data), 2, 0), 2, 1)
    fine = np.moveaxis(np.repeat(np.repeat(rgb, 2, 0), 2, 1), -1, 0)
    sdata = sd.SpatialData(images={"he": Image2DModel.parse(fine, dims=("c", "y", "x"))})
    segment_nuclei(sdata, method="ghist", model=seg, pixel_size=0.25, key_added="learned", progress=False)
    assert seen == [(96, 96, 3)]  # the network saw the working grid
    labels = np.asarray(sdata.labels["learned"].data)
    assert labels.shape == (192, 192)
    assert labels.dtype == np.int32
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0] * 0.25**2
    assert areas.min() >= 5.0
    assert areas.max() <= 100.0
    scores = segmentation_scores(true, labels)
    assert scores["f1"] > 0.9
    assert scores["sq"] > 0.8


# ----------------------------------------------------------------------------------------------------------------------
# fit_segmenter arguments
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [
        (lambda: toy_sdata(labels_dtype=np.float32), {}, ValueError, "expected integer instance ids"),
        (lambda: toy_sdata(channels=1), {}, ValueError, "expected 3 \\(RGB H&E\\)"),
        (lambda: toy_sdata(), {"labels_key": "cells"}, KeyError, "Labels 'cells' not found"),
        (lambda: toy_sdata(), {"max_time": "ten minutes"}, ValueError, "max_time"),
        (lambda: toy_sdata(), {"pixel_size": [0.5, 0.5]}, ValueError, "one each"),
        (lambda: toy_sdata(), {"val_fraction": 0.9}, ValueError, "val_fraction"),
        (lambda: "he.tif", {}, TypeError, "SpatialData"),
        (lambda: [toy_sdata(), None], {}, TypeError, "SpatialData"),
    ],
)
def test_fit_segmenter_named_errors(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_segmenter(make(), progress=False, max_steps=1, **kwargs)


def test_fit_segmenter_refuses_labels_without_nuclei_and_3d_labels():
    sdata = toy_sdata(32)
    sdata.labels["nuclei"] = Labels2DModel.parse(np.zeros((32, 32), np.int32), dims=("y", "x"))
    with pytest.raises(ValueError, match="hold no nuclei"):
        fit_segmenter(sdata, progress=False, max_steps=1, pixel_size=0.5)
    from spatialdata.models import Labels3DModel

    sdata = toy_sdata(32)
    sdata.labels["nuclei"] = Labels3DModel.parse(np.ones((2, 32, 32), np.int32), dims=("z", "y", "x"))
    with pytest.raises(ValueError, match="expected 2D"):
        fit_segmenter(sdata, progress=False, max_steps=1)


# ----------------------------------------------------------------------------------------------------------------------
# Training (slow)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_is_reproducible_with_a_seed():
    data = [toy_sdata(64, seed=0), toy_sdata(64, seed=1)]
    kwargs = {"max_steps": 3, "batch_size": 2, "crop_size": 32, "progress": False, **TINY}
    a, b = fit_segmenter(data, seed=3, **kwargs), fit_segmenter(data, seed=3, **kwargs)
    c = fit_segmenter(data, seed=4, **kwargs)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.training["steps"] == 3
    assert a.training["seed"] == 3
    # trained channels-last for speed, handed back in the standard layout that save() writes and others expect
    assert all(t.is_contiguous() for t in sa.values())


@pytest.fixture(scope="module")
def trained():
    """A small segmenter trained briefly on one synthetic slide (0.5 µm/px)."""
    train = ghist.datasets.synthetic(image_size=256, n_genes=5, seed=0)
    return fit_segmenter(train, max_steps=200, batch_size=4, crop_size=64, widths=(16, 24, 32), seed=0, progress=False)


@pytest.mark.slow
def test_a_short_fit_segments_an_unseen_synthetic_slide_well(trained):
    test = ghist.datasets.synthetic(image_size=256, n_genes=5, seed=1)
    segment_nuclei(test, method="ghist", model=trained, key_added="learned", progress=False)
    segment_nuclei(test, method="watershed", key_added="watershed", progress=False)
    scores = ghist.tl.evaluate_segmentation(test, labels_key="learned", true_key="nuclei").iloc[0]
    baseline = ghist.tl.evaluate_segmentation(test, labels_key="watershed", true_key="nuclei").iloc[0]
    assert scores["f1"] > 0.7
    assert scores["pq"] > 0.5
    assert scores["pq"] > baseline["pq"]
    history = trained.training["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]


@pytest.mark.slow
def test_chunked_segmentation_matches_the_whole_image(trained, tmp_path):
    test = ghist.datasets.synthetic(image_size=256, n_genes=5, seed=1)
    trained.save(tmp_path / "seg")
    # Read as if at the model's own pixel size, so that no window is resampled: every window sees the same grid.
    same = {"method": "ghist", "progress": False, "pixel_size": trained.pixel_size}
    segment_nuclei(test, model=tmp_path / "seg", key_added="whole", chunk_size=256, **same)
    segment_nuclei(test, model=trained, key_added="chunks", chunk_size=96, halo=80, **same)
    scores = ghist.tl.evaluate_segmentation(test, labels_key="chunks", true_key="whole", iou_threshold=0.9).iloc[0]
    # the same nuclei, nearly pixel for pixel (windows of other sizes pad and align the network differently)
    assert scores["n_true"] > 50
    assert scores["f1"] > 0.95
    # At the image's own 0.5 µm/px each window is resampled on its own grid, a fraction of a pixel apart from the
    # whole image's: outlines move by up to a pixel, the nuclei stay the same.
    other = {"method": "ghist", "progress": False}
    assert trained.pixel_size != 0.5
    segment_nuclei(test, model=trained, key_added="whole_05", chunk_size=256, **other)
    segment_nuclei(test, model=trained, key_added="chunks_05", chunk_size=96, halo=80, **other)
    scores = ghist.tl.evaluate_segmentation(test, labels_key="chunks_05", true_key="whole_05").iloc[0]
    assert scores["n_true"] > 50
    assert scores["f1"] > 0.95


def test_blur_augmentation_keeps_the_mean_and_softens():
    from ghist.pp._fit_segmenter import _gaussian_blur

    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 255
    assert _gaussian_blur(image, 0.1) is image  # below a fifth of a pixel: unchanged
    soft = _gaussian_blur(image, 1.5)
    assert soft.shape == image.shape
    torch.testing.assert_close(soft.mean(), image.mean(), rtol=0.02, atol=0)
    assert soft.std() < 0.6 * image.std()
    with pytest.raises(ValueError, match="blur_jitter"):
        ghist.pp.fit_segmenter(toy_sdata(32), max_steps=1, blur_jitter=-1, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Stain normalisation
# ----------------------------------------------------------------------------------------------------------------------


def restained(sdata: sd.SpatialData, key: str = "he") -> sd.SpatialData:
    """A copy of ``sdata`` whose image is darker and bluer, as a slide stained in another lab."""
    from ghist.pp._stain_norm import StainMap, StainStatistics

    rgb = np.moveaxis(np.asarray(sdata.images[key].data), 0, -1)
    own = StainStatistics.of(rgb)
    other = StainStatistics((own.mean[0] - 10, own.mean[1] - 3, own.mean[2] - 8), tuple(1.2 * s for s in own.std), 1)
    image = Image2DModel.parse(
        np.moveaxis(StainMap(own, other)(rgb), -1, 0),
        dims=("c", "y", "x"),
        transformations=dict(sdata.images[key].attrs["transform"]),
    )
    return sd.SpatialData(images={key: image}, labels=dict(sdata.labels))


def test_fit_records_the_training_colours_and_trains_on_images_mapped_to_them(tmp_path, monkeypatch):
    from ghist.pp import _fit_segmenter
    from ghist.pp._stain_norm import StainStatistics

    data = [toy_sdata(64, seed=0), restained(toy_sdata(64, seed=1))]
    seen = []
    real_batch = _fit_segmenter._batch
    monkeypatch.setattr(_fit_segmenter, "_batch", lambda samples, *a: seen.append(samples) or real_batch(samples, *a))
    kwargs = {"max_steps": 1, "batch_size": 2, "crop_size": 32, "progress": False, **TINY}
    seg = fit_segmenter(data, **kwargs)
    rgbs = [np.moveaxis(np.asarray(s.images["he"].data), 0, -1) for s in data]
    reference = StainStatistics.pooled([StainStatistics.of(rgb) for rgb in rgbs])
    np.testing.assert_allclose(seg.stain_reference.mean, reference.mean, atol=1e-6)
    assert seg.training["normalise_stain"] is True
    # both images were mapped to the pooled colours before training: their statistics now agree
    trained_on = [StainStatistics.of(sample.rgb) for sample in seen[0]]
    np.testing.assert_allclose(trained_on[0].mean, trained_on[1].mean, atol=1.5)
    np.testing.assert_allclose(trained_on[0].mean, reference.mean, atol=1.5)
    seg.save(tmp_path / "seg")
    assert NucleusSegmenter.load(tmp_path / "seg").stain_reference == seg.stain_reference
    assert fit_segmenter(data, normalise_stain=False, **kwargs).stain_reference is None
    with pytest.raises(TypeError, match="normalise_stain"):
        fit_segmenter(data, normalise_stain="yes", **kwargs)


def test_folders_saved_before_stain_normalisation_load_without_it(tmp_path):
    seeded_segmenter().save(tmp_path / "seg")
    settings = json.loads((tmp_path / "seg" / "segmenter.json").read_text())
    assert settings["stain_reference"] is None
    del settings["stain_reference"]
    (tmp_path / "seg" / "segmenter.json").write_text(json.dumps(settings))
    assert NucleusSegmenter.load(tmp_path / "seg").stain_reference is None
    settings["stain_reference"] = {"lab_mean": [1, 2]}
    (tmp_path / "seg" / "segmenter.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"invalid settings.*lab_std"):
        NucleusSegmenter.load(tmp_path / "seg")


def _two_peaks(saddle: float, low_peak: float = 1.0) -> np.ndarray:
    """Maps of one foreground blob whose distance map has peaks 1 and ``low_peak`` joined at ``saddle``."""
    x = np.arange(60, dtype=np.float32)
    # piecewise-linear ridge along x: up to 1 at x=15, down to `saddle` at x=30, up to `low_peak` at x=45
    ridge = np.interp(x, [5, 15, 30, 45, 55], [0.2, 1.0, saddle, low_peak, 0.2]).astype(np.float32)
    maps = np.zeros((2, 20, 60), np.float32)
    maps[0, 5:15, 5:56] = 1.0
    maps[1, 5:15, 5:56] = ridge[5:56]
    return maps


@pytest.mark.parametrize(
    ("saddle", "low_peak", "prominence", "expected"),
    [
        (0.7, 1.0, 0.0, 1),  # one seed region above the marker threshold: one nucleus without the split
        (0.7, 1.0, 0.1, 2),  # both peaks rise 0.3 above the saddle: two nuclei
        (0.7, 1.0, 0.5, 1),  # ... but not 0.5
        (0.7, 0.75, 0.1, 1),  # the lower peak rises only 0.05: a wiggle, not a nucleus
        (0.2, 1.0, 0.0, 2),  # a saddle under the marker threshold splits the seed region anyway
    ],
)
def test_prominent_distance_peaks_split_a_seed_region(saddle, low_peak, prominence, expected):
    from ghist.pp._segmenter_model import instances_from_maps

    maps = _two_peaks(saddle, low_peak)
    labels = instances_from_maps(maps, fg_threshold=0.5, marker_threshold=0.5, marker_prominence=prominence)
    assert labels.max() == expected
    assert np.array_equal(labels > 0, maps[0] > 0.5)  # the split moves no pixel in or out of the foreground
    if expected == 2:  # cut near the valley: each nucleus holds one peak
        assert labels[10, 15] != labels[10, 45]
        assert abs(int(np.flatnonzero(np.diff(labels[10, 5:56]))[0]) + 5 - 30) <= 2


def test_folders_saved_before_marker_prominence_load_with_the_default(tmp_path):
    seeded_segmenter().save(tmp_path / "seg")
    settings = json.loads((tmp_path / "seg" / "segmenter.json").read_text())
    assert settings["marker_prominence"] == NucleusSegmenter().marker_prominence
    del settings["marker_prominence"]
    (tmp_path / "seg" / "segmenter.json").write_text(json.dumps(settings))
    assert NucleusSegmenter.load(tmp_path / "seg").marker_prominence == 0.1
    with pytest.raises(ValueError, match="marker_prominence"):
        NucleusSegmenter(marker_prominence=1.5)


def test_segment_nuclei_maps_each_image_to_the_training_colours(monkeypatch):
    from ghist.pp._stain_norm import StainStatistics

    seg = seeded_segmenter()
    seg.stain_reference = StainStatistics((60.0, 30.0, -20.0), (12.0, 9.0, 9.0), 1)
    seen = []
    real = NucleusSegmenter.predict_maps
    monkeypatch.setattr(NucleusSegmenter, "predict_maps", lambda self, rgb: seen.append(rgb.copy()) or real(self, rgb))
    sdata = toy_sdata(64)
    segment_nuclei(sdata, method="ghist", model=seg, progress=False, key_added="mapped")
    np.testing.assert_allclose(StainStatistics.of(seen[-1]).mean, seg.stain_reference.mean, atol=1.5)
    segment_nuclei(sdata, method="ghist", model=seg, progress=False, key_added="own", normalise_stain=False)
    np.testing.assert_array_equal(seen[-1], np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1))
    with pytest.raises(TypeError, match="normalise_stain"):
        segment_nuclei(sdata, method="ghist", model=seg, progress=False, key_added="x", normalise_stain=1)


@pytest.mark.slow
def test_a_restained_slide_is_segmented_like_the_original(trained):
    test = ghist.datasets.synthetic(image_size=256, n_genes=5, seed=1)
    other = restained(test)
    segment_nuclei(test, method="ghist", model=trained, key_added="learned", progress=False)
    segment_nuclei(other, method="ghist", model=trained, key_added="learned", progress=False)
    other.labels["original"] = test.labels["learned"]
    same = ghist.tl.evaluate_segmentation(other, labels_key="learned", true_key="original").iloc[0]
    assert same["n_true"] > 50
    assert same["f1"] > 0.9
