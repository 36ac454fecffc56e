"""`fit` always gives the model a pixel size: from the tiles' "microns" system, or `pixel_size=` when they have none."""

from __future__ import annotations

import logging

import pytest
import spatialdata
from spatialdata.transformations import remove_transformation

import ghist

TINY = {"width": 4, "embed_dim": 8, "batch_size": 4, "seed": 0, "progress": False, "precision": "32-true"}


@pytest.fixture(scope="module")
def tiles_without_microns(train_sdata_session, tmp_path_factory):
    sdata = spatialdata.deepcopy(train_sdata_session)
    for element in (sdata.images["he"], sdata.labels["nuclei"]):
        remove_transformation(element, "microns")
    tiles = ghist.pp.make_tiles(
        sdata, cell_type_key="cell_type", tile_size=64, path=tmp_path_factory.mktemp("nomicrons") / "t.zarr"
    )
    assert tiles.pixel_size is None
    return tiles


def test_unknown_pixel_size_is_refused_before_training(tiles_without_microns, tmp_path):
    match = r"pixel size.*unknown.*`ghist.tl.fit\(tiles, pixel_size=.*'microns' coordinate system"
    with pytest.raises(ValueError, match=match):
        ghist.tl.fit(tiles_without_microns, max_steps=1, checkpoint_dir=tmp_path / "ckpt", **TINY)
    assert not (tmp_path / "ckpt").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_given_pixel_size_is_the_models(tiles_without_microns, tmp_path):
    model = ghist.tl.fit(tiles_without_microns, pixel_size=0.5, max_steps=2, **TINY)
    assert model.pixel_size == 0.5
    model.save(tmp_path / "m")
    assert ghist.GHISTModel.load(tmp_path / "m").pixel_size == 0.5


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True, "0.5"])
def test_bad_pixel_size_is_named(tiles_without_microns, value):
    with pytest.raises(ValueError, match="`pixel_size` must be a microscope pixel size"):
        ghist.tl.fit(tiles_without_microns, pixel_size=value, max_steps=1, **TINY)


def test_known_pixel_size_conflicting_with_the_given_one_is_refused(tiles):
    assert tiles.pixel_size == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"pixel_size=0.8.*tiles.*0.5 µm/px"):
        ghist.tl.fit(tiles, pixel_size=0.8, max_steps=1, **TINY)


@pytest.mark.slow
def test_known_pixel_size_agreeing_with_the_given_one_is_kept(tiles):
    model = ghist.tl.fit(tiles, pixel_size=0.51, max_epochs=1, **TINY)  # within 5%: the tiles' own value
    assert model.pixel_size == pytest.approx(tiles.pixel_size)


@pytest.mark.slow
def test_resume_keeps_the_pixel_size_it_was_trained_at(tiles_without_microns, tmp_path, caplog):
    first = ghist.tl.fit(tiles_without_microns, pixel_size=0.5, max_epochs=1, checkpoint_dir=tmp_path / "a", **TINY)
    assert first.pixel_size == 0.5
    last = tmp_path / "a" / "last.ckpt"
    with pytest.raises(ValueError, match=r"trained at 0.5 µm/px.*pixel_size=0.8"):
        ghist.tl.fit(tiles_without_microns, pixel_size=0.8, max_epochs=2, resume=last, **TINY)
    with pytest.raises(ValueError, match="unknown"):
        ghist.tl.fit(tiles_without_microns, max_epochs=2, resume=last, **TINY)
    resumed = ghist.tl.fit(
        tiles_without_microns, pixel_size=0.5, max_epochs=2, resume=last, checkpoint_dir=tmp_path / "b", **TINY
    )
    assert resumed.pixel_size == 0.5
    assert resumed.history_["epoch"].tolist() == [0, 1]


def test_samples_without_microns_are_named(train_sdata_session, tmp_path, caplog):
    plain = spatialdata.deepcopy(train_sdata_session)
    for element in (plain.images["he"], plain.labels["nuclei"]):
        remove_transformation(element, "microns")
    tiles = ghist.pp.make_tiles(
        {"known": train_sdata_session, "plain": plain}, cell_type_key="cell_type", tile_size=64, path=tmp_path / "t"
    )
    with caplog.at_level(logging.WARNING, logger="ghist"):
        model = ghist.tl.fit(tiles, max_epochs=1, **TINY)
    assert model.pixel_size == pytest.approx(0.5)
    assert any("'plain'" in r.getMessage() and "assumed" in r.getMessage() for r in caplog.records)
