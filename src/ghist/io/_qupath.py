"""`ghist.io.write_qupath`: predicted cells as a GeoJSON QuPath imports (outlines, cell types, chosen genes)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import IMAGE_KEY, PRED_CELL_TYPE_KEY, PRED_KEY
from .._deprecation import renamed_arguments
from .._folders import replaced_file
from .._spatial import element_affine
from .._stats import dense
from .._validation import check_genes, check_int, get_labels, get_table, scale0, table_of_region

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

# tab10's colours: a class gets the colour of its position among the sorted class names (QuPath 0.4+ wants RGB)
_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_ID_NAMESPACE = uuid.UUID("6f1d7a52-3b8e-4c1e-9a57-2f0c8e4d9b61")  # feature ids: stable UUIDs per cell


def _hex_to_rgb(value: str) -> list[int] | None:
    value = value.lstrip("#")
    if len(value) not in (6, 8):
        return None
    try:
        return [int(value[i : i + 2], 16) for i in (0, 2, 4)]
    except ValueError:
        return None


def _class_colours(table, cell_type_key: str, names: list[str]) -> dict[str, list[int]]:
    """Colours of the cell types: the table's own (scanpy's ``uns[f"{key}_colors"]``), else tab10's."""
    own = table.uns.get(f"{cell_type_key}_colors")
    column = table.obs[cell_type_key]
    categories = [str(c) for c in column.cat.categories] if isinstance(column.dtype, pd.CategoricalDtype) else []
    colours = {}
    for i, name in enumerate(sorted(names)):
        rgb = None
        if own is not None and name in categories and categories.index(name) < len(own):
            rgb = _hex_to_rgb(str(own[categories.index(name)]))
        colours[name] = rgb or list(_PALETTE[i % len(_PALETTE)])
    return colours


def _bounding_boxes(labels, band_rows: int) -> dict[int, list[int]]:
    """``id -> [y0, y1, x0, x1]`` of every object, from the labels read band by band."""
    from scipy import ndimage as ndi

    boxes: dict[int, list[int]] = {}
    height = labels.shape[0]
    for y0 in range(0, height, band_rows):
        band = np.asarray(labels[y0 : y0 + band_rows])
        present = np.unique(band)
        present = present[present > 0]
        if not present.size:
            continue
        # relabel the band to 1..k so find_objects allocates k slots, not max(id)
        local = np.searchsorted(present, band) + 1
        local[band == 0] = 0
        for oid, sl in zip(present.tolist(), ndi.find_objects(local), strict=True):
            ys, xs = sl
            box = [ys.start + y0, ys.stop + y0, xs.start, xs.stop]
            old = boxes.get(oid)
            if old is None:
                boxes[oid] = box
            else:
                boxes[oid] = [min(old[0], box[0]), max(old[1], box[1]), min(old[2], box[2]), max(old[3], box[3])]
    return boxes


def _outline(mask: np.ndarray, y0: int, x0: int):
    """The outline of a boolean mask as a shapely (Multi)Polygon in pixel coordinates, along the pixels' edges.

    The union of the mask's runs of pixels, row by row: the outline is exact (holes included), so filling it again by
    pixel centres gives the mask back on its own grid and on any grid it maps onto, finer ones included.
    """
    import shapely

    padded = np.pad(mask, ((0, 0), (1, 1)))
    step = np.diff(padded.astype(np.int8), axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # the same rows, in the same order: runs open and close in turn
    if not rows.size:
        return None
    boxes = shapely.box(starts + x0, rows + y0, ends + x0, rows + y0 + 1)
    return shapely.union_all(boxes)


def _geojson_geometry(geometry) -> dict | None:
    import shapely

    if geometry.geom_type == "GeometryCollection":
        parts = [g for g in geometry.geoms if g.geom_type in ("Polygon", "MultiPolygon")]
        if not parts:
            return None
        geometry = shapely.union_all(parts)
    if geometry.is_empty or geometry.geom_type not in ("Polygon", "MultiPolygon"):
        return None
    # simplify(0) drops only the collinear vertices of the pixel staircase: the same outline, a smaller file
    return json.loads(shapely.to_geojson(shapely.simplify(geometry, 0.0)))


def _write_atomically(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file beside ``path`` and move it into place: never a half-written file."""
    with replaced_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, separators=(",", ":"))


@renamed_arguments(table_key="pred_key")
def write_qupath(
    sdata: SpatialData,
    path: str | os.PathLike,
    *,
    pred_key: str = PRED_KEY,
    genes: Sequence[str] | Literal["all"] | None = None,
    labels_key: str | None = None,
    image_key: str | None = IMAGE_KEY,
    cell_type_key: str | None = PRED_CELL_TYPE_KEY,
    overwrite: bool = False,
    band_rows: int = 2048,
) -> Path:
    """Write predicted cells as a GeoJSON file QuPath imports: nucleus outlines, cell types and chosen genes.

    Each cell of ``sdata.tables[pred_key]`` (e.g. from :func:`ghist.tl.predict`) becomes one QuPath detection:
    a ``Feature`` whose geometry is the outline of its nucleus in the labels the table annotates, with
    ``properties.objectType = "detection"``, ``classification = {"name": <cell type>, "color": [r, g, b]}`` and
    ``measurements = {<gene>: <value>}`` (QuPath 0.4+'s layout; values as in the table's ``X``, i.e. ``log1p``
    counts for ghist's predictions). Drag the file onto the image in QuPath (or *File > Import objects*).

    Coordinates are pixels of the full-resolution ``image_key`` image (QuPath's frame: origin at the top-left corner,
    x right, y down), mapped from the labels through the coordinate system both share; the image must be the one
    opened in QuPath. Outlines run between the centres of nucleus and background pixels, so reading the file back
    with :func:`ghist.io.read_nuclei` gives the same nuclei. The file is written to a temporary file and moved into
    place, so an interrupted write leaves no partial file.

    Parameters
    ----------
    sdata
        SpatialData holding the table, the labels it annotates and the image.
    path
        The GeoJSON file to write (``.geojson``).
    pred_key
        The prediction table in ``sdata.tables`` (any table of cells annotating nucleus labels will do).
    genes
        Genes written as measurements: a list, ``"all"``, or ``None`` for none (each gene adds one number per cell
        to the file).
    labels_key
        The labels the table annotates (default: the table's only region).
    image_key
        The image QuPath shows, whose full-resolution pixels the coordinates are in; ``None``: the labels' own
        pixels.
    cell_type_key
        Column of the table's ``obs`` with the cell type written as the classification (skipped when absent).
    overwrite
        Replace an existing file at ``path``.
    band_rows
        Rows of the labels read at a time.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> ghist.tl.predict(sdata, model)
    >>> ghist.io.write_qupath(sdata, "cells.geojson", genes=["ERBB2", "ESR1"])

    """
    import shapely
    from shapely.affinity import affine_transform
    from spatialdata.models import get_table_keys

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass `overwrite=True` to replace it.")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; expected a file name such as 'cells.geojson'.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Folder {str(path.parent)!r} does not exist.")
    check_int("band_rows", band_rows, 1)
    table = get_table(sdata, pred_key, "pred_key")
    if labels_key is None:
        regions = get_table_keys(table)[0] if "spatialdata_attrs" in table.uns else None
        regions = [regions] if isinstance(regions, str) else list(regions or [])
        if len(regions) != 1:
            raise ValueError(
                f"Table {pred_key!r} annotates {regions}; pass `labels_key=`, the nucleus labels to outline."
            )
        labels_key = regions[0]
    table, _, instance_key = table_of_region(sdata, pred_key, labels_key, what="cells")
    labels = get_labels(sdata, labels_key)
    if isinstance(genes, str):
        if genes != "all":
            raise ValueError(f"`genes` must be a list of genes, 'all' or None, got {genes!r}.")
        genes = list(table.var_names)
    genes = check_genes(table.var_names, genes, where=f"table {pred_key!r}") if genes else []
    if cell_type_key is not None and cell_type_key not in table.obs:
        logger.info("Table %r has no `obs[%r]`: cells are written without a classification.", pred_key, cell_type_key)
        cell_type_key = None
    matrix, extent = np.eye(3), None
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(
                f"Image {image_key!r} not found in `sdata.images` (have {sorted(sdata.images)}); pass the image opened "
                "in QuPath as `image_key`, or `image_key=None` to write coordinates in the labels' own pixels."
            )
        matrix = element_affine(sdata, labels_key, image_key)
        image = scale0(sdata.images[image_key])
        extent = shapely.box(0, 0, image.sizes["x"], image.sizes["y"])

    ids = pd.to_numeric(table.obs[instance_key], errors="coerce").to_numpy()
    if np.isnan(ids).any():
        raise ValueError(f"`obs[{instance_key!r}]` of table {pred_key!r} must hold the labels' integer ids.")
    ids = ids.astype(np.int64)
    values = dense(table[:, genes].X) if genes else np.zeros((table.n_obs, 0))
    types = table.obs[cell_type_key].astype(str).to_numpy() if cell_type_key else None
    colours = _class_colours(table, cell_type_key, sorted(set(types))) if types is not None else {}

    boxes = _bounding_boxes(labels.data, band_rows)
    data = labels.data
    affine = [matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]]
    features: dict[int, dict] = {}
    missing = 0
    order = np.argsort([boxes.get(int(i), [np.inf])[0] for i in ids], kind="stable")
    window, window_y = None, (0, 0)
    for row in order:  # cells by top row: one window of labels serves the cells of a band
        oid = int(ids[row])
        box = boxes.get(oid)
        if box is None:
            missing += 1
            continue
        y0, y1, x0, x1 = box
        if window is None or y0 < window_y[0] or y1 > window_y[1]:
            window_y = (y0, min(max(y1, y0 + band_rows), labels.shape[0]))
            window = np.asarray(data[window_y[0] : window_y[1]])
        outline = _outline(window[y0 - window_y[0] : y1 - window_y[0], x0:x1] == oid, y0, x0)
        if outline is None:
            missing += 1
            continue
        outline = affine_transform(outline, affine)
        if extent is not None:  # QuPath keeps objects inside the image: a nucleus beyond its edge is cut there
            outline = outline.intersection(extent)
        geometry = _geojson_geometry(outline)
        if geometry is None:
            missing += 1
            continue
        properties: dict[str, Any] = {"objectType": "detection", "name": str(table.obs[instance_key].iloc[row])}
        if types is not None:
            properties["classification"] = {"name": types[row], "color": colours[types[row]]}
        if genes:
            # JSON has no NaN: a gene without a value is left out, which QuPath shows as NaN
            properties["measurements"] = {
                g: float(v) for g, v in zip(genes, values[row], strict=True) if np.isfinite(v)
            }
        features[int(row)] = {
            "type": "Feature",
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{labels_key}:{oid}")),
            "geometry": geometry,
            "properties": properties,
        }
    if missing:
        logger.warning(
            "%d cells of table %r have no pixels in labels %r and were not written.", missing, pred_key, labels_key
        )
    features = [features[row] for row in sorted(features)]  # the table's order
    _write_atomically(path, {"type": "FeatureCollection", "features": features})
    logger.info(
        "Wrote %d cells of table %r to %s (%d genes as measurements).", len(features), pred_key, path, len(genes)
    )
    return path
