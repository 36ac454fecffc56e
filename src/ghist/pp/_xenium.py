"""A 10x Xenium sample read by spatialdata-io, turned into ghist's data contract (H&E, nuclei, measured table).

What ``spatialdata_io.xenium(path)`` (0.6 and later) and ``spatialdata_io.xenium_aligned_image(...)`` produce:

- ``labels["nucleus_labels"]`` / ``labels["cell_labels"]``: the Xenium segmentation rasters (``uint32``, multiscale by
  default), ``Identity`` to ``"global"``, whose unit is the morphology image pixel (0.2125 µm);
- ``images["morphology_focus"]`` (DAPI and stains, ``uint16``) and, for a post-Xenium H&E, ``images["he_image"]``:
  RGB(A) ``uint8``, multiscale, with the alignment ``Affine`` (H&E pixels -> ``"global"``);
- ``shapes["cell_boundaries"]`` / ``shapes["nucleus_boundaries"]`` polygons and, with ``cells_as_circles=True``,
  ``shapes["cell_circles"]``, all in µm with ``Scale(1 / 0.2125)`` to ``"global"``. Since XOA 2.0 the nucleus
  polygons are indexed by the nucleus label id and carry the owning cell's string id in a ``cell_id`` column;
- ``tables["table"]``: one row per cell, raw counts, string ids in ``obs["cell_id"]`` (also the ``obs_names``),
  ``obs["region"]`` = ``"cell_labels"`` (or ``"cell_circles"``) and, when the reader could map them,
  ``obs["cell_labels"]``: the integer id of the cell in ``labels["cell_labels"]`` (the instance key when the table
  annotates the labels). ``obsm["spatial"]`` holds the cell centroids in µm; XOA >= 2.0 adds
  ``obs["nucleus_count"]``.

Nucleus ids are not cell ids: from XOA 2.0 on, the nucleus raster numbers the nucleus polygons, and a cell may have
several nuclei or none. From XOA 1.3 to 2.0 every cell has one nucleus and both rasters share the ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, TableModel, get_table_keys
from spatialdata.transformations import Affine, BaseTransformation, get_transformation, set_transformation
from xarray import DataArray, DataTree

from .._constants import (
    CELL_TYPE_KEY,
    IMAGE_KEY,
    INSTANCE_KEY,
    LABELS_KEY,
    MICRONS_CS,
    REGION_KEY,
    SPATIAL_KEY,
    SPATIAL_MICRONS_KEY,
    TABLE_KEY,
    UNS_KEY,
    XENIUM_CELL_ID_KEY,
    XENIUM_HE_KEY,
)
from .._deprecation import renamed_arguments
from .._docs import doc_params
from .._spatial import element_transformations
from .._validation import _preview, check_int, check_number, raster_levels, require_key, scale0
from .._write import check_writable, write_element

logger = logging.getLogger(__name__)

XENIUM_PIXEL_SIZE = 0.2125  # µm per morphology image pixel, the "global" unit of spatialdata-io's Xenium reader
# Side of the prepared H&E's chunks, as `ghist.io.read_wsi` chunks slides: a tile window then reads a few MB, not the
# whole slide (`xenium_aligned_image` reads the H&E as one chunk).
HE_CHUNK_SIZE = 2048
_RGB = ("r", "g", "b")

_doc_sdata_xenium = """\
sdata
    A :class:`spatialdata.SpatialData` read with ``spatialdata_io.xenium(path)``, with the aligned H&E added (the
    reader does it for ``*he_image.ome.tif`` files next to the output, or
    ``sdata.images["he_image"] = spatialdata_io.xenium_aligned_image(he_path, alignment_csv)``)."""


@renamed_arguments(he_key="image_key")
@doc_params(sdata=_doc_sdata_xenium)
def prepare_xenium(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    labels_key: str = "nucleus_labels",
    table_key: str = TABLE_KEY,
    cell_type_key: str | None = None,
    cell_id_key: str = "cell_id",
    nucleus_boundaries_key: str = "nucleus_boundaries",
    nucleus_to_cell: Mapping[int, Any] | pd.Series | None = None,
    pixel_size: float = XENIUM_PIXEL_SIZE,
    chunk_size: int | None = HE_CHUNK_SIZE,
    gex_only: bool = True,
    key_added_image: str = IMAGE_KEY,
    key_added_labels: str = LABELS_KEY,
    key_added_table: str = TABLE_KEY,
    inplace: bool = False,
    overwrite: bool = False,
) -> SpatialData:
    """Bring a Xenium sample with its post-Xenium H&E into ghist's data contract.

    The result holds exactly what :func:`ghist.pp.make_tiles`, :func:`ghist.tl.predict` and
    :func:`ghist.tl.evaluate` expect: the H&E as RGB ``uint8`` ``(c, y, x)``, the Xenium nucleus segmentation as
    integer labels, and the cells' raw counts in a table annotating those labels with integer ids. Pixel data are
    never copied or loaded: the new elements are lazy views of the same (dask) arrays, with new transformations.

    **H&E.** ``images[image_key]`` keeps its alignment to ``"global"``. An alpha channel (4th channel, or the one named
    ``"a"``) is dropped; ``uint16`` is scaled to ``uint8`` (``// 257``); other dtypes are refused. A scale stored in
    chunks larger than ``chunk_size`` (``spatialdata_io.xenium_aligned_image`` reads the whole H&E as one chunk) is
    cut into ``chunk_size`` tiles holding all three channels, and a single-scale H&E larger than one chunk gets a
    pyramid (factor 2, area mean, down to one chunk) for :func:`ghist.tl.predict` and
    :func:`ghist.pp.detect_tissue` to read the level they need. Both are lazy: until the result is written, every
    read still goes through the source chunk, so write it once (``prepared.write(path)``, then
    ``spatialdata.read_zarr(path)``); a warning says so.

    **Nuclei and cells.** Each nucleus label is given the integer id of the cell it belongs to: ``obs["cell_labels"]``
    when the table has it (so a nucleus and its cell in ``labels["cell_labels"]`` share the id), else the cell's row
    number + 1. All nuclei of a multinucleate cell share its id; cells without a nucleus are left out of the table
    (nothing of them can be seen on the H&E); nuclei whose cell is not in the table keep a label (``id +`` the
    largest cell id) so the network still sees them, without expression. The nucleus -> cell map comes from, in
    order of preference:

    1. ``nucleus_to_cell`` when given: nucleus label id -> value of ``obs[cell_id_key]``;
    2. the table itself, when it already annotates ``labels_key`` with integer instance ids (nothing is relabelled);
    3. ``shapes[nucleus_boundaries_key]`` when it is indexed by nucleus label id and has a ``cell_id_key`` column
       (spatialdata-io with XOA >= 2.0);
    4. ``obs["cell_labels"]``, when the table has no ``obs["nucleus_count"]`` (XOA 1.3 to 2.0: one nucleus per cell,
       with the cell's id).

    **Table.** A copy of the table's cells that have a nucleus: the same counts (``X``, layers), ``var`` restricted
    to ``"Gene Expression"`` features when ``gex_only`` and ``var["feature_types"]`` exists, ``obs`` with
    ``obs["region"]`` = ``key_added_labels``, ``obs["cell_id"]`` = the integer nucleus/cell id (instance key), the
    string cell ids in ``obs["xenium_cell_id"]`` (and ``obs_names``), ``obs["cell_type"]`` (categorical copy of
    ``obs[cell_type_key]``) when ``cell_type_key`` is given. The µm centroids of ``obsm["spatial"]`` move to
    ``obsm["spatial_microns"]``; ``obsm["spatial"]`` gets them in the nucleus labels' pixel coordinates.

    **Coordinates.** Every transformation of the H&E and of the labels is kept; a ``"microns"`` coordinate system
    is added to both (``"global"`` scaled by ``pixel_size``) unless the element already has one.

    Parameters
    ----------
    {sdata}
    image_key
        Key of the aligned H&E in ``sdata.images``. Default: ``"he_image"`` if present, else the only image whose
        channels are named r, g, b(, a).
    labels_key
        Key of the Xenium nucleus segmentation in ``sdata.labels``.
    table_key
        Key of the Xenium cell table in ``sdata.tables`` (raw counts).
    cell_type_key
        Column of the table's ``obs`` holding cell types (e.g. from :func:`ghist.pp.annotate_cell_types` or 10x's
        cell type export), copied to ``obs["cell_type"]`` of the prepared table. ``None``: no cell types.
    cell_id_key
        Column of the table's ``obs`` with the Xenium string cell ids (the ids ``nucleus_boundaries_key`` and
        ``nucleus_to_cell`` refer to).
    nucleus_boundaries_key
        Shapes element with the nucleus polygons (used for the nucleus -> cell map; see above).
    nucleus_to_cell
        Explicit map nucleus label id -> cell id (as in ``obs[cell_id_key]``), overriding the automatic one.
    pixel_size
        µm per ``"global"`` unit, for the ``"microns"`` coordinate system and for ``obsm["spatial"]``
        (0.2125 for spatialdata-io's Xenium reader).
    chunk_size
        Side, in pixels, of the prepared H&E's chunks (see above); ``None`` keeps the H&E's chunks and scales as
        they are.
    gex_only
        Keep only ``var["feature_types"] == "Gene Expression"`` (no control probes) when that column exists.
    key_added_image
        Key of the prepared H&E.
    key_added_labels
        Key of the prepared nucleus labels.
    key_added_table
        Key of the prepared table.
    inplace
        Also add the three elements to ``sdata`` (and to the Zarr store backing it, each element all or nothing).
    overwrite
        With ``inplace=True``, replace existing elements of the same kind under the ``key_added_*`` names (e.g. the
        original ``"table"``), in memory or in the backing store, instead of raising.

    Returns
    -------
    A new :class:`~spatialdata.SpatialData` with ``images[key_added_image]``, ``labels[key_added_labels]`` and
    ``tables[key_added_table]`` (``uns["ghist"]["prepare_xenium"]`` holds the settings and counts). With
    ``inplace=False`` (default) ``sdata`` is left untouched; with ``inplace=True`` the same three elements are also
    added to ``sdata`` (earlier versions returned ``None`` then).

    Examples
    --------
    >>> import spatialdata_io
    >>> sdata = spatialdata_io.xenium("Xenium_output/", cells_as_circles=True)
    >>> sdata.images["he_image"] = spatialdata_io.xenium_aligned_image("he.ome.tif", "he_alignment.csv")
    >>> prepared = ghist.pp.prepare_xenium(sdata)
    >>> tiles = ghist.pp.make_tiles(prepared)

    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    check_number("pixel_size", pixel_size)  # µm per 'global' unit
    check_int("chunk_size", chunk_size, 32, optional=True)
    keys = [key_added_image, key_added_labels, key_added_table]
    if len(set(keys)) != 3:
        raise ValueError(f"`key_added_image`, `key_added_labels` and `key_added_table` must differ; got {keys}.")
    if inplace:
        _check_inplace(sdata, key_added_image, key_added_labels, key_added_table, overwrite)

    image_key = _resolve_image_key(sdata, image_key)
    he = _prepare_image(sdata.images[image_key], image_key, pixel_size, chunk_size)
    labels_el = require_key(sdata, "labels", labels_key)
    labels = scale0(labels_el)
    if tuple(labels.dims) != ("y", "x") or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Labels {labels_key!r} have dims {tuple(labels.dims)} and dtype {labels.dtype}; expected 2D ('y', 'x') "
            "integer nucleus ids."
        )
    table = require_key(sdata, "tables", table_key)
    if cell_type_key is not None and cell_type_key not in table.obs:
        raise KeyError(
            f"Cell type column {cell_type_key!r} not found in `sdata.tables[{table_key!r}].obs` "
            f"(have {list(table.obs.columns)})."
        )

    nucleus_ids, rows, source = _nucleus_map(
        sdata, table, table_key, labels_key, cell_id_key, nucleus_boundaries_key, nucleus_to_cell
    )
    cells = np.unique(rows)  # measured cells with a nucleus, in table order
    if cells.size == 0:
        raise ValueError(
            f"No nucleus of {labels_key!r} could be matched to a cell of table {table_key!r} (map from {source})."
        )
    if source == "table":
        new_id_of_row = pd.Series(nucleus_ids, index=rows)
        relabel = None
    else:
        new_id_of_row = _cell_ids(table)
        lut_ids = new_id_of_row.to_numpy()[rows]
        relabel = None if np.array_equal(lut_ids, nucleus_ids) else (nucleus_ids, lut_ids)
    new_labels = _prepare_labels(labels_el, relabel, pixel_size)
    labels_to_um = element_transformations(new_labels)[MICRONS_CS]

    prepared = _prepare_table(
        table,
        cells,
        np.asarray(new_id_of_row.loc[cells] if source == "table" else new_id_of_row.to_numpy()[cells]),
        key_added_labels=key_added_labels,
        cell_id_key=cell_id_key,
        cell_type_key=cell_type_key,
        gex_only=gex_only,
        labels_to_um=None if source == "table" else labels_to_um,
    )
    n_nuclei = int(np.unique(nucleus_ids).size)
    n_multi = int((pd.Series(rows).value_counts() > 1).sum())
    prepared.uns[UNS_KEY] = {
        "prepare_xenium": {
            "params": {
                "image_key": image_key,
                "labels_key": labels_key,
                "table_key": table_key,
                "cell_type_key": cell_type_key,
                "nucleus_to_cell": source,
                "pixel_size": float(pixel_size),
                "chunk_size": chunk_size,
                "gex_only": bool(gex_only),
            },
            "n_cells": int(prepared.n_obs),
            "n_cells_without_nucleus": int(table.n_obs - cells.size),
            "n_multinucleate_cells": n_multi,
            "n_nuclei_matched": n_nuclei,
            "relabelled": relabel is not None,
        }
    }
    prepared = TableModel.parse(prepared, region=key_added_labels, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    logger.info(
        "Xenium sample prepared (nucleus -> cell map from %s): %d cells with a nucleus (%d without one left out, %d "
        "multinucleate), %d genes; H&E %r -> %r, nuclei %r -> %r%s.",
        source,
        prepared.n_obs,
        table.n_obs - cells.size,
        n_multi,
        prepared.n_vars,
        image_key,
        key_added_image,
        labels_key,
        key_added_labels,
        ", relabelled with the cell ids" if relabel is not None else "",
    )
    if inplace:
        # one element at a time, each all or nothing (and to the backing store); the table, which refers to the
        # labels, last
        he = write_element(sdata, key_added_image, he, overwrite=overwrite, arg="key_added_image")
        new_labels = write_element(sdata, key_added_labels, new_labels, overwrite=overwrite, arg="key_added_labels")
        prepared = write_element(sdata, key_added_table, prepared, overwrite=overwrite, arg="key_added_table")
    return SpatialData(
        images={key_added_image: he}, labels={key_added_labels: new_labels}, tables={key_added_table: prepared}
    )


# --------------------------------------------------------------------------------------------------------------------
# Checks and element lookup
# --------------------------------------------------------------------------------------------------------------------
def _check_inplace(sdata: SpatialData, image_key: str, labels_key: str, table_key: str, overwrite: bool) -> None:
    for key, kind, arg in (
        (image_key, "images", "key_added_image"),
        (labels_key, "labels", "key_added_labels"),
        (table_key, "tables", "key_added_table"),
    ):
        check_writable(sdata, key, kind, overwrite=overwrite, arg=arg, hint="`inplace=False` to get a new SpatialData")


_RAW_XENIUM_REGIONS = {"cell_labels", "cell_circles", "cell_boundaries"}
_RAW_XENIUM_LABELS = {"cell_labels", "nucleus_labels"}


def _raw_xenium_regions(sdata: SpatialData, table_key: str) -> list[str] | None:
    """The regions of ``sdata.tables[table_key]`` when it is the cell table of ``spatialdata_io.xenium``, else None.

    The reader's signature (module docstring): labels ``cell_labels``/``nucleus_labels``, and a table annotating the
    cells (``cell_labels``, ``cell_circles`` or ``cell_boundaries``) with string ids in ``obs["cell_id"]``, which
    :func:`prepare_xenium` has not rewritten.
    """
    if not _RAW_XENIUM_LABELS & set(sdata.labels) or table_key not in sdata.tables:
        return None
    table = sdata.tables[table_key]
    if TableModel.ATTRS_KEY not in table.uns or "prepare_xenium" in table.uns.get(UNS_KEY, {}):
        return None
    regions = get_table_keys(table)[0]
    regions = [regions] if isinstance(regions, str) else list(regions)
    cell_id = table.obs.get("cell_id")
    if not regions or not set(regions) <= _RAW_XENIUM_REGIONS or cell_id is None:
        return None
    return None if pd.api.types.is_integer_dtype(cell_id.dtype) else regions


def check_not_raw_xenium(sdata: SpatialData, *, labels_key: str, table_key: str, sample: str = "0") -> None:
    """Stop tiling straight from ``spatialdata_io.xenium`` output, which :func:`prepare_xenium` must convert first.

    - ``labels_key="cell_labels"`` with the reader's table: whole-cell masks (nucleus and cytoplasm) would be taken
      for nuclei, while ghist predicts per nucleus of the H&E: a warning;
    - any other labels (``"nucleus_labels"``) with that table: the table annotates the cells, not the nuclei, and
      nucleus ids are not cell ids: a :class:`ValueError` naming :func:`prepare_xenium`.

    Examples
    --------
    >>> check_not_raw_xenium(sdata, labels_key="nuclei", table_key="table")

    """
    regions = _raw_xenium_regions(sdata, table_key)
    if regions is None:
        return
    fix = (
        "Run `sdata = ghist.pp.prepare_xenium(sdata)` first: it labels every Xenium nucleus with its cell's id and "
        "rewrites the table to annotate those nuclei; then tile its result (labels 'nuclei', table 'table')."
    )
    if labels_key == "cell_labels" and labels_key in regions:
        logger.warning(
            "Sample %r: labels %r and table %r are raw `spatialdata_io.xenium` output: %r are whole-cell masks "
            "(nucleus and cytoplasm), not nuclei, so training would pair each cell's expression with its whole "
            "segmented area while ghist predicts per nucleus. %s",
            sample,
            labels_key,
            table_key,
            labels_key,
            fix,
        )
        return
    if labels_key not in regions:
        raise ValueError(
            f"Table {table_key!r} is raw `spatialdata_io.xenium` output: it annotates the cells {regions} with string "
            f"ids in `obs['cell_id']`, not the nuclei of labels {labels_key!r} (nucleus ids are not cell ids). {fix}"
        )


def _channel_names(element: DataArray | DataTree) -> list[str]:
    image = scale0(element)
    return [str(c).lower() for c in image.coords["c"].values] if "c" in image.coords else []


def _resolve_image_key(sdata: SpatialData, image_key: str | None) -> str:
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(f"H&E {image_key!r} not found in `sdata.images` (have {sorted(sdata.images)}).")
        return image_key
    if XENIUM_HE_KEY in sdata.images:
        return XENIUM_HE_KEY
    rgb = [k for k, v in sdata.images.items() if tuple(_channel_names(v)[:3]) == _RGB]
    if len(rgb) == 1:
        return rgb[0]
    raise ValueError(
        f"Cannot tell which image of `sdata.images` ({sorted(sdata.images)}) is the H&E: "
        f"{'none' if not rgb else len(rgb)} has channels named r, g, b{'' if not rgb else f' ({rgb})'} and none is "
        f"called {XENIUM_HE_KEY!r}. Pass `image_key=`, or add the H&E with "
        "`sdata.images['he_image'] = spatialdata_io.xenium_aligned_image(he_path, alignment_csv)`."
    )


# --------------------------------------------------------------------------------------------------------------------
# Raster elements
# --------------------------------------------------------------------------------------------------------------------
def _with_microns(element: DataArray | DataTree, pixel_size: float) -> dict[str, BaseTransformation]:
    """The element's transformations plus ``"microns"`` (``"global"`` scaled by ``pixel_size``) if absent."""
    transformations = dict(get_transformation(element, get_all=True))
    if MICRONS_CS not in transformations:
        if "global" not in transformations:
            raise ValueError(
                f"The element has no 'global' (nor {MICRONS_CS!r}) coordinate system (has {sorted(transformations)}); "
                "expected the transformations of spatialdata-io's Xenium reader."
            )
        matrix = transformations["global"].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        matrix = np.diag([pixel_size, pixel_size, 1.0]) @ np.asarray(matrix, dtype=np.float64)
        transformations[MICRONS_CS] = Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    return transformations


def _rebuild(element: DataArray | DataTree, convert: Any, transformations: dict[str, BaseTransformation]) -> Any:
    """A new element whose (every scale's) array is ``convert(array)``, with ``transformations``; lazy, no copy."""
    if isinstance(element, DataTree):
        scales = {}
        for name in sorted(element.children):
            var, array = next(iter(element[name].ds.data_vars.items()))
            array = convert(array).copy(deep=False)
            array.attrs = {}
            scales[name] = xr.Dataset({var: array})
        tree = DataTree.from_dict(scales)
        set_transformation(tree, transformations, set_all=True)
        return tree
    array = convert(element).copy(deep=False)
    array.attrs = {}
    set_transformation(array, transformations, set_all=True)
    return array


def _prepare_image(
    element: DataArray | DataTree, he_key: str, pixel_size: float, chunk_size: int | None
) -> DataArray | DataTree:
    image = scale0(element)
    if tuple(image.dims) != ("c", "y", "x"):
        raise ValueError(f"H&E {he_key!r} has dims {tuple(image.dims)}; expected ('c', 'y', 'x').")
    names = _channel_names(element)
    n_channels = image.sizes["c"]
    if n_channels == 4:
        alpha = names.index("a") if "a" in names else 3
        keep = [i for i in range(4) if i != alpha]
        logger.info("H&E %r has 4 channels: dropping channel %d (alpha).", he_key, alpha)
    elif n_channels == 3:
        keep = [0, 1, 2]
    else:
        raise ValueError(f"H&E {he_key!r} has {n_channels} channels; expected 3 (RGB) or 4 (RGBA).")
    if image.dtype == np.uint16:
        logger.info("H&E %r is uint16: scaling to uint8 (// 257).", he_key)
    elif image.dtype != np.uint8:
        raise ValueError(
            f"H&E {he_key!r} has dtype {image.dtype}; expected uint8 (or uint16) RGB. Convert it first, e.g. "
            "`(img / img.max() * 255).astype('uint8')`."
        )

    def convert(array: DataArray) -> DataArray:
        array = array.isel(c=keep)
        if array.dtype == np.uint16:
            array = (array // 257).astype(np.uint8)
        return array.assign_coords(c=list(_RGB))

    transformations = _with_microns(element, pixel_size)
    new = _rebuild(element, convert, transformations)
    if chunk_size is not None:
        new = _tiled(new, he_key, chunk_size, transformations)
    Image2DModel().validate(new)
    return new


def _tiled(
    image: DataArray | DataTree, he_key: str, chunk_size: int, transformations: dict[str, BaseTransformation]
) -> DataArray | DataTree:
    """``image`` in chunks of at most ``chunk_size`` px (all channels in one), with a pyramid if single-scale."""
    levels = [level for _, _, level in raster_levels(image)]
    largest = max(max(max(lv.data.chunks[1]), max(lv.data.chunks[2])) for lv in levels)
    height, width = levels[0].sizes["y"], levels[0].sizes["x"]
    n_scales = 0 if isinstance(image, DataTree) else max(0, math.ceil(math.log2(max(height, width) / chunk_size)))
    if largest <= chunk_size and n_scales == 0:
        return image
    chunks = {"c": -1, "y": chunk_size, "x": chunk_size}
    logger.warning(
        "H&E %r is stored in chunks of up to %d px (the whole %d x %d px image is %s): the prepared H&E is cut into "
        "%d-px chunks%s, but until it is written every read still loads whole source chunks. Write it once and read "
        "it back: `prepared.write('sample.zarr')`, then `prepared = spatialdata.read_zarr('sample.zarr')`.",
        he_key,
        largest,
        width,
        height,
        "one chunk" if largest >= max(height, width) else "in chunks of that size",
        chunk_size,
        f" with a pyramid of {n_scales} more levels" if n_scales else "",
    )
    if n_scales:
        # spatialdata's own pyramid (area mean), so the levels' transformations follow its rules
        return Image2DModel.parse(
            image.data,
            dims=("c", "y", "x"),
            c_coords=list(image.coords["c"].values),
            transformations=transformations,
            scale_factors=[2] * n_scales,
            chunks=chunks,
        )
    return _rebuild(image, lambda array: array.chunk(chunks) if _too_big(array, chunk_size) else array, transformations)


def _too_big(array: DataArray, chunk_size: int) -> bool:
    return max(max(array.data.chunks[1]), max(array.data.chunks[2])) > chunk_size


def _relabel_block(block: np.ndarray, lut: np.ndarray, offset: int, out_dtype: np.dtype) -> np.ndarray:
    out = block.astype(np.int64) + offset
    out[block == 0] = 0
    inside = (block > 0) & (block < lut.size)
    out[inside] = lut[block[inside]]
    return out.astype(out_dtype)


def _prepare_labels(
    element: DataArray | DataTree, relabel: tuple[np.ndarray, np.ndarray] | None, pixel_size: float
) -> DataArray | DataTree:
    if relabel is None:
        convert = _identity
    else:
        nucleus_ids, cell_ids = relabel
        offset = int(cell_ids.max())
        lut = np.arange(int(nucleus_ids.max()) + 1, dtype=np.int64) + offset
        lut[0] = 0
        lut[nucleus_ids] = cell_ids
        dtype = scale0(element).dtype
        dtype = dtype if dtype.itemsize >= 4 else np.dtype(np.int32)

        def convert(array: DataArray) -> DataArray:
            data = array.data
            if hasattr(data, "map_blocks"):
                data = data.map_blocks(_relabel_block, lut=lut, offset=offset, out_dtype=dtype, dtype=dtype)
            else:
                data = _relabel_block(np.asarray(data), lut, offset, dtype)
            return array.copy(data=data)

    new = _rebuild(element, convert, _with_microns(element, pixel_size))
    Labels2DModel().validate(new)
    return new


def _identity(array: DataArray) -> DataArray:
    return array


# --------------------------------------------------------------------------------------------------------------------
# Nucleus -> cell map and table
# --------------------------------------------------------------------------------------------------------------------
def _rows_of_cells(table: AnnData, cell_id_key: str, cells: pd.Index, *, table_key: str) -> np.ndarray:
    if cell_id_key not in table.obs:
        raise KeyError(
            f"Cell id column {cell_id_key!r} not found in `sdata.tables[{table_key!r}].obs` "
            f"(have {list(table.obs.columns)}); pass `cell_id_key=`."
        )
    ids = pd.Index(table.obs[cell_id_key].astype(str))
    if ids.has_duplicates:
        raise ValueError(f"`obs[{cell_id_key!r}]` of table {table_key!r} lists some cells more than once.")
    return ids.get_indexer(cells.astype(str))


def _nucleus_map(
    sdata: SpatialData,
    table: AnnData,
    table_key: str,
    labels_key: str,
    cell_id_key: str,
    boundaries_key: str,
    nucleus_to_cell: Mapping[int, Any] | pd.Series | None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(nucleus label ids, table row of each, where the map came from); nuclei of unknown cells are left out."""
    if nucleus_to_cell is not None:
        series = nucleus_to_cell if isinstance(nucleus_to_cell, pd.Series) else pd.Series(dict(nucleus_to_cell))
        return (*_from_series(series, table, cell_id_key, table_key, "`nucleus_to_cell`"), "nucleus_to_cell")

    attrs = table.uns.get(TableModel.ATTRS_KEY)
    if attrs is not None:
        regions, region_key, instance_key = get_table_keys(table)
        regions = [regions] if isinstance(regions, str) else list(regions)
        if labels_key in regions and pd.api.types.is_integer_dtype(table.obs[instance_key].dtype):
            rows = np.flatnonzero((table.obs[region_key].astype(str) == labels_key).to_numpy())
            ids = table.obs[instance_key].to_numpy()[rows].astype(np.int64)
            if pd.Index(ids).has_duplicates:
                raise ValueError(f"Table {table_key!r} lists some nuclei of {labels_key!r} more than once.")
            return ids, rows, "table"

    shapes = sdata.shapes.get(boundaries_key)
    if shapes is not None and cell_id_key in shapes.columns and pd.api.types.is_integer_dtype(shapes.index.dtype):
        series = pd.Series(shapes[cell_id_key].to_numpy(), index=shapes.index)
        return (
            *_from_series(series, table, cell_id_key, table_key, f"`sdata.shapes[{boundaries_key!r}]`"),
            boundaries_key,
        )

    if "cell_labels" in table.obs and pd.api.types.is_integer_dtype(table.obs["cell_labels"].dtype):
        if "nucleus_count" not in table.obs:
            ids = table.obs["cell_labels"].to_numpy().astype(np.int64)
            rows = np.flatnonzero(ids > 0)
            return ids[rows], rows, "cell_labels"
        reason = (
            "the table comes from XOA >= 2.0 (it has `obs['nucleus_count']`), where nucleus ids differ from the ids "
            "in `obs['cell_labels']`"
        )
    else:
        reason = "the table has no integer `obs['cell_labels']`"
    raise ValueError(
        f"Cannot tell which cell of table {table_key!r} each nucleus of {labels_key!r} belongs to: "
        f"`sdata.shapes[{boundaries_key!r}]` is missing or not indexed by nucleus id with a {cell_id_key!r} column, "
        f"and {reason}. Read the sample with `spatialdata_io.xenium(path, nucleus_boundaries=True)` "
        "(spatialdata-io >= 0.6), or pass `nucleus_to_cell=` (nucleus label id -> cell id)."
    )


def _from_series(
    series: pd.Series, table: AnnData, cell_id_key: str, table_key: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    if not pd.api.types.is_integer_dtype(series.index.dtype):
        raise ValueError(f"{where} must map integer nucleus label ids to cell ids; its keys are {series.index.dtype}.")
    nucleus_ids = series.index.to_numpy().astype(np.int64)
    if (nucleus_ids <= 0).any() or pd.Index(nucleus_ids).has_duplicates:
        raise ValueError(f"{where} must map positive, unique nucleus label ids (0 is background).")
    rows = _rows_of_cells(table, cell_id_key, pd.Index(series.to_numpy()), table_key=table_key)
    known = rows >= 0
    if not known.all():
        missing = series.to_numpy()[~known]
        logger.info(
            "%d nuclei belong to cells absent from table %r (e.g. %s): kept as unmeasured nuclei.",
            int((~known).sum()),
            table_key,
            _preview(pd.unique(missing).tolist(), 3),
        )
    return nucleus_ids[known], rows[known]


def _cell_ids(table: AnnData) -> pd.Series:
    """Integer id of every table row: ``obs["cell_labels"]`` when usable, else row number + 1."""
    column = table.obs.get("cell_labels")
    if column is not None and pd.api.types.is_integer_dtype(column.dtype):
        ids = column.to_numpy().astype(np.int64)
        if (ids > 0).all() and not pd.Index(ids).has_duplicates:
            return pd.Series(ids)
    return pd.Series(np.arange(1, table.n_obs + 1, dtype=np.int64))


def _prepare_table(
    table: AnnData,
    rows: np.ndarray,
    ids: np.ndarray,
    *,
    key_added_labels: str,
    cell_id_key: str,
    cell_type_key: str | None,
    gex_only: bool,
    labels_to_um: np.ndarray | None,
) -> AnnData:
    sub = table[rows]
    if gex_only and "feature_types" in sub.var:
        genes = (sub.var["feature_types"].astype(str) == "Gene Expression").to_numpy()
        if not genes.any():
            raise ValueError("No feature of the table has `var['feature_types'] == 'Gene Expression'`.")
        if not genes.all():
            logger.info("Keeping %d gene expression features of %d (gex_only=True).", int(genes.sum()), sub.n_vars)
        sub = sub[:, genes]
    out = sub.copy()
    out.uns.pop(TableModel.ATTRS_KEY, None)
    out.uns.pop(UNS_KEY, None)
    if cell_id_key in out.obs and not pd.api.types.is_integer_dtype(out.obs[cell_id_key].dtype):
        out.obs[XENIUM_CELL_ID_KEY] = out.obs[cell_id_key].astype(str).to_numpy()
    elif XENIUM_CELL_ID_KEY not in out.obs:
        out.obs[XENIUM_CELL_ID_KEY] = out.obs_names.astype(str).to_numpy()
    out.obs[REGION_KEY] = pd.Categorical([key_added_labels] * out.n_obs)
    out.obs[INSTANCE_KEY] = np.asarray(ids, dtype=np.int64)
    if cell_type_key is not None:
        out.obs[CELL_TYPE_KEY] = pd.Categorical(out.obs[cell_type_key])
    if labels_to_um is not None and SPATIAL_KEY in out.obsm:
        um = np.asarray(out.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
        out.obsm[SPATIAL_MICRONS_KEY] = um
        to_px = np.linalg.inv(labels_to_um)
        out.obsm[SPATIAL_KEY] = um @ to_px[:2, :2].T + to_px[:2, 2]
    if sp.issparse(out.X):
        out.X = out.X.tocsr()
    return out
