"""``prepare_xenium`` on small SpatialData objects built like ``spatialdata_io.xenium`` + ``xenium_aligned_image``."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely
import zarr
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, get_transformation
from xarray import DataTree

import ghist
from ghist._spatial import element_transformations
from ghist._validation import get_image, get_labels, table_annotation

PS = 0.2125  # µm per "global" unit
LABELS_SCALE = 2.0  # labels pixel = 2 "global" units
LABELS_SHAPE = (48, 64)
HE_SHAPE = (72, 92)
HE_ANGLE, HE_SCALE = 0.05, 1.5
GENES = ["EPCAM", "CD3E", "PTPRC", "KRT8", "ACTA2"]
CELL_IDS = [f"aaaa{c}bcd-1" for c in "abcdefgh"]  # Xenium-like string ids, in table order
CELL_LABELS = np.array([3, 1, 2, 8, 5, 4, 7, 6])  # id of each cell in labels["cell_labels"]
# Nucleus polygons in XOA >= 2.0 order (nucleus label = position + 1) -> owning cell's row; -1: a cell that QC
# removed from the table. Cell 1 has two nuclei, cell 2 none.
NUCLEUS_CELL_V2 = [3, 1, 0, 5, -1, 1, 4, 7, 6]
GRID = [(x, y) for y in (8.0, 24.0, 40.0) for x in (10.0, 30.0, 50.0)]  # nucleus centres (labels px)
RADIUS = 4.0


def _he_matrix() -> np.ndarray:
    c, s = HE_SCALE * np.cos(HE_ANGLE), HE_SCALE * np.sin(HE_ANGLE)
    return np.array([[c, -s, -2.0], [s, c, -1.0], [0, 0, 1]])


def _disk_raster(centres, ids, shape, radius):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    out = np.zeros(shape, dtype=np.uint32)
    for (cx, cy), i in zip(centres, ids):
        out[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = i
    return out


def xenium_like(
    *,
    version: str = "2.0",
    region: str = "cell_circles",
    boundaries: bool = True,
    multiscale: bool = True,
    seed: int = 0,
) -> SpatialData:
    """What ``spatialdata_io.xenium(..., cells_as_circles=True)`` + the aligned H&E look like, in miniature."""
    rng = np.random.default_rng(seed)
    if version == "2.0":
        nucleus_cell = NUCLEUS_CELL_V2
        nucleus_ids = np.arange(1, len(nucleus_cell) + 1)
    else:  # XOA 1.3-2.0: one nucleus per cell, with the cell's id
        nucleus_cell = list(range(len(CELL_IDS)))
        nucleus_ids = CELL_LABELS.copy()
    centres = GRID[: len(nucleus_cell)]
    nuclei = _disk_raster(centres, nucleus_ids, LABELS_SHAPE, RADIUS)
    cell_raster = np.zeros(LABELS_SHAPE, dtype=np.uint32)
    for (cx, cy), c in zip(centres, nucleus_cell):
        if c >= 0:
            cell_raster = np.where(
                cell_raster == 0, _disk_raster([(cx, cy)], [CELL_LABELS[c]], LABELS_SHAPE, 6.0), cell_raster
            )
    labels_t = {"global": Scale([LABELS_SCALE, LABELS_SCALE], axes=("y", "x"))}
    labels = {
        "nucleus_labels": Labels2DModel.parse(
            nuclei,
            dims=("y", "x"),
            transformations=labels_t,
            scale_factors=[2] if multiscale else None,
            chunks=(16, 16),
        ),
        "cell_labels": Labels2DModel.parse(cell_raster, dims=("y", "x"), transformations=labels_t, scale_factors=[2]),
    }

    # Cell centroids (µm): mean of their nuclei, or a free spot for cells without one.
    centroid_px = np.array(
        [
            np.mean([centres[k] for k, c in enumerate(nucleus_cell) if c == row], axis=0)
            if row in nucleus_cell
            else (55.0, 44.0)
            for row in range(len(CELL_IDS))
        ]
    )
    centroid_um = centroid_px * LABELS_SCALE * PS
    counts = rng.poisson(3.0, size=(len(CELL_IDS), len(GENES) + 1)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_id": CELL_IDS,
            "transcript_counts": counts.sum(1),
            "cell_area": np.full(len(CELL_IDS), 40.0),
            "cell_labels": CELL_LABELS.astype(np.int64),
            "region": pd.Categorical([region] * len(CELL_IDS)),
            "annotation": pd.Categorical(rng.choice(["T", "Malignant", "Fibroblast"], size=len(CELL_IDS))),
        },
        index=pd.Index(CELL_IDS),
    )
    if version == "2.0":
        obs["nucleus_count"] = [sum(c == row for c in nucleus_cell) for row in range(len(CELL_IDS))]
    var = pd.DataFrame(
        {"feature_types": ["Gene Expression"] * len(GENES) + ["Negative Control Probe"]},
        index=[*GENES, "NegControlProbe_00042"],
    )
    table = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    table.obsm["spatial"] = centroid_um
    instance_key = "cell_id" if region == "cell_circles" else "cell_labels"
    table = TableModel.parse(table, region=region, region_key="region", instance_key=instance_key)

    to_global = {"global": Scale([1 / PS, 1 / PS], axes=("x", "y"))}
    shapes = {
        "cell_circles": ShapesModel.parse(
            centroid_um,
            geometry=0,
            radius=np.full(len(CELL_IDS), 2.0),
            index=pd.Index(CELL_IDS),
            transformations=to_global,
        )
    }
    if boundaries:
        polys = shapely.buffer(shapely.points(np.array(centres) * LABELS_SCALE * PS), RADIUS * LABELS_SCALE * PS)
        owner = [CELL_IDS[c] if c >= 0 else "zzzzzzzz-1" for c in nucleus_cell]
        if version == "2.0":
            frame = gpd.GeoDataFrame({"cell_id": owner}, geometry=polys, index=pd.Index(nucleus_ids))
        else:  # older layout: indexed by the string cell id
            frame = gpd.GeoDataFrame(geometry=polys, index=pd.Index(owner, name="cell_id"))
        shapes["nucleus_boundaries"] = ShapesModel.parse(frame, transformations=to_global)

    he = rng.integers(0, 256, size=(4, *HE_SHAPE), dtype=np.uint8)
    he[3] = 255
    images = {
        "morphology_focus": Image2DModel.parse(
            rng.integers(0, 4000, size=(1, 96, 128), dtype=np.uint16),
            dims=("c", "y", "x"),
            c_coords=["DAPI"],
            transformations={"global": Identity()},
            scale_factors=[2],
        ),
        "he_image": Image2DModel.parse(
            da.from_array(he, chunks=(1, 32, 32)),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b", "a"],
            transformations={"global": Affine(_he_matrix(), input_axes=("x", "y"), output_axes=("x", "y"))},
            scale_factors=[2],
        ),
    }
    return SpatialData(images=images, labels=labels, shapes=shapes, tables={"table": table})


def _values(element) -> np.ndarray:
    return np.asarray(ghist._validation.scale0(element).data.compute())


def _table_row(cell_id: str) -> int:
    return CELL_IDS.index(cell_id)


@pytest.mark.parametrize("region", ["cell_circles", "cell_labels"])
def test_xoa2_contract(region):
    sdata = xenium_like(region=region)
    original_nuclei = _values(sdata.labels["nucleus_labels"])
    before_obs = sdata.tables["table"].obs.copy()
    before_t = {k: dict(get_transformation(v, get_all=True)) for k, v in {**sdata.images, **sdata.labels}.items()}

    prepared = ghist.pp.prepare_xenium(sdata, cell_type_key="annotation")

    assert set(prepared.images) == {"he"}
    assert set(prepared.labels) == {"nuclei"}
    assert set(prepared.tables) == {"table"}
    # H&E: RGB uint8, still multiscale and lazy, alpha dropped
    he = prepared.images["he"]
    assert isinstance(he, DataTree)
    image = get_image(prepared, "he")
    assert image.sizes["c"] == 3
    assert list(image.coords["c"].values) == ["r", "g", "b"]
    assert isinstance(image.data, da.Array)
    np.testing.assert_array_equal(image.data.compute(), _values(sdata.images["he_image"])[:3])
    # labels: each nucleus now carries its cell's `cell_labels` id
    labels = get_labels(prepared, "nuclei")
    assert isinstance(labels.data, da.Array)
    new = labels.data.compute()
    for k, c in enumerate(NUCLEUS_CELL_V2):
        values = np.unique(new[original_nuclei == k + 1])
        assert values.size == 1
        if c >= 0:
            assert values[0] == CELL_LABELS[c]
        else:  # nucleus of a cell absent from the table: kept, with an id no cell has
            assert values[0] == k + 1 + CELL_LABELS.max()
    assert (new[original_nuclei == 0] == 0).all()
    lower = np.asarray(next(iter(prepared.labels["nuclei"]["scale1"].ds.data_vars.values())).data.compute())
    assert set(np.unique(lower)) <= set(np.unique(new))

    # table: cells with a nucleus, integer ids matching the labels, gene expression only
    table = prepared.tables["table"]
    region_key, instance_key = table_annotation(prepared, "table", "nuclei")
    assert (region_key, instance_key) == ("region", "cell_id")
    kept = [CELL_IDS[r] for r in range(len(CELL_IDS)) if r in NUCLEUS_CELL_V2]
    assert list(table.obs["xenium_cell_id"]) == kept
    assert list(table.obs_names) == kept
    assert list(table.obs["cell_id"]) == [CELL_LABELS[_table_row(c)] for c in kept]
    assert set(table.obs["cell_id"]) <= set(np.unique(new)) - {0}
    assert list(table.var_names) == GENES
    original = sdata.tables["table"]
    np.testing.assert_array_equal(table.X.toarray(), original[kept, GENES].X.toarray())
    assert isinstance(table.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert list(table.obs["cell_type"].astype(str)) == list(original[kept].obs["annotation"].astype(str))
    # centroids: µm kept aside, labels pixels in obsm["spatial"]
    np.testing.assert_allclose(table.obsm["spatial_microns"], original[kept].obsm["spatial"])
    np.testing.assert_allclose(table.obsm["spatial"], original[kept].obsm["spatial"] / (PS * LABELS_SCALE))
    info = table.uns["ghist"]["prepare_xenium"]
    assert info["params"]["nucleus_to_cell"] == "nucleus_boundaries"
    assert info["n_cells_without_nucleus"] == 1
    assert info["n_multinucleate_cells"] == 1

    # coordinate systems: global kept, microns added
    he_t = element_transformations(prepared.images["he"])
    np.testing.assert_allclose(he_t["global"], _he_matrix())
    np.testing.assert_allclose(he_t["microns"], np.diag([PS, PS, 1.0]) @ _he_matrix())
    lab_t = element_transformations(prepared.labels["nuclei"])
    np.testing.assert_allclose(lab_t["microns"], np.diag([PS * LABELS_SCALE, PS * LABELS_SCALE, 1.0]))
    assert ghist._spatial.image_pixel_size(prepared, "nuclei") == pytest.approx(PS * LABELS_SCALE)

    # the user's data are untouched
    assert set(sdata.images) == {"morphology_focus", "he_image"}
    assert sdata.images["he_image"]["scale0"]["image"].sizes["c"] == 4
    assert {
        k: dict(get_transformation(v, get_all=True)) for k, v in {**sdata.images, **sdata.labels}.items()
    } == before_t
    pd.testing.assert_frame_equal(sdata.tables["table"].obs, before_obs)
    np.testing.assert_array_equal(_values(sdata.labels["nucleus_labels"]), original_nuclei)


def test_make_tiles_on_prepared(tmp_path):
    prepared = ghist.pp.prepare_xenium(xenium_like(multiscale=False), cell_type_key="annotation")
    assert isinstance(prepared.labels["nuclei"].data, da.Array)  # single-scale labels stay single-scale and lazy
    tiles = ghist.pp.make_tiles(
        prepared, cell_type_key="cell_type", tile_size=32, n_folds=3, fold=1, path=tmp_path / "t.zarr", progress=False
    )
    assert len(tiles) > 0
    assert tiles.genes == GENES
    assert set(tiles.cell_types) <= {"T", "Malignant", "Fibroblast"}
    assert tiles.pixel_size == pytest.approx(PS * HE_SCALE)
    measured = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["samples/0/cell_id"][:]
    assert sorted(measured.tolist()) == sorted(prepared.tables["table"].obs["cell_id"].tolist())


def test_xoa13_shared_ids_are_not_relabelled():
    sdata = xenium_like(version="1.3", boundaries=False)
    prepared = ghist.pp.prepare_xenium(sdata)
    info = prepared.tables["table"].uns["ghist"]["prepare_xenium"]
    assert info["params"]["nucleus_to_cell"] == "cell_labels"
    assert info["relabelled"] is False
    np.testing.assert_array_equal(_values(prepared.labels["nuclei"]), _values(sdata.labels["nucleus_labels"]))
    assert list(prepared.tables["table"].obs["cell_id"]) == CELL_LABELS.tolist()
    assert "cell_type" not in prepared.tables["table"].obs
    # the older string-indexed nucleus polygons are recognised as carrying no nucleus ids
    with_polygons = ghist.pp.prepare_xenium(xenium_like(version="1.3", boundaries=True))
    assert with_polygons.tables["table"].uns["ghist"]["prepare_xenium"]["params"]["nucleus_to_cell"] == "cell_labels"


def test_xoa2_without_nucleus_polygons_needs_a_map():
    sdata = xenium_like(boundaries=False)
    with pytest.raises(ValueError, match="nucleus_boundaries=True"):
        ghist.pp.prepare_xenium(sdata)
    mapping = {k + 1: CELL_IDS[c] for k, c in enumerate(NUCLEUS_CELL_V2) if c >= 0}
    prepared = ghist.pp.prepare_xenium(sdata, nucleus_to_cell=mapping)
    assert prepared.tables["table"].uns["ghist"]["prepare_xenium"]["params"]["nucleus_to_cell"] == "nucleus_to_cell"
    original = _values(sdata.labels["nucleus_labels"])
    new = _values(prepared.labels["nuclei"])
    assert np.unique(new[original == 2]).tolist() == [CELL_LABELS[1]]
    assert np.unique(new[original == 6]).tolist() == [CELL_LABELS[1]]  # second nucleus of the same cell


def test_already_annotating_nuclei_is_kept():
    prepared = ghist.pp.prepare_xenium(xenium_like())
    again = ghist.pp.prepare_xenium(prepared, image_key="he", labels_key="nuclei")
    info = again.tables["table"].uns["ghist"]["prepare_xenium"]
    assert info["params"]["nucleus_to_cell"] == "table"
    assert info["relabelled"] is False
    np.testing.assert_array_equal(again.tables["table"].obs["cell_id"], prepared.tables["table"].obs["cell_id"])
    np.testing.assert_allclose(again.tables["table"].obsm["spatial"], prepared.tables["table"].obsm["spatial"])


def test_inplace_and_overwrite():
    sdata = xenium_like()
    with pytest.raises(ValueError, match="already exists"):
        ghist.pp.prepare_xenium(sdata, inplace=True)  # "table" is the Xenium table
    with pytest.raises(ValueError, match="unique"):
        ghist.pp.prepare_xenium(sdata, inplace=True, key_added_table="cell_circles")
    added = ghist.pp.prepare_xenium(sdata, inplace=True, key_added_table="cells")
    assert added.tables["cells"] is sdata.tables["cells"]  # returns what it added (it returned None before)
    assert {"he", "he_image", "morphology_focus"} == set(sdata.images)
    assert {"nuclei", "nucleus_labels", "cell_labels"} == set(sdata.labels)
    assert sdata.tables["cells"].uns["spatialdata_attrs"]["region"] == "nuclei"
    assert sdata.tables["table"].uns["spatialdata_attrs"]["region"] == "cell_circles"
    with pytest.raises(ValueError, match="already exists"):
        ghist.pp.prepare_xenium(sdata, inplace=True, key_added_table="cells")
    ghist.pp.prepare_xenium(sdata, image_key="he_image", inplace=True, overwrite=True)
    assert sdata.tables["table"].uns["spatialdata_attrs"]["region"] == "nuclei"


def test_he_selection_and_dtypes():
    sdata = xenium_like()
    he = sdata.images.pop("he_image")
    sdata.images["post_he"] = he
    assert "he" in ghist.pp.prepare_xenium(sdata).images  # the only r, g, b image
    sdata.images["other_rgb"] = Image2DModel.parse(
        np.zeros((3, 8, 8), np.uint8), dims=("c", "y", "x"), c_coords=["r", "g", "b"]
    )
    with pytest.raises(ValueError, match="image_key"):
        ghist.pp.prepare_xenium(sdata)
    with pytest.raises(KeyError, match="nope"):
        ghist.pp.prepare_xenium(sdata, image_key="nope")
    with pytest.raises(ValueError, match="channels"):
        ghist.pp.prepare_xenium(sdata, image_key="morphology_focus")
    sixteen = Image2DModel.parse(
        np.full((3, 40, 50), 65535, np.uint16),
        dims=("c", "y", "x"),
        transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))},
    )
    sdata.images["he16"] = sixteen
    prepared = ghist.pp.prepare_xenium(sdata, image_key="he16")
    image = get_image(prepared, "he")
    assert image.dtype == np.uint8
    assert int(image.data.max().compute()) == 255
    sdata.images["hef"] = Image2DModel.parse(np.zeros((3, 8, 8), np.float32), dims=("c", "y", "x"))
    with pytest.raises(ValueError, match="uint8"):
        ghist.pp.prepare_xenium(sdata, image_key="hef")


def test_errors():
    sdata = xenium_like()
    with pytest.raises(KeyError, match="ct"):
        ghist.pp.prepare_xenium(sdata, cell_type_key="ct")
    with pytest.raises(KeyError, match="nuc"):
        ghist.pp.prepare_xenium(sdata, labels_key="nuc")
    with pytest.raises(ValueError, match="must differ"):
        ghist.pp.prepare_xenium(sdata, key_added_image="x", key_added_labels="x")
    with pytest.raises(ValueError, match="integer nucleus label ids"):
        ghist.pp.prepare_xenium(sdata, nucleus_to_cell={"a": CELL_IDS[0]})


# ------------------------------------------------------------------------------------------------ make_tiles on raw
def _with_rgb_he(sdata: SpatialData) -> SpatialData:
    """The reader's output plus an RGB copy of the H&E as "he" (make_tiles refuses the RGBA original)."""
    rgb = _values(sdata.images["he_image"])[:3]
    t = get_transformation(sdata.images["he_image"], get_all=True)
    sdata.images["he"] = Image2DModel.parse(rgb, dims=("c", "y", "x"), transformations=t)
    return sdata


def _raw_tiles(sdata, tmp_path, **kwargs):
    kwargs = {"tile_size": 16, "fold": None, "progress": False, "path": tmp_path / "t.zarr", **kwargs}
    return ghist.pp.make_tiles(sdata, **kwargs)


def test_make_tiles_on_raw_cell_labels_warns_they_are_whole_cells(tmp_path, caplog):
    import logging

    sdata = _with_rgb_he(xenium_like(region="cell_labels"))
    table = sdata.tables["table"]  # as the reader: every cell of the table has its cell label
    sdata.tables["table"] = table[np.isin(table.obs["cell_labels"], _values(sdata.labels["cell_labels"]))].copy()
    with caplog.at_level(logging.WARNING, logger="ghist"):
        tiles = _raw_tiles(sdata, tmp_path, labels_key="cell_labels")
    assert len(tiles) > 0  # a deliberate choice still works ...
    (warning,) = [r.getMessage() for r in caplog.records if "prepare_xenium" in r.getMessage()]
    assert "whole-cell masks" in warning  # ... but not silently
    assert "not nuclei" in warning
    assert "'cell_labels'" in warning
    assert "Sample '0'" in warning


@pytest.mark.parametrize("region", ["cell_labels", "cell_circles"])
def test_make_tiles_on_raw_nucleus_labels_points_to_prepare_xenium(region, tmp_path):
    sdata = _with_rgb_he(xenium_like(region=region))
    match = r"raw `spatialdata_io.xenium` output.*not the nuclei of labels 'nucleus_labels'.*prepare_xenium\(sdata\)"
    with pytest.raises(ValueError, match=match):
        _raw_tiles(sdata, tmp_path, labels_key="nucleus_labels")
    with pytest.raises(ValueError, match=r"Sample 'b': .*prepare_xenium"):
        _raw_tiles({"b": sdata}, tmp_path, labels_key="nucleus_labels")
    if region == "cell_circles":  # the circles' table does not annotate the cell labels either
        with pytest.raises(ValueError, match=r"not the nuclei of labels 'cell_labels'.*prepare_xenium"):
            _raw_tiles(sdata, tmp_path, labels_key="cell_labels")
    assert not (tmp_path / "t.zarr").exists()


def test_prepared_xenium_tiles_without_a_word(tmp_path, caplog):
    import logging

    sdata = xenium_like(region="cell_labels")
    ghist.pp.prepare_xenium(sdata, inplace=True, key_added_table="prepared")
    with caplog.at_level(logging.WARNING, logger="ghist"):
        tiles = _raw_tiles(sdata, tmp_path, table_key="prepared")
    assert len(tiles) > 0
    assert not [r for r in caplog.records if "prepare_xenium" in r.getMessage()]


# ------------------------------------------------------------------------------------------------ H&E chunks, pyramid
def _one_chunk_he(sdata: SpatialData, **kwargs) -> SpatialData:
    """The H&E as ``spatialdata_io.xenium_aligned_image`` returns it: single-scale, the whole image in one chunk."""
    rgba = _values(sdata.images["he_image"])
    t = get_transformation(sdata.images["he_image"], get_all=True)
    sdata.images["he_image"] = Image2DModel.parse(
        da.from_array(rgba, chunks=-1), dims=("c", "y", "x"), c_coords=["r", "g", "b", "a"], transformations=t, **kwargs
    )
    return sdata


def test_one_chunk_he_is_tiled_and_given_a_pyramid(caplog):
    import logging

    sdata = _one_chunk_he(xenium_like())
    original = sdata.images["he_image"]
    before = (original.data.chunks, dict(get_transformation(original, get_all=True)), original.data.name)
    with caplog.at_level(logging.WARNING, logger="ghist"):
        prepared = ghist.pp.prepare_xenium(sdata, chunk_size=32)  # HE_SHAPE (72, 92): 3 x 3 chunks, 2 more levels
    he = prepared.images["he"]
    assert isinstance(he, DataTree)
    levels = ghist._validation.raster_levels(he)
    assert [lv[2].shape for lv in levels] == [(3, 72, 92), (3, 36, 46), (3, 18, 23)]
    for _, _, level in levels:  # all channels in one chunk, tiles of at most chunk_size
        assert level.data.chunks[0] == (3,)
        assert max(level.data.chunks[1] + level.data.chunks[2]) <= 32
    scale0 = levels[0][2]
    assert scale0.data.chunks[1:] == ((32, 32, 8), (32, 32, 28))
    np.testing.assert_array_equal(scale0.data.compute(), _values(original)[:3])  # same pixels, alpha dropped
    coarse = levels[1][2].data.compute().astype(float)
    np.testing.assert_allclose(
        coarse, _values(original)[:3].astype(float).reshape(3, 36, 2, 46, 2).mean((2, 4)), atol=1
    )
    # same alignment (and microns) on every level as without the pyramid
    he_t = element_transformations(he)
    np.testing.assert_allclose(he_t["global"], _he_matrix())
    np.testing.assert_allclose(he_t["microns"], np.diag([PS, PS, 1.0]) @ _he_matrix())
    level1 = get_transformation(he["scale1"].ds["image"], get_all=True)["global"]
    np.testing.assert_allclose(
        level1.to_affine_matrix(("x", "y"), ("x", "y")), _he_matrix() @ np.diag([92 / 46, 72 / 36, 1.0])
    )
    (warning,) = [r.getMessage() for r in caplog.records if "chunks of up to" in r.getMessage()]
    assert "H&E 'he_image'" in warning
    assert "one chunk" in warning
    assert "prepared.write(" in warning
    assert "read_zarr" in warning
    # the user's element is untouched
    after = sdata.images["he_image"]
    assert after is original
    assert (after.data.chunks, dict(get_transformation(after, get_all=True)), after.data.name) == before
    assert set(sdata.images) == {"morphology_focus", "he_image"}


def test_he_chunks_that_fit_are_kept_and_chunk_size_none_keeps_everything():
    # multiscale in (1, 16, 16) chunks, as spatialdata_io.xenium reads H&E next to the output (in 4096 px chunks)
    sdata = _one_chunk_he(xenium_like(), scale_factors=[2], chunks=(1, 16, 16))
    prepared = ghist.pp.prepare_xenium(sdata, chunk_size=32)
    for name in ("scale0", "scale1"):
        kept = prepared.images["he"][name].ds["image"].data
        original = sdata.images["he_image"][name].ds["image"].data
        assert kept.chunks == ((1, 1, 1), *original.chunks[1:])
        assert kept.chunks[1][0] == 16
    one_chunk = _one_chunk_he(xenium_like())
    kept = ghist.pp.prepare_xenium(one_chunk, chunk_size=None).images["he"]
    assert not isinstance(kept, DataTree)
    assert kept.data.chunks[1:] == ((72,), (92,))
    small = ghist.pp.prepare_xenium(one_chunk).images["he"]  # fits in one default chunk: no pyramid needed
    assert not isinstance(small, DataTree)
    for bad in (0, 16.0, True):
        with pytest.raises(ValueError, match="`chunk_size` must be an integer >= 32"):
            ghist.pp.prepare_xenium(one_chunk, chunk_size=bad)


def test_tiles_of_a_one_chunk_he_equal_those_of_the_tiled_one(tmp_path):
    kwargs = {"cell_type_key": "cell_type", "tile_size": 32, "n_folds": 3, "fold": 1, "progress": False}
    a = ghist.pp.make_tiles(
        ghist.pp.prepare_xenium(_one_chunk_he(xenium_like()), cell_type_key="annotation", chunk_size=None),
        path=tmp_path / "a.zarr",
        **kwargs,
    )
    b = ghist.pp.make_tiles(
        ghist.pp.prepare_xenium(_one_chunk_he(xenium_like()), cell_type_key="annotation", chunk_size=32),
        path=tmp_path / "b.zarr",
        **kwargs,
    )
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        one, tiled = a.read(i), b.read(i)
        np.testing.assert_array_equal(one["image"], tiled["image"])
        np.testing.assert_array_equal(one["labels"], tiled["labels"])


# ------------------------------------------------------------------------------------------------ synthetic_xenium
def test_synthetic_xenium_is_reader_shaped_and_prepares_back_to_synthetic():
    raw = ghist.datasets.synthetic_xenium(image_size=96, n_genes=12, seed=3)
    base = ghist.datasets.synthetic(image_size=96, n_genes=12, pixel_size=0.5, image_transform="affine", seed=3)
    # the reader's layout: string ids, a table annotating the cell labels, no microns, one-chunk single-scale H&E
    table = raw.tables["table"]
    assert table.obs["cell_id"].str.fullmatch(r"[a-p]{8}-1").all()
    assert table_annotation(raw, "table", "cell_labels") == ("region", "cell_labels")
    assert list(table.var["feature_types"].unique()) == [
        "Gene Expression",
        "Negative Control Probe",
        "Unassigned Codeword",
    ]
    he = raw.images["he_image"]
    assert he.data.numblocks == (1, 1, 1)
    assert set(get_transformation(he, get_all=True)) == {"global"}
    boundaries = raw.shapes["nucleus_boundaries"]
    assert set(boundaries.index) == set(np.unique(_values(raw.labels["nucleus_labels"]))) - {0}
    assert not np.array_equal(_values(raw.labels["nucleus_labels"]), _values(base.labels["nuclei"]))  # ids differ
    with pytest.raises(ValueError, match="prepare_xenium"):
        ghist.pp.make_tiles(raw, image_key="he_image", labels_key="nucleus_labels", progress=False)

    prepared = ghist.pp.prepare_xenium(raw)
    info = prepared.tables["table"].uns["ghist"]["prepare_xenium"]
    assert info["params"]["nucleus_to_cell"] == "nucleus_boundaries"
    assert info["n_cells"] == base.tables["table"].n_obs
    # the same cells, pixels and counts as synthetic(): its ids are the table rows + 1, as the prepared ids
    np.testing.assert_array_equal(_values(prepared.labels["nuclei"]), _values(base.labels["nuclei"]))
    np.testing.assert_array_equal(_values(prepared.images["he"]), _values(base.images["he"]))
    out = prepared.tables["table"]
    np.testing.assert_array_equal(out.obs["cell_id"], base.tables["table"].obs["cell_id"])
    assert list(out.var_names) == list(base.tables["table"].var_names)
    np.testing.assert_array_equal(out.X.toarray(), base.tables["table"].X.toarray())
    np.testing.assert_allclose(out.obsm["spatial"], base.tables["table"].obsm["spatial"], atol=1e-9)
    for key in ("he", "nuclei"):
        np.testing.assert_allclose(
            element_transformations(prepared[key])["microns"], element_transformations(base[key])["microns"], atol=1e-12
        )


def test_a_band_of_the_tile_grid_is_a_region_of_interest(tmp_path):
    """The Xenium tutorial's section 6: a subset of the `key_added` grid, as it is or parsed again, is a valid ROI."""
    from spatialdata.models import ShapesModel

    from ghist._spatial import region_in_pixels

    prepared = ghist.pp.prepare_xenium(xenium_like(multiscale=False), cell_type_key="annotation")
    ghist.pp.make_tiles(
        prepared, tile_size=16, n_folds=3, fold=1, key_added="grid", path=tmp_path / "t.zarr", progress=False
    )
    grid = prepared.shapes["grid"]
    band = grid[grid["split"] == "test"]
    assert 0 < len(band) < len(grid)
    prepared.shapes["band"] = band
    prepared.shapes["parsed"] = ShapesModel.parse(band)
    expected = element_transformations(grid)
    for key in ("band", "parsed"):
        got = element_transformations(prepared.shapes[key])
        assert set(got) == set(expected)
        for cs, matrix in expected.items():
            np.testing.assert_allclose(got[cs], matrix)
        region = region_in_pixels(prepared, key, "nuclei")
        assert region.area == pytest.approx(region_in_pixels(prepared, "band", "nuclei").area)
    full = region_in_pixels(prepared, "grid", "nuclei").area
    assert 0 < region.area < full
