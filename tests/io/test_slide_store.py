"""ghist.io.open_slide_store: one zarr store per slide file, written step by step and reopened where a run left it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import spatialdata as sd

import ghist
from ghist._write import elements_on_disk
from ghist.pp import _segment

from .test_wsi import _write_pyramid


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    he = np.asarray(ghist.datasets.synthetic(image_size=256, n_genes=8, seed=0).images["he"]).transpose(1, 2, 0)
    canvas = np.full((320, 288, 3), 243, np.uint8)  # glass around the tissue
    canvas[32:288, 16:272] = he
    path = tmp_path_factory.mktemp("slides") / "slide.tif"
    _write_pyramid(path, canvas, mpp=0.5)
    return path


def test_store_beside_the_slide_keeps_each_step(tmp_path, slide):
    local = tmp_path / slide.name
    local.write_bytes(slide.read_bytes())
    sdata = ghist.io.open_slide_store(local)
    store = tmp_path / "slide.zarr"
    assert sdata.path.resolve() == store.resolve()
    assert "he" in sdata.images
    assert elements_on_disk(sdata) == {}  # the image stays in the slide file
    assert sdata.attrs["ghist_slide"]["size"] == local.stat().st_size
    ghist.pp.detect_tissue(sdata, min_area_um2=1000.0)
    ghist.pp.segment_nuclei(sdata, roi_key="tissue", progress=False, num_workers=1)
    assert elements_on_disk(sdata) == {"tissue": "shapes", "nuclei": "labels"}
    assert not any(p.name.startswith(".ghist-segment-") for p in store.iterdir())  # checkpoint removed when done

    again = ghist.io.open_slide_store(local)
    assert set(again.labels) == {"nuclei"}
    assert set(again.shapes) == {"tissue"}
    np.testing.assert_array_equal(np.asarray(again.labels["nuclei"]), np.asarray(sdata.labels["nuclei"]))
    assert "he" not in sd.read_zarr(store).images

    # a store creation killed before its rename leaves a hidden scratch folder: the next creation removes it
    dead = tmp_path / ".other.zarr.ghist-new-999999999-0123"
    dead.mkdir()
    other = tmp_path / "other.tif"
    other.write_bytes(slide.read_bytes())
    ghist.io.open_slide_store(other)
    assert not dead.exists()
    assert not list(tmp_path.glob(".*ghist-new*"))

    with_image = ghist.io.open_slide_store(local, write_image=True)
    assert elements_on_disk(with_image)["he"] == "images"


def test_store_refuses_another_file(tmp_path, slide):
    local = tmp_path / "a.tif"
    local.write_bytes(slide.read_bytes())
    store = tmp_path / "elsewhere" / "a.zarr"
    ghist.io.open_slide_store(local, store)
    other = tmp_path / "b.tif"
    other.write_bytes(slide.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="was made from"):
        ghist.io.open_slide_store(other, store)
    os.utime(local, ns=(0, 0))  # the same file, changed since
    with pytest.raises(ValueError, match="older version"):
        ghist.io.open_slide_store(local, store)
    plain = tmp_path / "plain.zarr"
    sd.SpatialData().write(plain)
    with pytest.raises(ValueError, match="records no slide file"):
        ghist.io.open_slide_store(other, plain)
    with pytest.raises(FileNotFoundError):
        ghist.io.open_slide_store(tmp_path / "missing.tif")


def test_segmentation_resumes_from_finished_blocks(tmp_path, slide, monkeypatch):
    """A segmentation killed after 3 blocks redoes only the others and gives the labels of an uninterrupted run."""
    expected = ghist.io.read_wsi(slide)
    ghist.pp.segment_nuclei(expected, chunk_size=96, progress=False, num_workers=1)

    make_backend = _segment.make_backend
    calls = {"n": 0, "fail_after": 3}

    def counting(*args, **kwargs):
        backend = make_backend(*args, **kwargs)
        segment = backend.segment

        def wrapped(block):
            if calls["n"] == calls["fail_after"]:
                raise KeyboardInterrupt  # stands for a kill: nothing after this block runs
            calls["n"] += 1
            return segment(block)

        return backend._replace(segment=wrapped)

    monkeypatch.setattr(_segment, "make_backend", counting)
    sdata = ghist.io.open_slide_store(slide, tmp_path / "s.zarr")
    with pytest.raises(KeyboardInterrupt):
        ghist.pp.segment_nuclei(sdata, chunk_size=96, progress=False, num_workers=1)
    assert "nuclei" not in elements_on_disk(sdata)
    saved = list((tmp_path / "s.zarr" / ".ghist-segment-nuclei").glob("block-*.npz"))
    assert len(saved) == 3

    calls.update(n=0, fail_after=-1)
    sdata = ghist.io.open_slide_store(slide, tmp_path / "s.zarr")
    ghist.pp.segment_nuclei(sdata, chunk_size=96, progress=False, num_workers=1)
    n_blocks = 4 * 3  # 320 x 288 px in 96 px blocks
    assert calls["n"] == n_blocks - 3
    np.testing.assert_array_equal(np.asarray(sdata.labels["nuclei"]), np.asarray(expected.labels["nuclei"]))
    assert not (tmp_path / "s.zarr" / ".ghist-segment-nuclei").exists()


def test_elements_a_killed_writer_did_not_list_yet_are_opened(tmp_path, slide, monkeypatch):
    """A kill after an element's folder is moved in, before the metadata lists it: the next open lists and reads it."""
    import zarr

    store = tmp_path / "s.zarr"
    sdata = ghist.io.open_slide_store(slide, store)
    listing = (store / "zarr.json").read_bytes()  # the consolidated metadata before the writes
    ghist.pp.detect_tissue(sdata, min_area_um2=1000.0)
    ghist.pp.segment_nuclei(sdata, progress=False, num_workers=1)
    # the state a writer killed right after its renames leaves: folders in place, listed nowhere
    (store / "zarr.json").write_bytes(listing)
    labels_group = zarr.open_group(store / "labels", mode="r+", use_consolidated=False)
    attrs = labels_group.attrs.asdict()
    attrs.get("ome", attrs)["labels"] = []
    labels_group.attrs.update(attrs)
    assert "tissue" not in sd.read_zarr(store).shapes  # not listed: spatialdata alone does not see it
    again = ghist.io.open_slide_store(slide, store)
    assert set(again.shapes) == {"tissue"}
    assert set(again.labels) == {"nuclei"}
    np.testing.assert_array_equal(np.asarray(again.labels["nuclei"]), np.asarray(sdata.labels["nuclei"]))
    assert set(sd.read_zarr(store).labels) == {"nuclei"}
