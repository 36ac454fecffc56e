from __future__ import annotations

import logging
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, get_transformation, set_transformation
from torch.utils.data import DataLoader

from ghist._model._data import as_tensors, collate_tiles
from ghist._validation import ValidationError
from ghist.pp import TileSet, make_tiles
from ghist.pp._folds import SPLIT_NAMES, row_bands, split_rows

T = 16  # tile size of most tests: the 96 x 128 sample gives 6 x 8 tiles


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("ghist").setLevel(logging.WARNING)
    yield
    logging.getLogger("ghist").setLevel(logging.INFO)


def _tiles(sdata, tmp_path=None, **kwargs):
    kwargs.setdefault("tile_size", T)
    kwargs.setdefault("progress", False)
    if tmp_path is not None:
        kwargs.setdefault("path", tmp_path / "tiles.zarr")
    return make_tiles(sdata, **kwargs)


def _items(dataset):
    return [dataset[i] for i in range(len(dataset))]


def _positive_ids(item) -> set[int]:
    lab = item["labels"]
    return {int(i) for i in item["cell_id"][lab[lab > 0].unique() - 1]}


def _original_ids(item) -> np.ndarray:
    """The item's labels mapped back to nucleus ids (0 background, -1 ignore)."""
    lab = item["labels"].numpy()
    ids = item["cell_id"].numpy()
    return np.where(lab > 0, ids[np.maximum(lab, 1) - 1], lab)


# ------------------------------------------------------------------------------------------------ basics
def test_tileset_basics(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path, cell_type_key="cell_type")
    labels = np.asarray(sdata.labels["nuclei"])
    assert tiles.path == tmp_path / "tiles.zarr"
    assert tiles.genes == list(sdata.tables["table"].var_names)
    assert tiles.cell_types == ["T0", "T1", "T2"]
    assert tiles.tile_size == T
    assert tiles.samples == ["0"]
    assert tiles.pixel_size == pytest.approx(0.5)
    assert tiles.n_cells == np.unique(labels[labels > 0]).size
    assert len(tiles) == len(tiles.train) + len(tiles.val) + len(tiles.test)
    # every kept tile has a nucleus; the tiles without any were dropped
    n_grid = math.ceil(96 / T) * math.ceil(128 / T)
    n_with_nuclei = sum(
        (labels[r * T : (r + 1) * T, c * T : (c + 1) * T] > 0).any() for r in range(6) for c in range(8)
    )
    assert len(tiles) == n_with_nuclei < n_grid
    text = repr(tiles)
    assert f"{len(tiles)} tiles" in text
    assert f"train {len(tiles.train)}" in text
    assert "'T1'" in text
    assert "G0" in text
    assert "fold 1 of 5" in text


def test_item_contents(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path, cell_type_key="cell_type")
    item = tiles.train[0]
    n = item["cell_id"].shape[0]
    assert item["image"].shape == (3, T, T)
    assert item["image"].dtype == torch.float32
    assert item["labels"].shape == (T, T)
    assert item["labels"].dtype == torch.int64
    assert item["cell_id"].dtype == torch.int64
    assert item["expr"].shape == (n, 8)
    assert item["expr"].dtype == torch.float32
    assert item["cell_type"].shape == (n,)
    assert item["cell_type"].dtype == torch.int64
    assert isinstance(item["sample"], int)
    assert isinstance(item["tile"], int)
    # consecutive labels 1..n, each present
    values = set(item["labels"].unique().tolist())
    assert values - {-1, 0} == set(range(1, n + 1))
    # the image is the raw tile standardised with the TileSet statistics
    raw = as_tensors(tiles.read(item["tile"], standardise=False))["image"].numpy()
    restored = item["image"].numpy() * tiles.std[:, None, None] + tiles.mean[:, None, None]
    np.testing.assert_allclose(restored, raw, atol=1e-3)
    # cell types agree with the table
    obs = sdata.tables["table"].obs.set_index("cell_id")["cell_type"]
    for cid, code in zip(item["cell_id"].tolist(), item["cell_type"].tolist()):
        assert tiles.cell_types[code] == obs.loc[cid]


def test_edge_tiles_are_padded(tmp_path, make_sdata):
    sdata = make_sdata(seed=2, height=50, width=70, n_cells=25)
    tiles = _tiles(sdata, tmp_path, tile_size=16, fold=None)
    table = tiles.tile_table()
    edge = table[(table["y0"] + 16 > 50) | (table["x0"] + 16 > 70)]
    assert len(edge) > 0
    for _, row in edge.iterrows():
        item = as_tensors(tiles.read(int(row["tile"]), standardise=False))
        h, w = min(16, 50 - row["y0"]), min(16, 70 - row["x0"])
        pad = np.ones((16, 16), dtype=bool)
        pad[:h, :w] = False
        assert (item["image"].numpy()[:, pad] == 255).all()
        assert (item["labels"].numpy()[pad] == 0).all()


# ------------------------------------------------------------------------------------------------ folds
def test_split_rows_rule():
    np.testing.assert_array_equal(row_bands(10, 5), [1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    s = split_rows(10, 5, 2)  # test rows 2-3, validation row 4 (a tenth), the rest trains
    np.testing.assert_array_equal(s, [0, 0, 2, 2, 1, 0, 0, 0, 0, 0])
    s = split_rows(40, 4, 4)  # last band: validation wraps to the top, 4 rows
    assert (s[30:] == 2).all()
    assert (s[:4] == 1).all()
    assert (s[4:30] == 0).all()
    assert (split_rows(7, 3, None) == 0).all()


@pytest.mark.parametrize("fold", [1, 3, 5])
def test_folds_are_horizontal_bands(fold, tmp_path, make_sdata):
    sdata = make_sdata(seed=3, height=160, width=64, n_cells=60)  # 10 rows x 4 cols of 16-px tiles
    tiles = _tiles(sdata, tmp_path, fold=fold, n_folds=5)
    table = tiles.tile_table()
    # a whole tile row shares one split: no random tiles
    assert (table.groupby("row")["split"].nunique() == 1).all()
    by_row = table.groupby("row")["split"].first()
    test_rows = sorted(by_row[by_row == "test"].index)
    val_rows = sorted(by_row[by_row == "val"].index)
    assert test_rows == [2 * (fold - 1), 2 * (fold - 1) + 1]  # band `fold` of 5 over 10 rows
    assert val_rows == [(test_rows[-1] + 1) % 10]  # a tenth of the image, right after (wrapping)
    assert set(by_row[by_row == "train"].index) == set(range(10)) - set(test_rows) - set(val_rows)
    for name in SPLIT_NAMES:
        assert set(getattr(tiles, name).indices) == set(table.index[table["split"] == name])


def test_no_cell_in_training_and_held_out_tiles(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path, fold=2)
    train = [_positive_ids(i) for i in _items(tiles.train)]
    held_out = [set(i["cell_id"].tolist()) for i in _items(tiles.val) + _items(tiles.test)]
    train_ids, held_ids = set().union(*train), set().union(*held_out)
    assert train_ids
    assert held_ids
    assert not train_ids & held_ids
    # the ignored pixels of training tiles are exactly the held-out cells' pixels
    n_ignored = 0
    for item in _items(tiles.train):
        raw = as_tensors(tiles.read(item["tile"]))  # same tile, read again
        stored = np.asarray(tiles._open_arrays()["labels"][item["tile"]])
        ignored = item["labels"].numpy() == -1
        n_ignored += ignored.sum()
        assert np.isin(stored[ignored], list(held_ids)).all()
        assert not np.isin(stored[~ignored & (stored > 0)], list(held_ids)).any()
        assert torch.equal(raw["labels"], item["labels"])
    assert n_ignored > 0  # nuclei do straddle the band boundaries here


def test_fold_none_trains_everything(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path, fold=None)
    assert len(tiles.train) == len(tiles)
    assert len(tiles.val) == len(tiles.test) == 0
    assert all((i["labels"] >= 0).all() for i in _items(tiles.train))
    assert "no held-out fold" in repr(tiles)


def test_stats_from_training_tiles_only(tmp_path, make_sdata):
    sdata = make_sdata(seed=4)
    image = np.asarray(sdata.images["he"]).copy()
    image[:, :32] = 10  # the test band (rows 0-1 of 16 px) and validation row are dark ...
    image[:, 32:48] = 250  # ... and bright
    sdata.images["he"] = Image2DModel.parse(
        image, dims=("c", "y", "x"), transformations=get_transformation(sdata.images["he"], get_all=True)
    )
    tiles = _tiles(sdata, tmp_path, fold=1)
    table = tiles.tile_table()
    assert set(table.loc[table["row"] < 2, "split"]) == {"test"}
    assert set(table.loc[table["row"] == 2, "split"]) == {"val"}
    pixels = np.concatenate(
        [tiles.read(t, standardise=False)["image"].reshape(3, -1) for t in tiles.train.indices],
        axis=1,
    )
    np.testing.assert_allclose(tiles.mean, pixels.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(tiles.std, pixels.std(axis=1), rtol=1e-4)
    assert (tiles.mean > 20).all()
    assert (tiles.mean < 240).all()
    # another fold: other training tiles, other statistics, no re-cutting
    other = tiles.with_fold(3)
    assert other.path == tiles.path
    assert not np.allclose(other.mean, tiles.mean)


def test_stats_ignore_padding(tmp_path, make_sdata):
    sdata = make_sdata(seed=5, height=50, width=70, n_cells=25)
    tiles = _tiles(sdata, tmp_path, tile_size=16, fold=None)
    image = np.asarray(sdata.images["he"]).reshape(3, -1).astype(np.float64)
    # all kept tiles: the mean over their real pixels, not over the white padding
    real = []
    for t in range(len(tiles)):
        y0, x0 = tiles.tile_table().loc[t, ["y0", "x0"]]
        real.append(np.asarray(sdata.images["he"])[:, y0 : y0 + 16, x0 : x0 + 16].reshape(3, -1))
    np.testing.assert_allclose(tiles.mean, np.concatenate(real, axis=1).mean(axis=1), rtol=1e-5)
    assert image.size  # sanity


# ------------------------------------------------------------------------------------------------ transformations
@pytest.mark.parametrize("kind", [None, "translate", "scale", "scale_down", "affine"])
def test_labels_follow_the_image_pixel_space(kind, tmp_path, make_sdata):
    """Tile labels must match the nuclei drawn (independently) in the image's own pixel space."""
    sdata = make_sdata(seed=1, image_transform=kind)
    tiles = _tiles(sdata, tmp_path, fold=None)
    agree, fg = _agreement(tiles, sdata)
    exact = kind in (None, "translate")
    assert agree == 1.0 if exact else agree > 0.95
    assert fg == 1.0 if exact else fg > 0.85
    if kind is not None:  # control: dropping the transformation pairs the nuclei with the wrong pixels: refused
        set_transformation(sdata.images["he"], Identity(), "global")
        set_transformation(sdata.images["he"], get_transformation(sdata.labels["nuclei"], "microns"), "microns")
        with pytest.raises(ValueError, match=r"same transformation .* but different extents"):
            _tiles(sdata, tmp_path / "wrong", fold=None)


def _agreement(tiles, sdata) -> tuple[float, float]:
    H, W = sdata.images["he"].shape[1:]
    lh, lw = sdata.labels["nuclei"].shape
    A = get_transformation(sdata.images["he"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    agree = total = fg_agree = fg_total = 0
    for t in range(len(tiles)):
        item = as_tensors(tiles.read(t, standardise=False))
        orig = _original_ids(item)
        red = item["image"][0].numpy().astype(int)
        truth = np.where(red == 255, 0, red)  # red encodes the nucleus id, 255 on background
        y0, x0 = int(tiles._y0[t]), int(tiles._x0[t])
        yy, xx = np.mgrid[y0 : y0 + tiles.tile_size, x0 : x0 + tiles.tile_size] + 0.5
        gx = A[0, 0] * xx + A[0, 1] * yy + A[0, 2]
        gy = A[1, 0] * xx + A[1, 1] * yy + A[1, 2]
        valid = (yy < H) & (xx < W) & (gx >= 0) & (gy >= 0) & (gx < lw) & (gy < lh)  # inside image and labels
        agree += (orig == truth)[valid].sum()
        total += valid.sum()
        fg_mask = valid & ((orig > 0) | (truth > 0))
        fg_agree += (orig == truth)[fg_mask].sum()
        fg_total += fg_mask.sum()
    return agree / total, fg_agree / fg_total


# ------------------------------------------------------------------------------------------------ property test
def _labels_on_image(sdata) -> np.ndarray:
    """The nucleus labels read onto the image's pixel grid, as make_tiles reads them."""
    from ghist._spatial import element_affine, read_labels_window

    _, height, width = sdata.images["he"].shape
    matrix = element_affine(sdata, "he", "nuclei")
    return np.asarray(read_labels_window(sdata.labels["nuclei"], matrix, 0, 0, height, width))


def test_labels_off_the_image_are_a_named_error(make_sdata, tmp_path):
    # the layout the property test below drew: one nucleus, which the affine map puts off the 24 x 16 image
    sdata = make_sdata(seed=60, height=24, width=16, n_cells=1, radius=(1.5, 4.0), image_transform="affine")
    assert not _labels_on_image(sdata).any()
    with pytest.raises(ValueError, match=r"No tile of image 'he' shows a nucleus of labels 'nuclei'.*transformations"):
        make_tiles(sdata, tile_size=8, path=tmp_path / "t.zarr", progress=False)


@st.composite
def _layouts(draw):
    return {
        "seed": draw(st.integers(0, 10_000)),
        "height": draw(st.integers(24, 72)),
        "width": draw(st.integers(16, 64)),
        "n_cells": draw(st.integers(1, 30)),
        "tile_size": draw(st.integers(8, 24)),
        "n_folds": draw(st.integers(2, 4)),
        "fold": draw(st.one_of(st.none(), st.integers(1, 4))),
        "image_transform": draw(st.sampled_from([None, "scale", "affine"])),
        "unmeasured": draw(st.sampled_from([0.0, 0.3])),
    }


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=_layouts())
def test_every_cell_carries_its_own_expression(layout, tmp_path_factory, make_sdata, counts_by_id):
    fold, n_folds, size = layout["fold"], layout["n_folds"], layout["tile_size"]
    assume(fold is None or fold <= n_folds)
    sdata = make_sdata(
        seed=layout["seed"],
        height=layout["height"],
        width=layout["width"],
        n_cells=layout["n_cells"],
        radius=(1.5, 4.0),
        image_transform=layout["image_transform"],
        unmeasured=layout["unmeasured"],
        missing_types=0.2,
        chunks=16,
    )
    n_rows = math.ceil(sdata.images["he"].shape[1] / size)
    split = split_rows(n_rows, n_folds, fold)
    assume(all((split == s).any() for s in ((0, 1, 2) if fold is not None else (0,))))
    path = tmp_path_factory.mktemp("tiles") / "t.zarr"
    kwargs = {"tile_size": size, "n_folds": n_folds, "fold": fold, "path": path, "cell_type_key": "cell_type"}
    if not _labels_on_image(sdata).any():
        # A layout can leave every nucleus off the image (one small cell under an affine map): a named error.
        with pytest.raises(ValueError, match="No tile of image 'he' shows a nucleus"):
            make_tiles(sdata, progress=False, **kwargs)
        return
    tiles = make_tiles(sdata, progress=False, **kwargs)
    expected = counts_by_id(sdata)
    obs = sdata.tables["table"].obs.set_index("cell_id")["cell_type"]
    train_ids: set[int] = set()
    held_ids: set[int] = set()
    for name in SPLIT_NAMES:
        for item in _items(getattr(tiles, name)):
            lab, ids, expr = item["labels"], item["cell_id"], item["expr"]
            n = ids.shape[0]
            assert set(lab.unique().tolist()) - {-1, 0} == set(range(1, n + 1))
            assert (lab >= -1).all()
            assert (lab <= n).all()
            if name != "train":
                assert (lab >= 0).all()  # ignore marks only training tiles
            for k in range(n):
                cid = int(ids[k])
                if cid in expected:
                    np.testing.assert_allclose(expr[k].numpy(), expected[cid], rtol=1e-6)
                    t = obs.loc[cid]
                    code = int(item["cell_type"][k])
                    assert (code == -1) if pd.isna(t) else tiles.cell_types[code] == t
                else:  # a nucleus without measurement
                    assert torch.isnan(expr[k]).all()
                    assert int(item["cell_type"][k]) == -1
            (train_ids if name == "train" else held_ids).update(ids.tolist())
    assert not train_ids & held_ids


# ------------------------------------------------------------------------------------------------ store
def test_reopen_from_path(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path, cell_type_key="cell_type", fold=2)
    again = TileSet.open(tmp_path / "tiles.zarr")
    assert repr(again) == repr(tiles)
    assert again.genes == tiles.genes
    assert again.cell_types == tiles.cell_types
    assert again.fold == 2
    np.testing.assert_array_equal(again.mean, tiles.mean)
    np.testing.assert_array_equal(again.std, tiles.std)
    for a, b in zip(_items(again.train), _items(tiles.train)):
        for key in ("image", "labels", "cell_id", "expr", "cell_type"):
            assert torch.equal(a[key], b[key]) or torch.allclose(a[key], b[key], equal_nan=True)
    with pytest.raises(FileNotFoundError, match="make_tiles"):
        TileSet.open(tmp_path / "nothing.zarr")


def test_refuses_to_overwrite(sdata, tmp_path):
    path = tmp_path / "tiles.zarr"
    _tiles(sdata, path=path)
    with pytest.raises(FileExistsError, match=r"TileSet\.open"):
        _tiles(sdata, path=path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_tiles(sdata, path=empty)) > 0


def test_default_path_is_a_new_temporary_directory(sdata):
    a, b = _tiles(sdata), _tiles(sdata)
    for tiles in (a, b):
        assert tiles.path.name == "tiles.zarr"
        assert tiles.path.parent.name.startswith("ghist_tiles_")
    assert a.path != b.path
    assert a.path.exists()
    assert b.path.exists()  # removed with the last TileSet of each (tests/pp/test_tile_lifetime.py)


def test_datasets_pickle(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path)
    tiles.train[0]  # opens the arrays
    clone = pickle.loads(pickle.dumps(tiles.train))
    assert torch.equal(clone[0]["labels"], tiles.train[0]["labels"])


# ------------------------------------------------------------------------------------------------ collate
def test_collate_offsets(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path, cell_type_key="cell_type", fold=3)
    items = [tiles.train[i] for i in range(4)]
    batch = collate_tiles(items)
    sizes = [i["cell_id"].shape[0] for i in items]
    assert batch["image"].shape == (4, 3, T, T)
    assert batch["labels"].shape == (4, T, T)
    assert batch["n_cells"] == sum(sizes) == batch["cell_id"].shape[0] == batch["expr"].shape[0]
    np.testing.assert_array_equal(batch["cell_batch"].numpy(), np.repeat(np.arange(4), sizes))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for b, item in enumerate(items):
        lab, out = item["labels"], batch["labels"][b]
        assert torch.equal(out[lab <= 0], lab[lab <= 0])  # background and ignore kept
        assert torch.equal(out[lab > 0], lab[lab > 0] + offsets[b])
        # batch label j is row j - 1 of the concatenated cells
        rows = out[out > 0] - 1
        assert (batch["cell_batch"][rows] == b).all()
        assert torch.equal(batch["cell_id"][rows], item["cell_id"][lab[lab > 0] - 1])
    assert batch["tile"].tolist() == [i["tile"] for i in items]


def test_dataloader(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path)
    loader = DataLoader(tiles.train, batch_size=3, shuffle=True, collate_fn=collate_tiles)
    n_tiles = sum(batch["image"].shape[0] for batch in loader)
    assert n_tiles == len(tiles.train)
    workers = DataLoader(tiles.train, batch_size=3, num_workers=2, collate_fn=collate_tiles)
    tiles_seen = torch.cat([batch["tile"] for batch in workers])
    assert sorted(tiles_seen.tolist()) == sorted(tiles.train.indices.tolist())


def test_loader(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path, fold=2)
    train = list(tiles.loader("train", batch_size=3))
    assert sum(b["image"].shape[0] for b in train) == len(tiles.indices("train"))
    assert sorted(torch.cat([b["tile"] for b in train]).tolist()) == tiles.indices("train").tolist()
    assert torch.cat([b["tile"] for b in train]).tolist() != tiles.indices("train").tolist()  # shuffled by default
    again = torch.cat([b["tile"] for b in tiles.loader("train", batch_size=3)])
    assert again.tolist() == torch.cat([b["tile"] for b in train]).tolist()  # same seed, same order
    other = torch.cat([b["tile"] for b in tiles.loader("train", batch_size=3, seed=1)])
    assert other.tolist() != again.tolist()
    val = torch.cat([b["tile"] for b in tiles.loader("val", batch_size=2)])
    assert val.tolist() == tiles.indices("val").tolist()  # held-out splits keep their order
    assert "cell_batch" in train[0]  # collated by collate_tiles

    def flip(item):
        return {**item, "image": item["image"].flip(-1)}

    plain = next(iter(tiles.loader("test", batch_size=2)))
    flipped = next(iter(tiles.loader("test", batch_size=2, transform=flip)))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    with pytest.raises(ValueError, match="split"):
        tiles.loader("training")


def test_importing_ghist_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ghist, ghist.pp; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ cutting
def _store_arrays(path) -> dict[str, np.ndarray]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    names = ["images", "labels", *(f"tiles/{k}" for k in root["tiles"].array_keys())]
    return {name: np.asarray(root[name][...]) for name in names}


def test_grid_plan_is_row_major(make_sdata):
    from ghist.pp._tile_samples import _prepare_sample
    from ghist.pp._tile_store import _grid_plan

    sample = _prepare_sample(
        "0",
        make_sdata(height=40, width=50),
        image_key="he",
        labels_key="nuclei",
        table_key="table",
        cell_type_key=None,
        layer=None,
        key_added=None,
    )
    plan = _grid_plan(sample, T)
    assert (plan.n_rows, plan.n_cols, len(plan)) == (3, 4, 12)
    assert plan.on_rows
    np.testing.assert_array_equal(plan.grid[:5], [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]])
    np.testing.assert_array_equal(plan.origins, plan.grid * T)


@pytest.mark.parametrize("kind", [None, "scale", "affine"])
def test_strip_reads_match_tile_reads(kind, tmp_path, make_sdata, monkeypatch):
    """Reading a grid plan by strips of rows is an optimisation only: the store is the same tile by tile."""
    import dataclasses

    import ghist.pp._tile_store as store

    sdata = make_sdata(seed=3, height=80, width=100, image_transform=kind, chunks=40)
    strips = _tiles(sdata, tmp_path / "strips", fold=2)  # 40-px image chunks: strips of 3 tile rows
    grid_plan = store._grid_plan
    monkeypatch.setattr(store, "_grid_plan", lambda s, t: dataclasses.replace(grid_plan(s, t), on_rows=False))
    alone = _tiles(sdata, tmp_path / "alone", fold=2)
    monkeypatch.setattr(store, "_grid_plan", grid_plan)
    monkeypatch.setattr(store, "_STRIP_BYTES", 1)  # one tile row per strip
    one_row = _tiles(sdata, tmp_path / "one_row", fold=2)
    expected = _store_arrays(strips.path)
    for other in (alone, one_row):
        got = _store_arrays(other.path)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)


# ------------------------------------------------------------------------------------------------ samples, genes
def test_multiple_samples(tmp_path, make_sdata, counts_by_id):
    a = make_sdata(seed=10, n_genes=6)
    b = make_sdata(seed=11, n_genes=6, gene_names=["G5", "G3", "G0", "G1", "X", "Y"])
    tiles = _tiles({"left": a, "right": b}, tmp_path, cell_type_key="cell_type")
    assert tiles.samples == ["left", "right"]
    assert tiles.genes == ["G0", "G1", "G3", "G5"]  # common genes, the first table's order
    seen = set()
    for item in _items(tiles.train) + _items(tiles.val) + _items(tiles.test):
        sdata = (a, b)[item["sample"]]
        expected = counts_by_id(sdata, tiles.genes)
        seen.add(item["sample"])
        for cid, row in zip(item["cell_id"].tolist(), item["expr"].numpy()):
            np.testing.assert_allclose(row, expected[cid], rtol=1e-6)  # ids repeat across samples
    assert seen == {0, 1}
    per_sample = tiles.tile_table().groupby("sample", observed=True)
    for _, frame in per_sample:  # folds are cut per sample
        assert set(frame["split"]) == {"train", "val", "test"}
    listed = _tiles([a, b], tmp_path / "list")
    assert listed.samples == ["0", "1"]


def test_genes_and_layer(sdata, tmp_path):
    table = sdata.tables["table"]
    table.layers["counts"] = table.X.copy()
    table.X = table.X.toarray() * 0.5 + 100
    tiles = _tiles(sdata, tmp_path, genes=["G3", "G1"], layer="counts")
    assert tiles.genes == ["G3", "G1"]
    raw = table.layers["counts"][:, [3, 1]].toarray()
    expected = {int(i): np.log1p(x) for i, x in zip(table.obs["cell_id"], raw)}
    for item in _items(tiles.train):
        for cid, row in zip(item["cell_id"].tolist(), item["expr"].numpy()):
            np.testing.assert_allclose(row, expected[cid], rtol=1e-6)


def test_unmeasured_and_untyped_cells(tmp_path, make_sdata):
    sdata = make_sdata(seed=6, unmeasured=0.4, missing_types=0.5)
    tiles = _tiles(sdata, tmp_path, cell_type_key="cell_type", fold=None)
    measured = set(sdata.tables["table"].obs["cell_id"])
    n_nan = n_unknown = 0
    for item in _items(tiles.train):
        for cid, row, code in zip(item["cell_id"].tolist(), item["expr"], item["cell_type"].tolist()):
            if cid not in measured:
                assert torch.isnan(row).all()
                assert code == -1
                n_nan += 1
            elif code == -1:
                n_unknown += 1
    assert n_nan > 0
    assert n_unknown > 0


def test_no_cell_types(sdata, tmp_path):
    tiles = _tiles(sdata, tmp_path)
    assert tiles.cell_types is None
    assert (tiles.train[0]["cell_type"] == -1).all()
    assert "cell types: none" in repr(tiles)


def test_key_added_writes_the_tile_grid(sdata, tmp_path):
    before = set(sdata.shapes)
    tiles = _tiles(sdata, tmp_path)
    assert set(sdata.shapes) == before  # not by default
    tiles = _tiles(sdata, tmp_path / "b", key_added="he_tiles", fold=2)
    shapes = sdata.shapes["he_tiles"]
    assert len(shapes) == len(tiles)
    assert list(shapes["split"].astype(str)) == list(tiles.split)
    assert set(get_transformation(shapes, get_all=True)) == {"global", "microns"}
    x0, y0, x1, y1 = shapes.geometry.iloc[0].bounds
    assert (x1 - x0, y1 - y0) == (T, T)
    with pytest.raises(ValueError, match=r"he_tiles.* already exists"):
        _tiles(sdata, tmp_path / "c", key_added="he_tiles")


def test_input_not_modified(sdata, tmp_path):
    table = sdata.tables["table"]
    X = table.X.copy()
    obs = table.obs.copy()
    labels = np.asarray(sdata.labels["nuclei"]).copy()
    _tiles(sdata, tmp_path, cell_type_key="cell_type", genes=["G2"])
    assert (table.X != X).nnz == 0
    assert table.obs.equals(obs)
    assert table.n_vars == 8
    np.testing.assert_array_equal(np.asarray(sdata.labels["nuclei"]), labels)


# ------------------------------------------------------------------------------------------------ errors
def _with(sdata, what):
    if what == "float_image":
        image = np.asarray(sdata.images["he"]).astype(np.float32)
        sdata.images["he"] = Image2DModel.parse(image, dims=("c", "y", "x"))
    elif what == "nan_counts":
        table = sdata.tables["table"]
        X = table.X.toarray()
        X[0, 2] = np.nan
        table.X = X
    elif what == "ghost_cells":
        sdata.tables["table"].obs["cell_id"] = sdata.tables["table"].obs["cell_id"] + 1000
    elif what == "duplicated_cells":
        sdata.tables["table"].obs["cell_id"] = sdata.tables["table"].obs["cell_id"].iloc[0]
    elif what == "no_shared_cs":
        set_transformation(sdata.images["he"], Identity(), "aligned", write_to_sdata=None)
        from spatialdata.transformations import remove_transformation

        remove_transformation(sdata.images["he"], "global")
        remove_transformation(sdata.images["he"], "microns")
    return sdata


@pytest.mark.parametrize(
    ("kwargs", "what", "error", "match"),
    [
        ({"image_key": "hne"}, None, KeyError, "'hne'"),
        ({"image_key": "nuclei"}, None, KeyError, "'nuclei' is in `sdata.labels`"),
        ({"labels_key": "cells"}, None, KeyError, "'cells'"),
        ({"table_key": "measured"}, None, KeyError, "'measured'"),
        ({"cell_type_key": "celltype"}, None, KeyError, "'celltype'"),
        ({"genes": ["G1", "EPCAM"]}, None, KeyError, "'EPCAM'"),
        ({"layer": "raw"}, None, KeyError, "'raw'"),
        ({}, "float_image", ValueError, "uint8"),
        ({}, "nan_counts", ValueError, "NaN"),
        ({}, "ghost_cells", ValueError, "absent from labels 'nuclei'"),
        ({}, "duplicated_cells", ValueError, "more than once"),
        ({}, "no_shared_cs", ValueError, "share no coordinate system"),
        ({"spots_key": "spots"}, None, KeyError, "Spots 'spots' not found in `sdata.shapes`"),
        ({"tile_size": 4}, None, ValueError, "tile_size"),
        ({"fold": 6}, None, ValueError, "fold"),
        ({"n_folds": 1}, None, ValueError, "n_folds"),
        ({"tile_size": 48}, None, ValueError, "sample '0' has 2 rows of 48-px tiles"),
    ],
)
def test_bad_inputs(kwargs, what, error, match, tmp_path, make_sdata):
    sdata = _with(make_sdata(seed=7), what)
    with pytest.raises(error, match=match):
        _tiles(sdata, tmp_path, **kwargs)
    assert not (tmp_path / "tiles.zarr").exists()  # nothing written


def test_bad_sample_is_named(tmp_path, make_sdata):
    good, bad = make_sdata(seed=8), make_sdata(seed=9)
    del bad.tables["table"]
    with pytest.raises(KeyError, match=r"Sample 'b'.*'table'"):
        _tiles({"a": good, "b": bad}, tmp_path)
    with pytest.raises(TypeError, match=r"Sample '1' is a str.*SpatialData"):
        _tiles([good, "not a sample"], tmp_path)
    del good.tables["table"]
    with pytest.raises(ValidationError, match=r"(?s)sample 'a'.*'table'.*sample 'b'.*'table'"):
        _tiles({"a": good, "b": bad}, tmp_path)  # problems of several samples are reported together


def test_table_annotating_another_element(sdata, tmp_path):
    sdata.tables["table"].uns["spatialdata_attrs"]["region"] = "cells"
    sdata.tables["table"].obs["region"] = pd.Categorical(["cells"] * sdata.tables["table"].n_obs)
    with pytest.raises(ValueError, match=r"annotates.*'cells'.*'nuclei'"):
        _tiles(sdata, tmp_path)


# ------------------------------------------------------------------------------------------------ ghist.datasets
def _nucleus_contrast(tiles) -> float:
    """Mean brightness of background pixels minus that of nucleus pixels (H&E nuclei are dark)."""
    inside, outside = [], []
    for t in range(len(tiles)):
        item = as_tensors(tiles.read(t, standardise=False))
        grey, lab = item["image"].numpy().mean(axis=0), item["labels"].numpy()
        inside.append(grey[lab > 0])
        outside.append(grey[lab == 0])
    return float(np.concatenate(outside).mean() - np.concatenate(inside).mean())


@pytest.mark.parametrize("he_transform", ["identity", "scale", "affine"])
def test_synthetic_dataset(he_transform, tmp_path, counts_by_id):
    import ghist

    sdata = ghist.datasets.synthetic(image_size=128, n_genes=12, seed=0, image_transform=he_transform)
    tiles = _tiles(sdata, tmp_path, tile_size=32, cell_type_key="cell_type")
    assert tiles.genes == list(sdata.tables["table"].var_names)
    expected = counts_by_id(sdata)
    obs = sdata.tables["table"].obs.set_index("cell_id")["cell_type"]
    for item in _items(tiles.train) + _items(tiles.val) + _items(tiles.test):
        for cid, row, code in zip(item["cell_id"].tolist(), item["expr"].numpy(), item["cell_type"].tolist()):
            np.testing.assert_allclose(row, expected[cid], rtol=1e-6)
            assert tiles.cell_types[code] == obs.loc[cid]
    # the labels land on the dark H&E nuclei in the H&E's own pixel space ...
    assert _nucleus_contrast(tiles.with_fold(None)) > 40
    if he_transform != "identity":  # ... and would not if the transformation were ignored: refused
        for cs in get_transformation(sdata.images["he"], get_all=True):
            set_transformation(sdata.images["he"], get_transformation(sdata.labels["nuclei"], cs), cs)
        with pytest.raises(ValueError, match=r"same transformation .* but different extents"):
            _tiles(sdata, tmp_path / "wrong", tile_size=32, fold=None)


def test_multiscale_elements(sdata, tmp_path):
    from spatialdata.models import Labels2DModel

    flat = _tiles(sdata, tmp_path / "flat", cell_type_key="cell_type")
    image, labels = np.asarray(sdata.images["he"]), np.asarray(sdata.labels["nuclei"])
    sdata.images["he"] = Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        scale_factors=[2],
        transformations=get_transformation(sdata.images["he"], get_all=True),
    )
    sdata.labels["nuclei"] = Labels2DModel.parse(
        labels,
        dims=("y", "x"),
        scale_factors=[2],
        transformations=get_transformation(sdata.labels["nuclei"], get_all=True),
    )
    multi = _tiles(sdata, tmp_path / "multi", cell_type_key="cell_type")
    assert len(multi) == len(flat)
    assert multi.pixel_size == pytest.approx(flat.pixel_size)
    for a, b in zip(_items(multi.train), _items(flat.train)):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["image"], b["image"])


def test_lazy_expression_reads_match_in_memory(sdata, tmp_path, monkeypatch):
    import ghist.pp._tile_store as store_module

    tiles = _tiles(sdata, tmp_path, cell_type_key="cell_type")
    in_memory = _items(tiles.train)
    monkeypatch.setattr(store_module, "_EXPR_IN_MEMORY_BYTES", 0)
    lazy = TileSet.open(tiles.path)
    assert not isinstance(lazy._open_arrays()["expr"][0], np.ndarray)  # chunked reads from the store
    for a, b in zip(_items(lazy.train), in_memory):
        assert torch.equal(a["expr"], b["expr"])
        assert torch.equal(a["cell_type"], b["cell_type"])


def test_image_not_overlapping_the_labels(sdata, tmp_path):
    from spatialdata.transformations import Translation

    set_transformation(sdata.images["he"], Translation([5000.0, 0.0], axes=("x", "y")), "global")
    with pytest.raises(ValueError, match="'he' and labels 'nuclei' do not overlap"):
        _tiles(sdata, tmp_path)
    assert not (tmp_path / "tiles.zarr").exists()
