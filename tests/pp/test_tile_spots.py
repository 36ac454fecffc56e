"""Spot-level tiles: ``make_tiles(..., spots_key=...)`` over the synthetic tissue with a grid of circular spots."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Scale, get_transformation

import ghist
from ghist._model._data import collate_tiles
from ghist.pp import TileSet, make_tiles

RADIUS = 25.0


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("ghist").setLevel(logging.WARNING)
    yield
    logging.getLogger("ghist").setLevel(logging.INFO)


def label_centroids(sdata) -> dict[int, np.ndarray]:
    """Centroid (x, y) of every nucleus, pixel (i, j) centred at (j + 0.5, i + 0.5), computed from the labels."""
    labels = np.asarray(sdata.labels["nuclei"].data)
    rows, cols = np.nonzero(labels)
    ids, inverse = np.unique(labels[rows, cols], return_inverse=True)
    n = np.bincount(inverse)
    cx = np.bincount(inverse, weights=cols + 0.5) / n
    cy = np.bincount(inverse, weights=rows + 0.5) / n
    return {int(i): np.array([x, y]) for i, x, y in zip(ids, cx, cy)}


def add_spots(sdata, *, radius=RADIUS, step=60.0, first=30.0, units_per_px=1.0, jitter=None):
    """Circles on a grid of labels pixels and a table of the summed true counts of the cells centred in each.

    ``units_per_px`` stores the circles in other units (e.g. 0.5: coordinates halved, with a transformation that
    scales them back to the labels' "global" space). Returns ``{spot: [nucleus ids]}``.
    """
    size = sdata.labels["nuclei"].shape[0]
    gx, gy = np.meshgrid(np.arange(first, size, step), np.arange(first, size, step))
    centres = np.c_[gx.ravel(), gy.ravel()].astype(float)
    if jitter is not None:
        centres += jitter
    centroids = label_centroids(sdata)
    cells = sdata.tables["table"]
    X = cells.X.toarray() if sp.issparse(cells.X) else np.asarray(cells.X)
    row_of = {int(c): i for i, c in enumerate(cells.obs["cell_id"])}
    members: dict[int, list[int]] = {k: [] for k in range(len(centres))}
    counts = np.zeros((len(centres), cells.n_vars))
    for cid, xy in centroids.items():
        d = np.linalg.norm(centres - xy, axis=1)
        k = int(d.argmin())
        if d[k] <= radius:
            members[k].append(cid)
            counts[k] += X[row_of[cid]]
    scale = Scale([1 / units_per_px, 1 / units_per_px], axes=("x", "y"))
    sdata.shapes["spots"] = ShapesModel.parse(
        centres * units_per_px,
        geometry=0,
        radius=np.full(len(centres), radius * units_per_px),
        transformations={"global": scale},
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(centres)), "spot_id": np.arange(len(centres))},
        index=[f"spot{k}" for k in range(len(centres))],
    )
    table = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=cells.var_names))
    sdata.tables["spot_counts"] = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    return members


@pytest.fixture(scope="module")
def spot_sdata():
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=16, seed=0)
    members = add_spots(sdata)
    return sdata, members


def _spot_tiles(sdata, tmp_path, **kwargs):
    kwargs = {"spots_key": "spots", "table_key": "spot_counts", "tile_size": 64, "progress": False, **kwargs}
    return make_tiles(sdata, path=tmp_path / "spots.zarr", **kwargs)


def _raw(sdata) -> np.ndarray:
    return sdata.tables["spot_counts"].X.toarray()


def _check_item(item, raw, members, coverage=1.0):
    """Every supervised spot: its cells are the visible members and its target the raw sum times the visible share."""
    cell_ids = item["cell_id"].numpy()
    cell_spot = item["cell_spot"].numpy()
    assert item["spot_expr"].shape == (len(item["spot_index"]), raw.shape[1])
    for k, spot in enumerate(item["spot_index"].tolist()):
        inside = set(cell_ids[cell_spot == k].tolist())
        assert inside <= set(members[spot])
        fraction = len(inside) / len(members[spot])
        assert fraction >= coverage - 1e-9
        np.testing.assert_allclose(item["spot_expr"][k].numpy(), raw[spot] * fraction, rtol=1e-5)
    # cells whose spot is not supervised in this tile carry -1
    supervised = set(item["spot_index"].tolist())
    for cid, s in zip(cell_ids, cell_spot):
        owner = next((k for k, m in members.items() if cid in m), None)
        if owner is not None and owner in supervised:
            assert item["spot_index"][s] == owner
        else:
            assert s == -1


# ------------------------------------------------------------------------------------------------ targets
def test_spot_targets_are_the_sums_over_their_cells(spot_sdata, tmp_path):
    sdata, members = spot_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="spots", spot_target_sum=None, fold=None)
    raw = _raw(sdata)
    assert tiles.spots_key == "spots"
    assert tiles.spot_names == [[str(k) for k in range(len(members))]]
    assert tiles.cell_types is None
    with_cells = [k for k, m in members.items() if m]
    assert len(tiles) == len(with_cells)  # one tile per spot holding a nucleus
    seen = set()
    for i in range(len(tiles)):
        item = tiles.all[i]
        assert torch.isnan(item["expr"]).all()  # no measured cell
        assert (item["cell_type"] == -1).all()
        _check_item(item, raw, members)
        seen |= set(item["spot_index"].tolist())
    assert seen == set(with_cells)  # every spot is fully visible in its own tile


def test_sample_scaling_gives_one_factor_per_section(spot_sdata, tmp_path):
    sdata, _ = spot_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="spots", fold=None, spot_target_sum=1000.0, spot_scaling="sample")
    raw = _raw(sdata)
    library = raw.sum(axis=1)
    factor = 1000.0 / np.median(library[library > 0])
    item = next(tiles.all[i] for i in range(len(tiles)) if len(tiles.all[i]["spot_index"]))
    spots = item["spot_index"].numpy()
    np.testing.assert_allclose(item["spot_expr"].numpy(), raw[spots] * factor, rtol=1e-5)


def test_default_spot_scaling_removes_each_spots_depth(spot_sdata, tmp_path):
    sdata, members = spot_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="spots", fold=None, spot_target_sum=1000.0)
    raw = _raw(sdata)
    # all genes of the table count in the library size: the panel here is every gene
    n_cells = np.array([len(members[k]) for k in range(len(members))], dtype=float)
    typical = np.median(n_cells[n_cells > 0])
    checked = 0
    for i in range(len(tiles)):
        item = tiles.all[i]
        for row, spot in enumerate(item["spot_index"].tolist()):
            target = item["spot_expr"][row].numpy()
            # library size 1000 per typical spot, proportional to the spot's nuclei, same composition as measured
            np.testing.assert_allclose(target.sum(), 1000.0 * n_cells[spot] / typical, rtol=1e-4)
            np.testing.assert_allclose(target / target.sum(), raw[spot] / raw[spot].sum(), rtol=1e-4, atol=1e-7)
            checked += 1
    assert checked >= 5


def test_spots_in_another_coordinate_space(tmp_path):
    """Circles stored in half-pixel units with a transformation: same membership as in labels pixels."""
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=16, seed=0)
    members = add_spots(sdata, units_per_px=0.5, jitter=np.array([3.3, -2.7]))
    assert get_transformation(sdata.shapes["spots"], "global") is not None
    tiles = _spot_tiles(sdata, tmp_path, tiling="spots", fold=None, spot_target_sum=None)
    raw = _raw(sdata)
    for i in range(len(tiles)):
        _check_item(tiles.all[i], raw, members)


# ------------------------------------------------------------------------------------------------ tile edges
@pytest.fixture(scope="module")
def edge_sdata():
    """Small spots (radius 14) every 32 px from 32: on a 64-px grid, every other one is cut by a tile edge."""
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=16, seed=0)
    members = add_spots(sdata, radius=14.0, step=32.0, first=32.0)
    centres = np.c_[sdata.shapes["spots"].geometry.x, sdata.shapes["spots"].geometry.y]
    inside = ((centres % 64) >= 14).all(axis=1) & ((centres % 64) <= 64 - 14).all(axis=1)
    return sdata, members, inside


def test_grid_tiles_use_only_whole_spots(edge_sdata, tmp_path):
    sdata, members, inside = edge_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="grid", fold=None, spot_target_sum=None)
    raw = _raw(sdata)
    supervised = set()
    for i in range(len(tiles)):
        item = tiles.all[i]
        _check_item(item, raw, members, coverage=1.0)
        for k, spot in enumerate(item["spot_index"].tolist()):
            assert int((item["cell_spot"] == k).sum()) == len(members[spot])  # whole spot
        supervised |= set(item["spot_index"].tolist())
    with_cells = {k for k, m in members.items() if m}
    assert {k for k in with_cells if inside[k]} <= supervised  # every circle inside a tile is used
    assert with_cells - supervised  # some spots cut by a tile edge are not


def test_partial_spots_scale_their_target(edge_sdata, tmp_path):
    sdata, members, _ = edge_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="grid", fold=None, spot_target_sum=None, spot_coverage=0.3)
    raw = _raw(sdata)
    fractions = []
    for i in range(len(tiles)):
        item = tiles.all[i]
        _check_item(item, raw, members, coverage=0.3)  # target = raw sum x visible fraction of the nuclei
        for k, spot in enumerate(item["spot_index"].tolist()):
            fractions.append(int((item["cell_spot"] == k).sum()) / len(members[spot]))
    assert min(fractions) < 1.0  # some spots cut by a tile edge are used, with a scaled target
    assert min(fractions) >= 0.3


def test_spot_tiling_centres_every_spot(edge_sdata, tmp_path):
    sdata, members, _ = edge_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="spots", fold=None, spot_target_sum=None)
    raw = _raw(sdata)
    supervised = set()
    for i in range(len(tiles)):
        _check_item(tiles.all[i], raw, members)
        supervised |= set(tiles.all[i]["spot_index"].tolist())
    assert supervised == {k for k, m in members.items() if m}


def test_held_out_cells_drop_their_spot_from_training_tiles(spot_sdata, tmp_path):
    sdata, members = spot_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="grid", fold=2, n_folds=4, spot_target_sum=None)
    raw = _raw(sdata)
    n_ignored = 0
    for split in ("train", "val", "test"):
        ds = tiles.dataset(split)
        for i in range(len(ds)):
            item = ds[i]
            _check_item(item, raw, members)  # ignored (-1) cells are not visible: their spot is not supervised
            n_ignored += int((item["labels"] == -1).any())
    assert n_ignored > 0  # the fold did hide cells shared with held-out tiles


# ------------------------------------------------------------------------------------------------ batches, store
def test_collate_offsets_spot_indices(spot_sdata, tmp_path):
    sdata, _ = spot_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="spots", fold=None)
    items = [tiles.all[i] for i in range(len(tiles))][:5]
    batch = collate_tiles(items)
    assert batch["spot_expr"].shape[0] == sum(len(it["spot_index"]) for it in items)
    assert batch["cell_spot"].shape == (batch["n_cells"],)
    cell0, spot0 = 0, 0
    for b, item in enumerate(items):
        n, s = len(item["cell_id"]), len(item["spot_index"])
        mine = batch["cell_spot"][cell0 : cell0 + n]
        own = item["cell_spot"]
        assert torch.equal(mine >= 0, own >= 0)
        assert torch.equal(mine[own >= 0] - spot0, own[own >= 0])
        assert torch.equal(batch["spot_expr"][mine[own >= 0]], item["spot_expr"][own[own >= 0]])
        assert (batch["spot_batch"][spot0 : spot0 + s] == b).all()
        cell0, spot0 = cell0 + n, spot0 + s
    # predicting each spot's target split evenly over its cells gives a zero spot loss on the collated batch
    from ghist._model._losses import spot_loss

    inside = batch["cell_spot"] >= 0
    n_per_spot = torch.bincount(batch["cell_spot"][inside], minlength=spot0).float()
    counts = torch.zeros(batch["n_cells"], batch["spot_expr"].shape[1])
    spots = batch["cell_spot"][inside]
    counts[inside] = batch["spot_expr"][spots] / n_per_spot[spots, None]
    assert float(spot_loss(5.0 * torch.log1p(counts), batch["cell_spot"], batch["spot_expr"])) < 1e-6


def test_collate_rejects_mixed_batches(spot_sdata, tmp_path):
    sdata, _ = spot_sdata
    spot_item = _spot_tiles(sdata, tmp_path, tiling="spots", fold=None).all[0]
    cell_item = {k: v for k, v in spot_item.items() if k not in ("cell_spot", "spot_expr", "spot_index")}
    with pytest.raises(ValueError, match="mixing spot-level and cell-level"):
        collate_tiles([spot_item, cell_item])


def test_reopen_round_trips(spot_sdata, tmp_path):
    sdata, _ = spot_sdata
    tiles = _spot_tiles(sdata, tmp_path, tiling="grid", spot_coverage=0.5, n_folds=4, fold=1)
    again = TileSet.open(tiles.path)
    assert again.spots_key == "spots"
    assert again.spot_coverage == 0.5
    assert again.spot_names == tiles.spot_names
    assert "spots: 'spots'" in repr(again)
    for i in range(len(tiles)):
        a, b = tiles.all[i], again.all[i]
        for key in ("cell_spot", "spot_expr", "spot_index", "labels"):
            assert torch.equal(a[key], b[key]), key
    # another fold on the same store keeps spot items
    other = again.with_fold(3)
    assert "cell_spot" in other.train[0]


def test_cell_level_stores_have_no_spot_items(spot_sdata, tmp_path):
    sdata, _ = spot_sdata
    tiles = make_tiles(sdata, tile_size=64, progress=False, path=tmp_path / "cells.zarr")
    assert tiles.spots_key is None
    assert tiles.spot_names is None
    item = tiles.train[0]
    assert "cell_spot" not in item
    assert "spot_expr" not in item
    assert "cell_spot" not in collate_tiles([item])


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"spots_key": "spotz"}, KeyError, "Spots 'spotz' not found"),
        ({"cell_type_key": "cell_type"}, ValueError, "carry no cell types"),
        ({"table_key": "table"}, ValueError, "annotates \\['nuclei'\\], not 'spots'"),
        ({"spot_coverage": 0.0}, ValueError, "spot_coverage"),
        ({"spot_coverage": 1.5}, ValueError, "spot_coverage"),
        ({"spot_target_sum": -1}, ValueError, "spot_target_sum"),
        ({"spot_scaling": "cell"}, ValueError, "spot_scaling"),
        ({"tiling": "hex"}, ValueError, "tiling"),
        ({"tiling": "spots", "spots_key": None}, ValueError, "pass `spots_key`"),
    ],
)
def test_bad_spot_inputs(spot_sdata, tmp_path, kwargs, error, match):
    sdata, _ = spot_sdata
    with pytest.raises(error, match=match):
        _spot_tiles(sdata, tmp_path, **kwargs)
    assert not (tmp_path / "spots.zarr").exists()


def test_spots_must_be_circles_or_polygons_listed_in_the_shapes(tmp_path):
    sdata = ghist.datasets.synthetic(image_size=128, n_genes=4, seed=2)
    add_spots(sdata)
    sdata.tables["spot_counts"].obs["spot_id"] = sdata.tables["spot_counts"].obs["spot_id"] + 100
    with pytest.raises(ValueError, match=r"not in `sdata.shapes\['spots'\]`"):
        _spot_tiles(sdata, tmp_path)
    add_spots(sdata)
    sdata.shapes["spots"].drop(columns="radius", inplace=True)  # points without a radius are not spots
    with pytest.raises(ValueError, match=r"must be circles .* or polygons"):
        _spot_tiles(sdata, tmp_path)


def test_square_spots_train_by_the_shared_rule(tmp_path):
    """Square bins (Visium HD-like) sharing edges: every nucleus in one square, as aggregation and evaluation see it."""
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata.transformations import Identity

    from ghist._spot_membership import assign_to_spots, spot_geometry

    sdata = ghist.datasets.synthetic(image_size=256, n_genes=16, seed=0)
    add_spots(sdata)  # the table; its circles are replaced by squares tiling [0, 240) x [0, 240)
    centres = np.c_[sdata.shapes["spots"].geometry.x, sdata.shapes["spots"].geometry.y]
    squares = gpd.GeoDataFrame(geometry=[box(x - 30, y - 30, x + 30, y + 30) for x, y in centres])
    sdata.shapes["spots"] = ShapesModel.parse(squares, transformations={"global": Identity()})
    centroids = label_centroids(sdata)
    ids = np.array(list(centroids))
    owner = dict(zip(ids, assign_to_spots(np.stack(list(centroids.values())), spot_geometry(squares, "spots"))))
    members = {k: [c for c in ids if owner[c] == k] for k in range(len(centres))}

    tiles = _spot_tiles(sdata, tmp_path, tiling="spots", fold=None, spot_target_sum=None, tile_size=96)
    supervised = set()
    for i in range(len(tiles)):
        item = tiles.all[i]
        for cid, s in zip(item["cell_id"].tolist(), item["cell_spot"].tolist(), strict=True):
            if s >= 0:
                assert int(item["spot_index"][s]) == owner[cid]
        for k, spot in enumerate(item["spot_index"].tolist()):
            assert int((item["cell_spot"] == k).sum()) == len(members[spot])
            supervised.add(spot)
    assert len(supervised) >= 5


# ------------------------------------------------------------------------------------------------ footprint
def _square_spots(sdata):
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata.transformations import Identity

    centres = np.c_[sdata.shapes["spots"].geometry.x, sdata.shapes["spots"].geometry.y]
    squares = gpd.GeoDataFrame(geometry=[box(x - 30, y - 30, x + 30, y + 30) for x, y in centres])
    sdata.shapes["spots"] = ShapesModel.parse(squares, transformations={"global": Identity()})


@pytest.mark.parametrize("layout", ["inscribed", "squares", "gapped"])
def test_nuclei_lost_between_touching_circles_are_reported(layout, tmp_path, caplog):
    """Circles inscribed in 60-px square bins miss the bins' corners (1 - pi/4 of the area): warn, suggest squares."""
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=8, seed=0)
    members = add_spots(sdata, radius=25.0 if layout == "gapped" else 30.0, step=60.0, first=30.0)
    if layout == "squares":
        _square_spots(sdata)
    centroids = label_centroids(sdata)
    # nuclei among the 4 x 4 spots: within the squares [0, 240]^2, or within a radius of the centres' box [30, 210]^2
    reach = 0.0 if layout == "squares" else 25.0 if layout == "gapped" else 30.0
    lo, hi = (0.0, 240.0) if layout == "squares" else (30.0, 210.0)
    among = [
        c
        for c, (x, y) in centroids.items()
        if np.hypot(max(lo - x, 0.0, x - hi), max(lo - y, 0.0, y - hi)) <= reach + 1e-9
    ]
    in_circles = {c for m in members.values() for c in m}
    with caplog.at_level(logging.INFO, logger="ghist"):
        _spot_tiles(sdata, tmp_path, tiling="spots", fold=None)
    info = [r.getMessage() for r in caplog.records if "lie in no spot and supervise nothing" in r.getMessage()]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "among the" in r.getMessage()]
    assert len(info) == 1
    if layout == "squares":
        assert f": 0 of the {len(among)} nuclei" in info[0]
        assert not warned
        return
    lost = len([c for c in among if c not in in_circles])
    assert f": {lost} of the {len(among)} nuclei" in info[0]
    if layout == "gapped":  # Visium-like gaps between spots are by design: logged, not warned
        assert not warned
        return
    share = round(100 * lost / len(among))
    assert 12 <= share <= 30  # about 1 - pi / 4 = 21%
    assert len(warned) == 1
    assert f"{share}% of the {len(among)} nuclei among the spots 'spots' lie in no spot" in warned[0]
    assert "polygons (squares" in warned[0]
