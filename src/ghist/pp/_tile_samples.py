"""Inputs of :func:`ghist.pp.make_tiles`: argument checks, and each sample validated and prepared before any cutting.

Every check runs before the first tile is cut, and the problems of all samples are reported together, so a long
run never fails half-way on a bad input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._spatial import check_extents, element_affine, image_pixel_size
from .._validation import (
    ValidationError,
    _preview,
    check_cell_types,
    check_genes,
    check_instances,
    check_int,
    check_memory,
    check_number,
    check_unique_genes,
    get_counts,
    get_image,
    get_labels,
    layer_names,
    table_of_region,
)
from .._write import check_writable
from ._tile_spots import SpotData, cells_in_spots, nucleus_centroids, prepare_spots, spot_footprint, spot_targets
from ._xenium import check_not_raw_xenium

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------
def _check_tile_size(tile_size: int) -> int:
    check_int("tile_size", tile_size, 8)
    return int(tile_size)


def _check_tile_memory(samples: list[_Sample], tile_size: int, tiling: str) -> None:
    """Refuse a ``tile_size`` (or a ``pixel_size`` grid) whose buffers cannot fit in memory, before cutting.

    The writer holds up to a batch of padded tiles (RGB ``uint8`` and ``int32`` labels: 7 bytes per pixel) twice (the
    tiles and their stacked copy), and the cutter reads one strip of a tile row across the widest sample's grid
    (image, labels and the labels' resampling coordinates).
    """
    from ._tile_store import _WRITE_BATCH

    n_tiles = sum(math.ceil(s.height / tile_size) * math.ceil(s.width / tile_size) for s in samples)
    n_buffered = _WRITE_BATCH if tiling == "spots" else min(_WRITE_BATCH, n_tiles)
    tiles = 2.0 * n_buffered * 7 * float(tile_size) ** 2
    strip = float(tile_size) * max(s.width for s in samples) * (7 + 16)
    check_memory(
        tiles + strip,
        f"Cutting tiles of tile_size={tile_size} px (grids up to {max(s.width for s in samples)} px wide)",
        hint="pass a smaller `tile_size` (or a coarser `pixel_size`).",
    )


def _check_spot_args(
    spots_key: str | None,
    cell_type_key: str | None,
    tiling: str,
    spot_coverage: float,
    spot_target_sum: float | None,
    spot_scaling: str,
) -> None:
    if tiling not in ("grid", "spots"):
        raise ValueError(f"`tiling` must be 'grid' or 'spots'; got {tiling!r}.")
    if spot_scaling not in ("spot", "sample"):
        raise ValueError(f"`spot_scaling` must be 'spot' or 'sample'; got {spot_scaling!r}.")
    # checked with or without spots: a bad value is a mistake either way
    if isinstance(spot_coverage, bool) or not isinstance(spot_coverage, int | float) or not 0 < spot_coverage <= 1:
        raise ValueError(f"`spot_coverage` must be a fraction in (0, 1]; got {spot_coverage!r}.")
    check_number("spot_target_sum", spot_target_sum, optional=True)
    if spots_key is None:
        if tiling == "spots":
            raise ValueError("`tiling='spots'` centres tiles on spots; pass `spots_key` (the spot circles) too.")
        return
    if cell_type_key is not None:
        raise ValueError(
            f"`cell_type_key={cell_type_key!r}` was given with `spots_key={spots_key!r}`; spot-level tiles carry no "
            "cell types (the table annotates spots, not cells). Pass `cell_type_key=None`."
        )


# --------------------------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Sample:
    name: str
    sdata: SpatialData
    image: Any  # DataArray (c, y, x)
    labels: Any  # DataArray (y, x)
    matrix: np.ndarray  # image px -> label px
    table: Any  # AnnData rows annotating the labels
    table_ids: np.ndarray  # int64
    counts: Any  # X or layer of `table` (all genes)
    types: pd.Categorical | None
    pixel_size: float | None
    height: int
    width: int
    spots: SpotData | None = None
    spot_expr: np.ndarray | None = None  # (S, G) targets of the chosen genes
    spot_factor: np.ndarray | None = None  # (S,) factor applied to each spot's counts
    cell_spot: pd.Series | None = None  # nucleus id -> spot row (-1: in no spot), over the whole labels
    scale: float = 1.0  # working-grid pixels per image pixel (``pixel_size=``); height/width/matrix are the grid's
    levels: list[tuple[float, float, Any]] | None = None  # the image's pyramid (chunk-cached), when scale != 1


def _at_pixel_size(sample: _Sample, pixel_size: float, image_key: str) -> None:
    """Put a sample on the grid of ``pixel_size`` µm per pixel: tiles are then cut from that grid.

    The image is read from the nearest pyramid level that is not coarser and area-averaged
    (:func:`ghist._spatial.read_image_window`, as :func:`ghist.tl.predict` reads slides); labels are resampled by
    nearest neighbour through the composed affine, so cells keep their ids.
    """
    if sample.pixel_size is None:
        raise ValueError(
            f"Sample {sample.name!r}: image {image_key!r} has no 'microns' coordinate system, so it cannot be cut at "
            f"pixel_size={pixel_size:g} µm/px; give it one (e.g. `set_transformation(image, Scale([p, p], "
            "axes=('y', 'x')), 'microns')`) or pass `pixel_size=None`."
        )
    from .._spatial import working_scale

    scale = working_scale(sample.pixel_size, pixel_size)
    if scale == 1.0:  # as predict: no resampling for a few percent
        return
    from .._chunk_cache import chunk_cached
    from .._validation import raster_levels

    # tile by tile along the rows: through caches of decoded chunks (a chunk decoded once per row of tiles at most)
    levels = [(dy, dx, chunk_cached(level)) for dy, dx, level in raster_levels(sample.sdata.images[image_key])]
    to_image = np.diag([1 / scale, 1 / scale, 1.0])  # working (x, y, 1) -> image (x, y, 1)
    sample.levels = levels
    sample.scale = scale
    sample.height = max(1, round(sample.height * scale))
    sample.width = max(1, round(sample.width * scale))
    sample.matrix = sample.matrix @ to_image
    if sample.spots is not None:
        sample.spots.image_to_spots = sample.spots.image_to_spots @ to_image
    logger.info(
        "Sample %r: cutting at %.4g µm/px (image at %.4g µm/px, %.4g working pixels per image pixel, %d x %d px "
        "on that grid)",
        sample.name,
        pixel_size,
        sample.pixel_size,
        scale,
        sample.width,
        sample.height,
    )
    sample.pixel_size = float(pixel_size)


def _kind(value: Any) -> str:
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _as_samples(sdata_or_list: Any) -> list[tuple[str, SpatialData]]:
    if isinstance(sdata_or_list, SpatialData):
        return [("0", sdata_or_list)]
    if isinstance(sdata_or_list, Mapping):
        items = [(str(k), v) for k, v in sdata_or_list.items()]
    elif isinstance(sdata_or_list, Sequence) and not isinstance(sdata_or_list, str):
        items = [(str(i), v) for i, v in enumerate(sdata_or_list)]
    else:
        hint = ""
        if type(sdata_or_list).__name__ == "AnnData":  # a table alone lacks the H&E and the nuclei
            hint = " (a table alone: put it in a SpatialData with the H&E image and the nucleus labels it annotates)"
        raise TypeError(
            f"`sdata` must be a SpatialData, a list of SpatialData or a dict name -> SpatialData; got "
            f"{_kind(sdata_or_list)}{hint}."
        )
    if not items:
        raise ValueError("No samples given: expected at least one SpatialData.")
    bad = [f"Sample {name!r} is {_kind(s)}" for name, s in items if not isinstance(s, SpatialData)]
    if bad:
        raise TypeError(f"{'; '.join(bad)}; expected every sample to be a `spatialdata.SpatialData`.")
    return items


def _label_ids(labels: Any) -> np.ndarray:
    data = labels.data
    if hasattr(data, "dask"):
        import dask.array as da

        return np.asarray(da.unique(data).compute())
    return np.unique(np.asarray(data))


def _check_label_ids(label_ids: np.ndarray, labels_key: str) -> None:
    if label_ids.size and (label_ids.min() < 0 or label_ids.max() > np.iinfo(np.int32).max):
        raise ValueError(
            f"Labels {labels_key!r} hold ids in [{label_ids.min()}, {label_ids.max()}]; expected ids in "
            f"[0, {np.iinfo(np.int32).max}] (0 = background)."
        )


def _sample_matrix(
    sdata: SpatialData, name: str, *, image_key: str, labels_key: str, key_added: str | None, overwrite: bool = False
) -> np.ndarray:
    """Image -> labels pixel affine of a sample, checked invertible; refuses an existing ``key_added`` too.

    ``key_added`` is looked up in memory and in the sample's backing store; replaced only with ``overwrite``.
    """
    matrix = element_affine(sdata, image_key, labels_key)
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise ValueError(f"The transformation from image {image_key!r} to labels {labels_key!r} is singular.")
    # Labels of another size under the image's own transformation would pair every nucleus with the wrong pixels
    # and only show up later as poor folds: refuse them here, where the sample can be named.
    check_extents(sdata, image_key, labels_key)
    if key_added is not None:
        check_writable(sdata, key_added, "shapes", overwrite=overwrite, where=f" of sample {name!r}")
    return matrix


def _prepare_sample(
    name: str,
    sdata: SpatialData,
    *,
    image_key: str,
    labels_key: str,
    table_key: str,
    cell_type_key: str | None,
    layer: str | None,
    key_added: str | None,
    spots_key: str | None = None,
    overwrite: bool = False,
) -> _Sample:
    if spots_key is not None:
        return _prepare_spot_sample(
            name,
            sdata,
            image_key=image_key,
            labels_key=labels_key,
            table_key=table_key,
            spots_key=spots_key,
            layer=layer,
            key_added=key_added,
            overwrite=overwrite,
        )
    check_not_raw_xenium(sdata, labels_key=labels_key, table_key=table_key, sample=name)
    image = get_image(sdata, image_key)
    labels = get_labels(sdata, labels_key)
    # first: labels of the wrong extent would also make the table's ids look missing
    matrix = _sample_matrix(
        sdata, name, image_key=image_key, labels_key=labels_key, key_added=key_added, overwrite=overwrite
    )
    table, _, instance_key = table_of_region(sdata, table_key, labels_key, what="cells")
    where = f"table {table_key!r}"
    # before genes are chosen: pandas would fail deep inside on a duplicated name
    check_unique_genes(table.var_names, where=f"Table {table_key!r}")
    if layer is not None and layer not in table.layers:
        raise KeyError(f"Layer {layer!r} not found in {where} (have {layer_names(table)}).")
    ids = table.obs[instance_key]
    if not pd.api.types.is_integer_dtype(ids.dtype):
        raise ValueError(
            f"{where.capitalize()} instance key `obs[{instance_key!r}]` has dtype {ids.dtype}; expected integer "
            f"nucleus ids of labels {labels_key!r}."
        )
    ids = ids.to_numpy().astype(np.int64)
    dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()
    if len(dup):
        raise ValueError(f"{where.capitalize()} lists nucleus ids {_preview(dup.tolist())} more than once.")
    label_ids = _label_ids(labels)
    _check_label_ids(label_ids, labels_key)
    check_instances(ids, label_ids, table_key=table_key, labels_key=labels_key)
    types = check_cell_types(table, cell_type_key, table_key=table_key)
    return _new_sample(name, sdata, image_key, image, labels, matrix, table=table, table_ids=ids, types=types)


def _new_sample(
    name: str, sdata: SpatialData, image_key: str, image: Any, labels: Any, matrix: np.ndarray, **fields: Any
) -> _Sample:
    """A sample on its image's own pixel grid (:func:`_at_pixel_size` may move it to another)."""
    return _Sample(
        name=name,
        sdata=sdata,
        image=image,
        labels=labels,
        matrix=matrix,
        counts=None,
        pixel_size=image_pixel_size(sdata, image_key),
        height=int(image.sizes["y"]),
        width=int(image.sizes["x"]),
        **fields,
    )


def _prepare_spot_sample(
    name: str,
    sdata: SpatialData,
    *,
    image_key: str,
    labels_key: str,
    table_key: str,
    spots_key: str,
    layer: str | None,
    key_added: str | None,
    overwrite: bool = False,
) -> _Sample:
    """A sample supervised by spots: the table annotates the spot circles, no cell is measured."""
    image = get_image(sdata, image_key)
    labels = get_labels(sdata, labels_key)
    matrix = _sample_matrix(
        sdata, name, image_key=image_key, labels_key=labels_key, key_added=key_added, overwrite=overwrite
    )
    spots = prepare_spots(
        sdata, spots_key=spots_key, table_key=table_key, image_key=image_key, labels_key=labels_key, layer=layer
    )
    label_ids = _label_ids(labels)
    _check_label_ids(label_ids, labels_key)
    no_cell = np.zeros(0, dtype=np.int64)  # spots are measured, cells are not
    return _new_sample(
        name, sdata, image_key, image, labels, matrix, table=spots.table, table_ids=no_cell, types=None, spots=spots
    )


def _assign_spots(sample: _Sample) -> dict[str, Any]:
    """Give every nucleus of the sample the spot holding its centroid; return a summary (see :func:`_report`)."""
    ids, xy = nucleus_centroids(sample.labels)
    spot = cells_in_spots(xy, sample.spots)
    sample.cell_spot = pd.Series(spot, index=ids)
    n_cells = _spot_n_cells(sample)
    return {
        "n_spots": len(n_cells),
        "n_spots_with_cells": int((n_cells > 0).sum()),
        "median_cells": float(np.median(n_cells[n_cells > 0])) if (n_cells > 0).any() else 0.0,
        "n_cells_in_spots": int(n_cells.sum()),
        "kind": sample.spots.geometry.kind,
        **spot_footprint(xy, sample.spots),
    }


def _spot_n_cells(sample: _Sample) -> np.ndarray:
    """Number of nuclei whose centroid lies in each spot of the sample (over the whole labels)."""
    spot = sample.cell_spot.to_numpy()
    return np.bincount(spot[spot >= 0], minlength=len(sample.spots.names)).astype(np.int64)


def _raise_collected(errors: list[tuple[str, Exception]], named: bool) -> None:
    """Raise the problems of the samples: one alone, prefixed with its sample when the user named the samples."""
    if not errors:
        return
    if len(errors) == 1:
        name, err = errors[0]
        if not named or isinstance(err, ValidationError) or type(err) not in (KeyError, ValueError, TypeError):
            raise err
        msg = err.args[0] if err.args else str(err)
        raise type(err)(f"Sample {name!r}: {msg}") from err
    raise ValidationError([f"sample {name!r}: {err.args[0] if err.args else err}" for name, err in errors])


def _choose_genes(samples: list[_Sample], genes: Sequence[str] | None, table_key: str) -> list[str]:
    if genes is not None:
        for s in samples:
            where = f"table {table_key!r}" if len(samples) == 1 else f"table {table_key!r} of sample {s.name!r}"
            genes = check_genes(s.table.var_names, genes, where=where)
        return list(genes)
    common = pd.Index(samples[0].table.var_names)
    for s in samples[1:]:
        common = common[common.isin(s.table.var_names)]
    if len(common) == 0:
        raise ValueError(f"The tables {table_key!r} of samples {[s.name for s in samples]} share no gene.")
    dropped = len(samples[0].table.var_names) - len(common)
    if dropped:
        logger.info(
            "Using the %d genes common to all samples (%d of the first sample's are not).", len(common), dropped
        )
    return list(common)


def _cell_type_categories(samples: list[_Sample]) -> list[str] | None:
    if samples[0].types is None:
        return None
    names: list[str] = []
    for s in samples:
        names.extend(str(c) for c in s.types.categories if str(c) not in names)
    return names


def _prepare_samples(named: list[tuple[str, SpatialData]], *, name_samples: bool, **kwargs: Any) -> list[_Sample]:
    """:func:`_prepare_sample` of every sample (``kwargs``), raising the problems of all samples together.

    ``name_samples``: the samples came as a list or dict, so a problem of one of them names it.
    """
    samples: list[_Sample] = []
    errors: list[tuple[str, Exception]] = []
    for name, sdata in named:
        try:
            samples.append(_prepare_sample(name, sdata, **kwargs))
        except (KeyError, ValueError, TypeError) as err:
            errors.append((name, err))
    _raise_collected(errors, name_samples or len(named) > 1)
    return samples


def _set_spot_targets(
    samples: list[_Sample], genes: list[str], *, target_sum: float | None, scaling: str
) -> list[dict[str, Any]]:
    """Give every nucleus its spot and every spot its target of ``genes``; return a summary per sample.

    Must run before :func:`_subset_genes`: a spot's library size counts every gene of its table.
    """
    summaries = []
    for s in samples:
        summaries.append(_assign_spots(s))
        s.spot_expr, s.spot_factor = spot_targets(s.spots, genes, target_sum, scaling=scaling, n_cells=_spot_n_cells(s))
    return summaries


def _subset_genes(samples: list[_Sample], genes: list[str], *, table_key: str, layer: str | None) -> None:
    """Keep only the counts of ``genes`` in every sample's table."""
    for s in samples:
        s.table = s.table[:, genes]
        where = f"table {table_key!r}" + (f" of sample {s.name!r}" if len(samples) > 1 else "")
        s.counts = get_counts(s.table, layer=layer, where=where)
