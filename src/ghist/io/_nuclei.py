"""`ghist.io.read_nuclei`: nucleus polygons made by other tools as labels (and shapes) on an image's pixel grid."""

from __future__ import annotations

import copy
import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import IMAGE_KEY, LABELS_KEY, MICRONS_CS
from .._spatial import check_pixel_size, element_transformations
from .._validation import check_int, require_key, scale0
from .._write import check_writable, write_element

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

FORMATS = ("auto", "qupath", "geojson", "cellvit", "hovernet", "xenium", "geoparquet")
QUPATH_NUCLEUS_TYPES = ("detection", "cell")  # QuPath object types read by default (annotations are regions)
NUCLEUS_COLUMNS = ("source_id", "name")  # columns of the shapes written with ``key_added_shapes``
_POLYGONAL = ("Polygon", "MultiPolygon")
_EDGE_TOLERANCE_PX = 1.0  # vertices up to this far outside the image are rounding, not a wrong frame


class Nuclei:
    """Nucleus geometries read from a file: one shapely (Multi)Polygon per nucleus, its id there and its class."""

    def __init__(self, geometries: np.ndarray, source_ids: list[Any], names: list[str | None], units: str):
        self.geometries = geometries
        self.table = pd.DataFrame({"source_id": [str(i) for i in source_ids], "name": names})
        self.units = units


# ---------------------------------------------------------------------------------------------------------- readers
def _load_json(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise ValueError(f"Nuclei file {str(path)!r} is empty; expected GeoJSON or JSON polygons.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Nuclei file {str(path)!r} is not valid JSON ({err}).") from None


def _class_name(properties: dict) -> str | None:
    classification = properties.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    if isinstance(classification, str):
        return classification
    return None


def _features(data: Any, path: Path) -> list[dict]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) and f.get("type") == "Feature" for f in data):
        raise ValueError(
            f"Nuclei file {str(path)!r} is not GeoJSON features: expected a FeatureCollection or a list of Features "
            "(QuPath's export), HoVer-Net's JSON (`nuc`) or CellViT's JSON (`cells`)."
        )
    return data


def _read_geojson(
    data: Any, path: Path, *, object_types: tuple[str, ...] | None, split_multipolygons: bool
) -> tuple[list[dict], list[Any], list[str | None]]:
    """GeoJSON geometries (dicts), ids and class names of the nucleus features."""
    features = _features(data, path)
    geoms, ids, names = [], [], []
    skipped: dict[str, int] = {}
    cells_without_nucleus = 0
    for i, feature in enumerate(features):
        properties = feature.get("properties") or {}
        kind = properties.get("objectType")
        if object_types is not None and kind is not None and kind not in object_types:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        geometry = feature.get("geometry")
        if kind == "cell":  # QuPath cells carry the nucleus beside the cell boundary
            nucleus = feature.get("nucleusGeometry") or properties.get("nucleusGeometry")
            if nucleus is not None:
                geometry = nucleus
            else:
                cells_without_nucleus += 1
        fid = feature.get("id", properties.get("id", i))
        name = _class_name(properties)
        if split_multipolygons and isinstance(geometry, dict) and geometry.get("type") == "MultiPolygon":
            # CellViT groups every cell of one type into a MultiPolygon: one part per nucleus
            for j, part in enumerate(geometry.get("coordinates", [])):
                geoms.append({"type": "Polygon", "coordinates": part})
                ids.append(f"{fid}:{j}")
                names.append(name)
            continue
        geoms.append(geometry)
        ids.append(fid)
        names.append(name)
    if skipped:
        logger.info("Skipped %s features of %s (not nuclei: `object_types=%s`).", skipped, path.name, object_types)
    if cells_without_nucleus:
        logger.warning(
            "%d QuPath cells of %s have no nucleusGeometry: their cell boundary is read instead.",
            cells_without_nucleus,
            path.name,
        )
    kinds = pd.Series([g.get("type") if isinstance(g, dict) else type(g).__name__ for g in geoms], dtype=object)
    bad = kinds[~kinds.isin(_POLYGONAL)]
    if len(bad):
        raise ValueError(
            f"Nuclei file {str(path)!r} holds {len(bad)} geometries that are not polygons "
            f"({bad.value_counts().to_dict()}); nuclei must be Polygon or MultiPolygon outlines (CellViT's "
            "`cell_detection.geojson` holds centroids only: read its `cells.json` or `cells.geojson`)."
        )
    if len(kinds) > 20 and (kinds == "MultiPolygon").mean() > 0.5 and not split_multipolygons:
        logger.warning(
            "Most features of %s are MultiPolygons, each read as one nucleus; if each part is a nucleus (CellViT's "
            "`cells.geojson`), pass `format='cellvit'`.",
            path.name,
        )
    return geoms, ids, names


def _read_contours(records: list[tuple[Any, Any, Any]], path: Path) -> tuple[list[dict], list[Any], list[Any]]:
    """(id, contour [[x, y], ...], type) records as GeoJSON polygons."""
    geoms, ids, names = [], [], []
    for rid, contour, kind in records:
        contour = np.asarray(contour, dtype=np.float64)
        if contour.ndim != 2 or contour.shape[1] != 2 or len(contour) < 3:
            raise ValueError(
                f"Nucleus {rid!r} of {str(path)!r} has a contour of shape {contour.shape}; expected at least 3 "
                "[x, y] points (a polygon)."
            )
        geoms.append({"type": "Polygon", "coordinates": [contour.tolist()]})
        ids.append(rid)
        names.append(None if kind is None else str(kind))
    return geoms, ids, names


def _type_names(type_map: Any) -> dict[str, str]:
    if isinstance(type_map, dict):
        return {str(k): str(v) for k, v in type_map.items()}
    return {}


def _read_json_file(
    path: Path, fmt: str, object_types: tuple[str, ...] | None
) -> tuple[str, list[dict], list[Any], list[Any]]:
    data = _load_json(path)
    if fmt == "auto":
        if isinstance(data, dict) and isinstance(data.get("nuc"), dict):
            fmt = "hovernet"
        elif isinstance(data, dict) and isinstance(data.get("cells"), list):
            fmt = "cellvit"
        else:
            fmt = "geojson"
    if fmt == "hovernet":
        if not isinstance(data, dict) or not isinstance(data.get("nuc"), dict):
            raise ValueError(f"{str(path)!r} is not HoVer-Net JSON: expected {{'nuc': {{id: {{'contour': ...}}}}}}.")
        records = [(k, v.get("contour"), v.get("type")) for k, v in data["nuc"].items()]
        return fmt, *_read_contours(records, path)
    if fmt == "cellvit" and isinstance(data, dict) and isinstance(data.get("cells"), list):
        names = _type_names(data.get("type_map") or data.get("nuclei_types"))
        records = []
        for i, cell in enumerate(data["cells"]):
            kind = cell.get("type")
            records.append((cell.get("id", i), cell.get("contour"), names.get(str(kind), kind)))
        return fmt, *_read_contours(records, path)
    cellvit = fmt == "cellvit"  # CellViT marks its per-type MultiPolygons as annotations: every feature is read
    geoms, ids, names = _read_geojson(
        data, path, object_types=None if cellvit else object_types, split_multipolygons=cellvit
    )
    return fmt, geoms, ids, names


def _from_geojson(geoms: list[dict]) -> np.ndarray:
    """GeoJSON (Multi)Polygons as shapely geometries, built in a few vectorised calls rather than one by one."""
    import shapely

    coords: list = []
    ring_length, ring_part, part_geometry = [], [], []
    for g, geometry in enumerate(geoms):
        polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        for polygon in polygons:
            for ring in polygon:
                coords.extend(ring)
                ring_length.append(len(ring))
                ring_part.append(len(part_geometry))
            part_geometry.append(g)
    xy = np.asarray(coords, dtype=np.float64)  # ragged (3D) coordinates raise here: the slow path handles them
    rings = shapely.linearrings(xy, indices=np.repeat(np.arange(len(ring_length)), ring_length))
    parts = shapely.polygons(rings, indices=np.asarray(ring_part))  # per part: the shell, then its holes
    part_geometry = np.asarray(part_geometry)
    if len(parts) != len(part_geometry):
        raise ValueError("a polygon without rings")
    n_parts = np.bincount(part_geometry, minlength=len(geoms))
    if (n_parts == 1).all():
        return parts
    out = np.empty(len(geoms), dtype=object)
    single = n_parts[part_geometry] == 1
    out[part_geometry[single]] = parts[single]
    multi = ~single
    if multi.any():
        owners, index = np.unique(part_geometry[multi], return_inverse=True)
        out[owners] = shapely.multipolygons(parts[multi], indices=index)
    if (n_parts == 0).any():
        raise ValueError("a MultiPolygon without polygons")
    return out


def _read_xenium(path: Path) -> tuple[np.ndarray, list[Any]]:
    import shapely

    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = {"cell_id", "vertex_x", "vertex_y"} - set(table.columns)
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks the columns {sorted(missing)} of Xenium boundaries (cell_id, vertex_x, vertex_y)."
        )
    codes, cells = pd.factorize(table["cell_id"], sort=False)
    coords = table[["vertex_x", "vertex_y"]].to_numpy(dtype=np.float64)
    counts = np.bincount(codes, minlength=len(cells))
    if (counts < 3).any():
        raise ValueError(f"{int((counts < 3).sum())} cells of {str(path)!r} have fewer than 3 vertices.")
    order = np.argsort(codes, kind="stable")  # rows of one cell may be interleaved with others': gather them
    rings = shapely.linearrings(coords[order], indices=codes[order])
    return shapely.polygons(rings), list(cells)


def _read_geoparquet(path: Path) -> tuple[np.ndarray, list[Any], list[Any]]:
    import geopandas as gpd

    frame = gpd.read_parquet(path)
    names = frame["name"].tolist() if "name" in frame.columns else [None] * len(frame)
    return frame.geometry.to_numpy(), list(frame.index), names


def _detect_table_format(path: Path) -> str:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if {"vertex_x", "vertex_y"} <= set(schema.names):
            return "xenium"
        if schema.metadata and b"geo" in schema.metadata:
            return "geoparquet"
        raise ValueError(
            f"Cannot tell the format of {str(path)!r}: a Parquet file of neither Xenium boundaries (cell_id, "
            f"vertex_x, vertex_y) nor a GeoDataFrame (columns {schema.names}); pass `format=`, one of {FORMATS[1:]}."
        )
    return "xenium"  # nucleus_boundaries.csv(.gz)


def read_nuclei_file(
    path: str | os.PathLike, *, format: str = "auto", object_types: tuple[str, ...] | None = QUPATH_NUCLEUS_TYPES
) -> Nuclei:
    """Nucleus polygons of a file in its own coordinates (see :func:`read_nuclei` for the formats)."""
    import shapely

    if format not in FORMATS:
        raise ValueError(f"Unknown nuclei `format={format!r}`; expected one of {FORMATS}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Nuclei file {str(path)!r} does not exist.")
    if path.stat().st_size == 0:
        raise ValueError(f"Nuclei file {str(path)!r} is empty.")
    suffixes = "".join(path.suffixes).lower()
    is_table = path.suffix.lower() == ".parquet" or suffixes.endswith((".csv", ".csv.gz"))
    fmt = format
    if fmt == "auto" and not is_table and not suffixes.endswith((".json", ".geojson")):
        raise ValueError(
            f"Cannot tell the format of {str(path)!r} from its suffix; expected .geojson/.json (QuPath, CellViT, "
            f"HoVer-Net), .parquet or .csv(.gz) (Xenium, GeoParquet), or pass `format=`, one of {FORMATS[1:]}."
        )
    if fmt == "auto" and is_table:
        fmt = _detect_table_format(path)
    if fmt == "xenium":
        geometries, ids = _read_xenium(path)
        names: list[Any] = [None] * len(ids)
    elif fmt == "geoparquet":
        geometries, ids, names = _read_geoparquet(path)
    else:
        fmt, geoms, ids, names = _read_json_file(path, fmt, object_types)
        try:
            geometries = _from_geojson(geoms)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, shapely.errors.GEOSException):
            try:  # one geometry at a time: slower, and names what is wrong
                geometries = np.array([shapely.geometry.shape(g) for g in geoms], dtype=object)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
                raise ValueError(f"Nuclei file {str(path)!r} holds a malformed polygon ({err}).") from None
    geometries = np.asarray(geometries, dtype=object)
    kinds = shapely.get_type_id(geometries)
    polygonal = np.isin(kinds, (3, 6))  # Polygon, MultiPolygon
    if not polygonal.all():
        raise ValueError(
            f"Nuclei file {str(path)!r} holds {int((~polygonal).sum())} geometries that are not polygons; nuclei "
            "must be Polygon or MultiPolygon outlines."
        )
    if len(geometries) == 0:
        raise ValueError(f"Nuclei file {str(path)!r} holds no nuclei (format {fmt!r}).")
    return Nuclei(geometries, ids, names, "microns" if fmt == "xenium" else "pixels")


# ------------------------------------------------------------------------------------------------------ rasterising
def _edges(geometries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ring edge of the geometries as ``(x0, y0, x1, y1)`` rows and the 1-based nucleus id it belongs to."""
    import shapely

    parts, part_of = shapely.get_parts(geometries, return_index=True)
    rings, ring_of = shapely.get_rings(parts, return_index=True)
    coords, vertex_of = shapely.get_coordinates(rings, return_index=True)
    same_ring = vertex_of[1:] == vertex_of[:-1]  # rings are closed: consecutive vertices of one ring are its edges
    starts = np.flatnonzero(same_ring)
    edges = np.column_stack([coords[starts], coords[starts + 1]])
    ids = part_of[ring_of[vertex_of[starts]]] + 1
    keep = edges[:, 1] != edges[:, 3]  # horizontal edges cross no row centre
    return edges[keep], ids[keep].astype(np.int64)


def _fill_band(edges: np.ndarray, ids: np.ndarray, y0: int, y1: int, width: int) -> np.ndarray:
    """Labels of rows ``y0:y1``: a pixel takes the nucleus whose outline holds its centre (even-odd rule).

    Every edge crossing a row centre gives one crossing; a nucleus's crossings on a row, sorted by x, pair into runs of
    pixels. Vertices lie on no row centre twice because an edge covers ``[y_min, y_max)``.
    """
    band = np.zeros((y1 - y0, width), dtype=np.int32)
    if not len(edges):
        return band
    ex0, ey0, ex1, ey1 = edges.T
    ylo, yhi = np.minimum(ey0, ey1), np.maximum(ey0, ey1)
    first = np.maximum(np.ceil(ylo - 0.5), y0).astype(np.int64)  # first row whose centre is >= ylo
    last = np.minimum(np.ceil(yhi - 0.5) - 1, y1 - 1).astype(np.int64)  # last row whose centre is < yhi
    n = np.maximum(last - first + 1, 0)
    if not n.any():
        return band
    edge = np.repeat(np.arange(len(edges)), n)
    row = first[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n))
    yc = row + 0.5
    x = ex0[edge] + (yc - ey0[edge]) * (ex1[edge] - ex0[edge]) / (ey1[edge] - ey0[edge])
    nid = ids[edge]
    order = np.lexsort((x, row, nid))
    x, row, nid = x[order], row[order], nid[order]
    # each (nucleus, row) has an even number of crossings: consecutive pairs bound the runs inside
    xs, xe, row, nid = x[0::2], x[1::2], row[0::2], nid[0::2]
    c0 = np.maximum(np.ceil(xs - 0.5), 0).astype(np.int64)
    c1 = np.minimum(np.ceil(xe - 0.5) - 1, width - 1).astype(np.int64)
    length = np.maximum(c1 - c0 + 1, 0)
    run = np.repeat(np.arange(length.size), length)
    col = c0[run] + (np.arange(run.size) - np.repeat(np.cumsum(length) - length, length))
    band[row[run] - y0, col] = nid[run]  # runs are in nucleus order: where nuclei overlap, the later one wins
    return band


def rasterise(geometries: np.ndarray, height: int, width: int, *, band_rows: int = 1024) -> Any:
    """Polygons (pixel coordinates) as int32 labels ``1..n`` in a compressed in-memory Zarr array, band by band."""
    import zarr

    out = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=(height, width),
        chunks=(min(band_rows, height), min(4096, width)),
        dtype="int32",
        fill_value=0,
    )
    edges, ids = _edges(geometries)
    order = np.argsort(np.minimum(edges[:, 1], edges[:, 3]), kind="stable")
    edges, ids = edges[order], ids[order]
    ylo = np.minimum(edges[:, 1], edges[:, 3])
    yhi = np.maximum(edges[:, 1], edges[:, 3])
    for y0 in range(0, height, band_rows):
        y1 = min(y0 + band_rows, height)
        stop = np.searchsorted(ylo, y1, side="left")
        sel = np.flatnonzero(yhi[:stop] > y0)
        out[y0:y1] = _fill_band(edges[sel], ids[sel], y0, y1, width)
    return out


# ------------------------------------------------------------------------------------------------------ public API
def _to_pixels(nuclei: Nuclei, sdata: SpatialData, image_key: str, units: str, pixel_size: float | None) -> np.ndarray:
    """The geometries in the image's full-resolution pixels."""
    import shapely

    if units == "pixels":
        return nuclei.geometries
    if pixel_size is not None:
        matrix = np.diag([1 / pixel_size, 1 / pixel_size, 1.0])
    else:
        to_microns = element_transformations(sdata.images[image_key]).get(MICRONS_CS)
        if to_microns is None:
            raise ValueError(
                f"The nuclei are in microns but image {image_key!r} has no {MICRONS_CS!r} coordinate system; pass "
                "`pixel_size=` (µm per pixel of the full-resolution image)."
            )
        matrix = np.linalg.inv(to_microns)
    return shapely.transform(nuclei.geometries, lambda xy: xy @ matrix[:2, :2].T + matrix[:2, 2])


def _check_inside(geometries: np.ndarray, height: int, width: int, path: Path, image_key: str, units: str) -> None:
    """Refuse nuclei lying wholly outside the image (a wrong frame or unit); those crossing its edge are cut there."""
    import shapely

    bounds = shapely.bounds(geometries)
    tol = _EDGE_TOLERANCE_PX
    outside = (
        (bounds[:, 2] <= -tol) | (bounds[:, 3] <= -tol) | (bounds[:, 0] >= width + tol) | (bounds[:, 1] >= height + tol)
    )
    if outside.any():
        lo, hi = np.nanmin(bounds[:, :2], axis=0), np.nanmax(bounds[:, 2:], axis=0)
        raise ValueError(
            f"{int(outside.sum())} of {len(geometries)} nuclei of {str(path)!r} lie outside image {image_key!r} "
            f"({width} x {height} px): the nuclei span x {lo[0]:.6g}..{hi[0]:.6g}, y {lo[1]:.6g}..{hi[1]:.6g} px "
            f"(read as {units}). Expected coordinates in the image's full-resolution pixels (QuPath, CellViT, "
            "HoVer-Net) or microns with `units='microns'` (and `pixel_size=`), of this image."
        )
    crossing = (
        (bounds[:, 0] < -tol) | (bounds[:, 1] < -tol) | (bounds[:, 2] > width + tol) | (bounds[:, 3] > height + tol)
    )
    if crossing.any():
        logger.info(
            "%d nuclei of %s cross the edge of image %r and are cut there.", int(crossing.sum()), path.name, image_key
        )


def read_nuclei(
    path: str | os.PathLike,
    sdata: SpatialData,
    *,
    image_key: str = IMAGE_KEY,
    key_added: str = LABELS_KEY,
    format: Literal["auto", "qupath", "geojson", "cellvit", "hovernet", "xenium", "geoparquet"] = "auto",
    units: Literal["pixels", "microns"] | None = None,
    pixel_size: float | None = None,
    object_types: tuple[str, ...] | None = QUPATH_NUCLEUS_TYPES,
    key_added_shapes: str | None = None,
    overwrite: bool = False,
    band_rows: int = 1024,
) -> Any:
    """Read nucleus outlines made by another tool into labels on the pixel grid of an image.

    Each nucleus polygon becomes one instance id (``1..n`` in file order) of ``sdata.labels[key_added]``, a labels
    element of the size of the image's full-resolution level with the image's transformations, so ghist's
    functions (:func:`ghist.tl.predict`, :func:`ghist.pp.make_tiles`, :func:`ghist.tl.evaluate_segmentation`) use
    it as they would nuclei from :func:`ghist.pp.segment_nuclei`. A pixel belongs to a nucleus when its centre lies
    inside the outline (holes excluded); where outlines overlap, the later nucleus of the file wins. Polygons are
    filled row band by row band, vectorised over all nuclei, so 100k nuclei take seconds.

    Formats (``format="auto"`` tells them apart by suffix and content):

    - ``"qupath"`` / ``"geojson"``: GeoJSON, a ``FeatureCollection`` or a plain list of ``Feature`` s, as QuPath's
      *Export as GeoJSON* writes it. Features whose ``properties.objectType`` is not in ``object_types`` are skipped
      (annotations are regions, not nuclei); a ``"cell"`` gives its ``nucleusGeometry`` when it has one, else its
      cell outline (with a warning). Polygon and MultiPolygon (one nucleus each); holes are kept.
      ``classification.name`` becomes the nucleus's ``name``.
    - ``"cellvit"``: CellViT's ``cells.json`` (``{"cells": [{"contour": [[x, y], ...], "type": ...}, ...]}``, type
      names from its ``type_map``) or its ``cells.geojson``, whose features group every nucleus of a type into one
      MultiPolygon: each part is read as a nucleus.
    - ``"hovernet"``: HoVer-Net's JSON, ``{"nuc": {"<id>": {"contour": [[x, y], ...], "type": ...}}}``.
    - ``"xenium"``: Xenium ``nucleus_boundaries.parquet`` (or ``.csv.gz``): vertices ``vertex_x``, ``vertex_y``
      per ``cell_id``, in microns.
    - ``"geoparquet"``: a GeoDataFrame written with ``to_parquet`` (e.g. sopa's boundaries), in pixels.

    Coordinates are the image's full-resolution pixels (origin at the top-left corner of the image, x to the right,
    y down: QuPath's, CellViT's and HoVer-Net's convention when run on this image), except for Xenium, whose
    coordinates are microns. Microns are turned into pixels with ``pixel_size`` when given, else through the
    image's ``"microns"`` coordinate system (which must then describe the same frame as the file, e.g. an H&E
    registered to the Xenium morphology image).

    Parameters
    ----------
    path
        The file of nucleus outlines.
    sdata
        SpatialData holding the image the nuclei were drawn on; the labels (and shapes) are added to it.
    image_key
        Key of that image in ``sdata.images``.
    key_added
        Key of the new labels in ``sdata.labels``.
    format
        One of ``"auto"``, ``"qupath"``, ``"geojson"``, ``"cellvit"``, ``"hovernet"``, ``"xenium"``,
        ``"geoparquet"``.
    units
        ``"pixels"`` or ``"microns"``; default: microns for Xenium, pixels otherwise.
    pixel_size
        µm per pixel of the image's full-resolution level, for coordinates in microns.
    object_types
        QuPath object types read as nuclei (``None``: every feature).
    key_added_shapes
        Also write the outlines, in the image's pixels, to ``sdata.shapes[key_added_shapes]``: index = the labels'
        ids, columns ``source_id`` (the nucleus's id in the file) and ``name`` (its class, if the file has one).
    overwrite
        Replace existing elements of the same keys.
    band_rows
        Rows filled at a time (memory grows with ``band_rows`` x image width, not with the image).

    Returns
    -------
    The labels added as ``sdata.labels[key_added]`` (int32, 0 = background); with ``key_added_shapes``, a SpatialData
    of both elements added (the shapes are ``sdata.shapes[key_added_shapes]``). When ``sdata`` is backed by a zarr
    store, they are written to it too, all or nothing.

    Examples
    --------
    >>> sdata = ghist.datasets.synthetic(image_size=256, seed=0)
    >>> ghist.io.read_nuclei("qupath_export.geojson", sdata, key_added="qupath_nuclei")

    """
    import dask.array as da
    import geopandas as gpd
    from spatialdata.models import Labels2DModel, ShapesModel
    from spatialdata.transformations import get_transformation

    if units not in (None, "pixels", "microns"):
        raise ValueError(f"`units` must be 'pixels', 'microns' or None, got {units!r}.")
    pixel_size = check_pixel_size(pixel_size, optional=True)
    check_int("band_rows", band_rows, 1)
    if object_types is not None:
        object_types = (object_types,) if isinstance(object_types, str) else tuple(object_types)
    image = scale0(require_key(sdata, "images", image_key))
    check_writable(sdata, key_added, "labels", overwrite=overwrite)
    if key_added_shapes is not None:
        check_writable(sdata, key_added_shapes, "shapes", overwrite=overwrite, arg="key_added_shapes")
        if key_added_shapes == key_added:
            raise ValueError(
                f"`key_added_shapes` and `key_added` are both {key_added!r}; element names must be unique."
            )
    height, width = image.sizes["y"], image.sizes["x"]

    nuclei = read_nuclei_file(path, format=format, object_types=object_types)
    units = units or nuclei.units
    geometries = _to_pixels(nuclei, sdata, image_key, units, pixel_size)
    _check_inside(geometries, height, width, Path(path), image_key, units)

    store = rasterise(geometries, height, width, band_rows=band_rows)
    transformations = copy.deepcopy(get_transformation(sdata.images[image_key], get_all=True))
    labels = Labels2DModel.parse(
        da.from_array(store, chunks=store.chunks, name=f"ghist-read-nuclei-{uuid.uuid4().hex}", inline_array=True),
        dims=("y", "x"),
        transformations=transformations,
    )
    labels = write_element(sdata, key_added, labels, overwrite=overwrite)
    shapes = None
    if key_added_shapes is not None:
        table = nuclei.table.copy()
        table.index = pd.RangeIndex(1, len(geometries) + 1)  # the labels' ids
        frame = gpd.GeoDataFrame(table, geometry=list(geometries))
        shapes = ShapesModel.parse(frame, transformations=copy.deepcopy(transformations))
        shapes = write_element(sdata, key_added_shapes, shapes, overwrite=overwrite, arg="key_added_shapes")
    logger.info(
        "Read %d nuclei of %s into `sdata.labels[%r]`%s.",
        len(geometries),
        Path(path).name,
        key_added,
        f" and `sdata.shapes[{key_added_shapes!r}]`" if key_added_shapes else "",
    )
    if shapes is None:
        return labels
    from spatialdata import SpatialData

    return SpatialData(labels={key_added: labels}, shapes={key_added_shapes: shapes})
