"""``fit(context_neighbours=)``: the context trains, is saved with the model, and predict uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ghist


@pytest.fixture(scope="module")
def context_model(tiles, tmp_path_factory):
    return ghist.tl.fit(
        tiles,
        width=4,
        embed_dim=16,
        max_steps=12,
        batch_size=4,
        lr=3e-3,
        seed=0,
        precision="32-true",
        progress=False,
        checkpoint_dir=tmp_path_factory.mktemp("ckpt_context"),
        context_neighbours=4,
    )


@pytest.mark.slow
def test_context_is_trained(context_model):
    assert context_model.init_params_["context_neighbours"] == 4
    last = context_model.network.context.mix[-1]
    # zero-initialised: any non-zero weight was learnt from the neighbours' embeddings
    assert last.weight.abs().sum() > 0


@pytest.mark.slow
def test_context_survives_save_and_load(context_model, tmp_path):
    context_model.save(tmp_path / "m")
    loaded = ghist.GHISTModel.load(tmp_path / "m")
    assert loaded.init_params_["context_neighbours"] == 4
    for name, value in context_model.network.context.state_dict().items():
        torch.testing.assert_close(loaded.network.context.state_dict()[name], value)


@pytest.mark.slow
def test_predict_with_context_depends_on_the_neighbours(context_model, test_sdata):
    table = ghist.tl.predict(test_sdata, context_model, key_added="with", progress=False)
    assert np.isfinite(table.X).all()
    # the same weights with the context switched off predict differently: the context is used in predict
    context = context_model.network.context
    context_model.network.context = None
    try:
        plain = ghist.tl.predict(test_sdata, context_model, key_added="without", progress=False)
    finally:
        context_model.network.context = context
    assert not np.allclose(np.asarray(table.X), np.asarray(plain.X))


def test_models_saved_before_context_load_without_it(tmp_path):
    import json

    model = ghist.GHISTModel(["EPCAM", "PTPRC"], None, width=4, embed_dim=8, tile_size=32)
    model.save(tmp_path / "old")
    meta = tmp_path / "old" / "model.json"
    settings = json.loads(meta.read_text())
    del settings["init_params"]["context_neighbours"]
    meta.write_text(json.dumps(settings))
    assert ghist.GHISTModel.load(tmp_path / "old").network.context is None


def test_bad_context_neighbours(tiles):
    with pytest.raises(ValueError, match="context_neighbours"):
        ghist.tl.fit(tiles, width=4, embed_dim=8, max_steps=1, progress=False, context_neighbours=-2)


def test_context_in_view_counts_cells_whose_neighbours_lay_in_their_tile():
    from types import SimpleNamespace

    from ghist.tl._predict import _context_in_view

    def rows(centroid, margin):  # the two fields of CellRows the check reads
        return SimpleNamespace(centroid=np.asarray(centroid, float), margin=np.asarray(margin, float))

    # a row of cells 10 px apart: the 2 nearest of each are <= 20 px away (10 px for the middle ones)
    four = rows([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]], [25.0, 10.0, 9.0, 19.0])
    # first: 2nd nearest at 20 <= 25; second: 10 <= 10; third: 10 > 9; last: 20 > 19
    assert _context_in_view(four, 2, tile_size=64) == 0.5
    assert _context_in_view(four, 10, tile_size=64) == 0.0  # more neighbours than cells: all the others
    assert _context_in_view(rows(np.zeros((1, 2)), np.zeros(1)), 8, tile_size=64) == 1.0


@pytest.mark.slow
def test_predict_reports_how_often_the_context_saw_the_whole_neighbourhood(context_model, test_sdata, trained):
    wide = ghist.tl.predict(test_sdata, context_model, key_added="wide", tile_overlap=31, progress=False)
    none = ghist.tl.predict(test_sdata, context_model, key_added="none", tile_overlap=0, progress=False)
    # overlapping tiles give cells near one tile's edge a tile where they sit farther in
    assert 0 < none.uns["ghist"]["context_in_view"] < wide.uns["ghist"]["context_in_view"] <= 1
    plain = ghist.tl.predict(test_sdata, trained, key_added="plain", progress=False)
    assert plain.uns["ghist"]["context_in_view"] is None
