"""Training tiles: cut once into an on-disk chunked zarr store (:func:`make_tiles`), split into spatial folds.

:func:`make_tiles` runs four stages: validate every input (:mod:`._tile_samples`), plan the tiles of every sample,
write them to the store (:mod:`._tile_store`, which documents the layout), report. :class:`TileSet`
(:mod:`._tileset`) reads the store; the spatial folds are in :mod:`._folds`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from spatialdata import SpatialData
from tqdm.auto import tqdm

from .._constants import IMAGE_KEY, LABELS_KEY, TABLE_KEY
from .._docs import doc_image_key, doc_labels_key, doc_params, doc_progress, doc_table_key
from .._spatial import check_pixel_size
from .._validation import check_name
from .._version import __version__
from .._write import write_element
from ._folds import SPLIT_NAMES, _check_folds, _check_splits, row_bands, split_rows
from ._tile_samples import (
    _as_samples,
    _at_pixel_size,
    _cell_type_categories,
    _check_spot_args,
    _check_tile_memory,
    _check_tile_size,
    _choose_genes,
    _prepare_samples,
    _Sample,
    _set_spot_targets,
    _subset_genes,
)
from ._tile_store import (
    _ATTRS,
    _FORMAT,
    _FORMAT_VERSION,
    _cut_tiles,
    _grid_plan,
    _new_meta,
    _new_store_path,
    _spot_plan,
    _tile_grid_shapes,
    _TilePlan,
    _write_sample_cells,
    _write_sample_spots,
    _write_tile_meta,
    _Writer,
)
from ._tileset import TileSet

logger = logging.getLogger(__name__)

__all__ = ["make_tiles"]

_SPOT_MISS_WARN = 0.1  # share of the nuclei among spots that fall in none, above which tiling spots warns


@dataclass(frozen=True)
class _Options:
    """The arguments of :func:`make_tiles` that every stage reads."""

    image_key: str
    labels_key: str
    table_key: str
    cell_type_key: str | None
    spots_key: str | None
    layer: str | None
    tile_size: int
    n_folds: int
    fold: int | None
    key_added: str | None
    tiling: str
    spot_coverage: float
    spot_target_sum: float | None
    spot_scaling: str
    progress: bool
    pixel_size: float | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for arg, value, what in (
            ("image_key", self.image_key, "an image of `sdata.images`"),
            ("labels_key", self.labels_key, "labels of `sdata.labels`"),
            ("table_key", self.table_key, "a table of `sdata.tables`"),
            ("cell_type_key", self.cell_type_key, "a column of the table's `obs`"),
            ("spots_key", self.spots_key, "shapes of `sdata.shapes`"),
            ("layer", self.layer, "a layer of the table"),
        ):
            check_name(value, arg, what, optional=arg in ("cell_type_key", "spots_key", "layer"))
        check_pixel_size(self.pixel_size, optional=True)
        _check_spot_args(
            self.spots_key, self.cell_type_key, self.tiling, self.spot_coverage, self.spot_target_sum, self.spot_scaling
        )
        object.__setattr__(self, "tile_size", _check_tile_size(self.tile_size))  # frozen: set once, here
        _check_folds(self.n_folds, self.fold)


@dataclass(frozen=True)
class _Inputs:
    """Validated samples with the genes and cell types of the store."""

    samples: list[_Sample]
    genes: list[str]
    cell_types: list[str] | None
    spot_summaries: list[dict[str, Any]]  # per sample, with spots only


@dataclass(frozen=True)
class _Cut:
    """What writing the store gave, per sample."""

    n_dropped: list[int]  # tiles without a nucleus
    cells: list[dict[str, int]]  # summaries of :func:`_write_sample_cells`


@doc_params(image_key=doc_image_key, labels_key=doc_labels_key, table_key=doc_table_key, progress=doc_progress)
def make_tiles(
    sdata: SpatialData | Sequence[SpatialData] | Mapping[str, SpatialData],
    *,
    image_key: str = IMAGE_KEY,
    labels_key: str = LABELS_KEY,
    table_key: str = TABLE_KEY,
    cell_type_key: str | None = None,
    spots_key: str | None = None,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    tile_size: int = 128,
    n_folds: int = 5,
    fold: int | None = 1,
    path: str | os.PathLike | None = None,
    key_added: str | None = None,
    tiling: Literal["grid", "spots"] = "grid",
    spot_coverage: float = 1.0,
    spot_target_sum: float | None = 1e4,
    spot_scaling: Literal["spot", "sample"] = "spot",
    pixel_size: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TileSet:
    """Cut training tiles once into an on-disk store, with spatial folds.

    Every sample's H&E image is cut into a non-overlapping grid of ``tile_size`` tiles (in the image's own pixel
    space; edge tiles are padded with white and label 0). The nucleus labels are resampled into that pixel space
    through the coordinate transformations of ``sdata`` (nearest neighbour), so labels and image may live in
    different pixel spaces. Tiles without any labelled nucleus are dropped. The tiles, the per-cell expression
    (``log1p`` of the counts) and the cell types go to a chunked zarr store at ``path`` which
    :class:`TileSet` reads lazily.

    **Spatial folds.** Each sample's tile rows are split into ``n_folds`` horizontal bands of (nearly) equal height.
    Band ``fold`` (1-based, top first) is the test set; the tenth of the image right below it (at least one tile
    row, wrapping around to the top) is the validation set; all other rows train. Tiles are never split at random:
    neighbouring tiles share cells and tissue.

    **No cell in two splits.** A nucleus cut by a tile boundary appears in both tiles. Where a training tile
    shares a nucleus with a validation or test tile, that nucleus' pixels are labelled ``-1`` ("ignore") in the
    training tile: they are neither supervised (pixel map, cell type, expression) nor pooled into a cell. So no
    cell ever supervises training while also being evaluated. The store keeps the original ids, so the fold can be
    changed later with :meth:`TileSet.with_fold` without cutting again.

    **Spot-level supervision** (Visium / legacy ST; ``spots_key``). The sample holds the spots as a
    ``ShapesModel`` of circles (points with a ``"radius"`` column) and ``table_key`` names a table of raw spot
    counts annotating them (``region=spots_key``, instance key = the circles' index); no cell is measured, so the
    tiles' per-cell ``expr`` is NaN, and cell types are not available (``cell_type_key`` must be ``None``).
    Every nucleus belongs to the spot whose circle holds its centroid (computed over the whole labels and mapped
    through the coordinate transformations, so labels, image and spots may live in different spaces). A spot's
    target is its counts scaled to a library size (total over all genes of the table) of ``spot_target_sum``
    times its number of nuclei over the sample's median number per spot (``spot_scaling="spot"``), so that
    neither sections nor spots of different sequencing depth differ in scale, while a spot with more cells keeps
    more counts, as the sum of its cells' predicted counts does; the loss compares that sum with the target on
    the ``log1p`` scale (:func:`ghist._model._losses.spot_loss`). A tile supervises a spot
    only when at least ``spot_coverage`` of the spot's nuclei are visible (and not ``-1``) in it; the target of a
    partly visible spot is scaled by its visible fraction of nuclei. The default ``spot_coverage=1`` uses only
    spots whose nuclei are all in the tile: with ``tiling="grid"`` spots cut by a tile edge are then unused, so
    ``tiling="spots"`` (one tile centred on each spot holding a nucleus, shifted inside the image at its edges;
    folds by the grid row of the spot's centre) is the usual choice when spots are a sizeable fraction of a tile.
    Items of the datasets gain ``"cell_spot"`` and ``"spot_expr"`` (see :class:`TileSet`).

    Parameters
    ----------
    sdata
        One :class:`spatialdata.SpatialData` holding the H&E image, the nucleus labels and a table of measured
        cells annotating the labels; or a list of them (samples named ``"0"``, ``"1"``, ...); or a dict
        name -> SpatialData.
    {image_key}
    {labels_key}
    {table_key}
    cell_type_key
        Column of the table's ``obs`` holding cell types (``None``: no cell types; missing values: unknown).
    spots_key
        Circles of ``sdata.shapes`` for spot-level supervision (see above); ``table_key`` then names the table of
        raw spot counts annotating them.
    genes
        Genes to learn. Default: the genes common to every sample's table, in the first table's order.
    layer
        Layer of the table holding raw counts (default ``X``).
    tile_size
        Side of the square tiles, in pixels of the image (or of the ``pixel_size`` grid). The default, 128 px
        (64 µm at 0.5 µm/px), trains about four times as many optimisation steps per minute on a CPU as the
        published 256 px, for the same tissue seen, and so learns more within a CPU budget (``docs/benchmarks.md``).
        With a GPU, 256 px gives each nucleus more context.
    n_folds
        Number of horizontal bands per sample.
    fold
        The test band, 1-based (top band first). ``None``: every tile trains (no validation or test).
    path
        Directory of the new zarr store; must not exist or be empty. Default: a new temporary directory, removed
        once no :class:`TileSet` of it (this one, those of :meth:`TileSet.with_fold`, their datasets and loaders)
        is used any more; pass ``path`` to keep the store.
    key_added
        If given, also write the grid of kept tiles as polygons to ``sdata.shapes[key_added]`` of every sample
        (columns ``tile``, ``row``, ``col``, ``split``, ``n_cells``), in the image's coordinate systems (and to the
        Zarr store backing each, all or nothing).
    tiling
        ``"grid"``: a non-overlapping grid over the whole image; ``"spots"`` (needs ``spots_key``): one tile
        centred on every spot that holds a nucleus.
    spot_coverage
        Smallest visible fraction of a spot's nuclei for a tile to supervise that spot, in ``(0, 1]``.
    spot_target_sum
        Library size of a spot with the sample's median number of nuclei, that spot counts are scaled to (see
        ``spot_scaling``); ``None`` keeps raw counts.
    spot_scaling
        ``"spot"``: every spot is scaled on its own, to ``spot_target_sum`` times its number of nuclei over the
        sample's median number of nuclei per spot, so each spot's sequencing depth (which varies many-fold
        between the spots of one legacy ST section) is removed and only its composition and cell number are
        learnt. ``"sample"``: one factor per sample, ``spot_target_sum / median library size``, keeping the
        depth differences between its spots.
    pixel_size
        Cut the tiles at this many µm per pixel instead of the images' own (e.g. ``2.75`` for legacy ST spots of
        100 µm, or to train on slides scanned at several magnifications). Each image is read from its nearest
        pyramid level that is not coarser and area-averaged to that grid, exactly as :func:`ghist.tl.predict`
        reads slides for a model of that pixel size; labels follow by nearest neighbour. ``tile_size`` is then in
        pixels of that grid, and every sample needs a ``"microns"`` coordinate system.
    {progress}
    overwrite
        With ``key_added``: replace an existing ``sdata.shapes[key_added]`` (in memory or in the backing store)
        instead of raising.

    Returns
    -------
    The :class:`TileSet` over the new store. With ``key_added``: ``sdata.shapes[key_added]`` for every sample.

    Examples
    --------
    >>> tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type", tile_size=256, fold=1)
    >>> tiles
    >>> loader = tiles.loader("train", batch_size=8)

    """
    opts = _Options(
        image_key=image_key,
        labels_key=labels_key,
        table_key=table_key,
        cell_type_key=cell_type_key,
        spots_key=spots_key,
        layer=layer,
        tile_size=tile_size,
        n_folds=n_folds,
        fold=fold,
        key_added=key_added,
        tiling=tiling,
        spot_coverage=spot_coverage,
        spot_target_sum=spot_target_sum,
        spot_scaling=spot_scaling,
        progress=progress,
        pixel_size=pixel_size,
        overwrite=overwrite,
    )
    inputs = _validate(sdata, genes, opts)
    path, owner = _new_store_path(path)
    try:
        plans = _plan(inputs.samples, opts)
        tiles, cut = _write(path, inputs, plans, opts)
    except BaseException:
        if owner is not None:  # the temporary folder too, not only the store inside it
            owner.remove()
        raise
    if owner is not None:
        owner.log_created(path)
    _report(tiles, inputs, cut, opts)
    if key_added is not None:
        _add_tile_shapes(tiles, inputs.samples, opts)
    return tiles


# --------------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------------
def _validate(
    sdata: SpatialData | Sequence[SpatialData] | Mapping[str, SpatialData],
    genes: Sequence[str] | None,
    opts: _Options,
) -> _Inputs:
    """Check every sample before any work (problems of all samples at once); choose the genes and cell types."""
    samples = _prepare_samples(
        _as_samples(sdata),
        name_samples=not isinstance(sdata, SpatialData),
        image_key=opts.image_key,
        labels_key=opts.labels_key,
        table_key=opts.table_key,
        cell_type_key=opts.cell_type_key,
        layer=opts.layer,
        key_added=opts.key_added,
        spots_key=opts.spots_key,
        overwrite=opts.overwrite,
    )
    if opts.pixel_size is not None:
        for sample in samples:
            _at_pixel_size(sample, opts.pixel_size, opts.image_key)
    _check_tile_memory(samples, opts.tile_size, opts.tiling)
    genes = _choose_genes(samples, genes, opts.table_key)
    spot_summaries = []
    if opts.spots_key is not None:
        spot_summaries = _set_spot_targets(samples, genes, target_sum=opts.spot_target_sum, scaling=opts.spot_scaling)
    _subset_genes(samples, genes, table_key=opts.table_key, layer=opts.layer)
    cell_types = _cell_type_categories(samples)
    n_rows = [math.ceil(s.height / opts.tile_size) for s in samples]
    _check_splits([s.name for s in samples], n_rows, opts.n_folds, opts.fold, opts.tile_size)
    return _Inputs(samples, genes, cell_types, spot_summaries)


def _plan(samples: list[_Sample], opts: _Options) -> list[_TilePlan]:
    """The tiles to cut from every sample."""
    make_plan = _spot_plan if opts.tiling == "spots" else _grid_plan
    return [make_plan(s, opts.tile_size) for s in samples]


def _write(path: Path, inputs: _Inputs, plans: list[_TilePlan], opts: _Options) -> tuple[TileSet, _Cut]:
    """Cut the planned tiles into a new store at ``path`` (removed again if anything fails) and open it."""
    logger.info("Cutting %d sample(s) into %d-px tiles at %s", len(inputs.samples), opts.tile_size, path)
    n_planned = sum(len(p) for p in plans)
    try:
        root = zarr.open_group(str(path), mode="w")
        writer = _Writer(root, n_planned, opts.tile_size)
        meta = _new_meta()
        cut = _Cut([], [])
        cell_rows: list[np.ndarray] = []
        cell_spots: list[np.ndarray] = []
        with tqdm(total=n_planned, desc="ghist.pp.make_tiles", unit="tile", disable=not opts.progress) as pbar:
            for i, (s, plan) in enumerate(zip(inputs.samples, plans)):
                start = len(meta["cells"])
                n_dropped = _cut_tiles(
                    s,
                    i,
                    plan,
                    tile_size=opts.tile_size,
                    band_of_row=row_bands(plan.n_rows, opts.n_folds),
                    split_of_row=split_rows(plan.n_rows, opts.n_folds, opts.fold),
                    writer=writer,
                    meta=meta,
                    pbar=pbar,
                )
                cut.n_dropped.append(n_dropped)
                tile_cells = meta["cells"][start:]
                rows, summary = _write_sample_cells(
                    root, s, i, tile_cells, genes=inputs.genes, cell_types=inputs.cell_types
                )
                cell_rows.append(rows)
                cut.cells.append(summary)
                if opts.spots_key is not None:
                    cell_spots.append(_write_sample_spots(root, s, i, tile_cells))
        writer.close()
        if writer.n == 0:
            raise ValueError(
                f"No tile of image {opts.image_key!r} shows a nucleus of labels {opts.labels_key!r}: the image does "
                "not overlap the labels; check the coordinate transformations of both elements."
            )
        _write_tile_meta(root, meta, cell_rows, cell_spots if opts.spots_key is not None else None)
        root.attrs[_ATTRS] = json.loads(json.dumps(_store_attrs(inputs, plans, cut, opts)))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    tiles = TileSet(path)
    root.attrs[_ATTRS] = {**root.attrs[_ATTRS], "mean": tiles.mean.tolist(), "std": tiles.std.tolist()}
    return tiles, cut


def _store_attrs(inputs: _Inputs, plans: list[_TilePlan], cut: _Cut, opts: _Options) -> dict[str, Any]:
    samples = inputs.samples
    attrs = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION if opts.spots_key is not None else 1,
        "genes": inputs.genes,
        "cell_types": inputs.cell_types,
        "tile_size": opts.tile_size,
        "n_folds": int(opts.n_folds),
        "fold": None if opts.fold is None else int(opts.fold),
        "samples": [s.name for s in samples],
        "n_rows": [p.n_rows for p in plans],
        "n_cols": [p.n_cols for p in plans],
        "image_shapes": [[s.height, s.width] for s in samples],
        "pixel_sizes": [s.pixel_size for s in samples],
        "n_dropped": cut.n_dropped,
        "n_cells": [c["n_cells"] for c in cut.cells],
        "image_key": opts.image_key,
        "labels_key": opts.labels_key,
        "table_key": opts.table_key,
        "cell_type_key": opts.cell_type_key,
        "spots_key": opts.spots_key,
        "layer": opts.layer,
        "expr": "log1p(counts)",
        "tiling": opts.tiling,
        "ghist_version": __version__,
    }
    if opts.spots_key is not None:
        attrs.update(
            {
                "spot_names": [s.spots.names for s in samples],
                "spot_factors": [float(np.nanmedian(s.spot_factor)) for s in samples],
                "spot_scaling": opts.spot_scaling,
                "spot_coverage": float(opts.spot_coverage),
                "spot_target_sum": None if opts.spot_target_sum is None else float(opts.spot_target_sum),
                "spot_expr": "counts * samples/<i>/spot_factor (count scale, not log1p)",
            }
        )
    return attrs


def _report(tiles: TileSet, inputs: _Inputs, cut: _Cut, opts: _Options) -> None:
    """Log what was cut, and warn about what looks wrong (no spot holds a nucleus, an empty split, ...)."""
    logger.info(
        "Cut %d tiles (train %d, val %d, test %d; %d without nuclei dropped) from %d sample(s): %d cells "
        "(%d without measurement), %d genes%s",
        len(tiles),
        *(len(tiles.indices(split)) for split in SPLIT_NAMES),
        sum(cut.n_dropped),
        len(inputs.samples),
        tiles.n_cells,
        sum(c["n_unmeasured"] for c in cut.cells),
        len(inputs.genes),
        f", {len(inputs.cell_types)} cell types" if inputs.cell_types is not None else "",
    )
    for s, sm in zip(inputs.samples, inputs.spot_summaries):
        logger.info(
            "Sample %r: %d of %d spots hold a nucleus centroid (median %.0f nuclei per spot, %d nuclei in spots); "
            "spot counts scaled by %.3g (median over spots)",
            s.name,
            sm["n_spots_with_cells"],
            sm["n_spots"],
            sm["median_cells"],
            sm["n_cells_in_spots"],
            float(np.nanmedian(s.spot_factor)),
        )
        if sm["n_spots_with_cells"] == 0:
            logger.warning("Sample %r: no nucleus lies in any spot; check the spots' transformations.", s.name)
        _report_spot_footprint(s.name, opts.spots_key, sm)
    unseen = sum(c["n_table_unseen"] for c in cut.cells)
    if unseen:
        logger.info("%d table cells fall in no tile (outside the image) and were left out.", unseen)
    if len(set(tiles.pixel_sizes) - {None}) > 1:
        logger.warning("The samples' images have different pixel sizes: %s µm/px.", tiles.pixel_sizes)
    for split in SPLIT_NAMES if opts.fold is not None else ("train",):
        if len(tiles.indices(split)) == 0:
            logger.warning("The %s split has no tile with nuclei.", split)


def _report_spot_footprint(name: str, spots_key: str | None, sm: dict[str, Any]) -> None:
    """Log the share of nuclei among the spots that lie in no spot; warn where the geometry, not the assay, loses them.

    Circles inscribed in square bins leave 1 - pi / 4 = 21% of the area between them: the nuclei there get no target.
    Visium / ST spots have gaps by design (only logged).
    """
    near, between = sm["n_cells_near_spots"], sm["n_cells_between_spots"]
    share = between / near if near else 0.0
    logger.info(
        "Sample %r: %d of the %d nuclei among the spots %r (%.0f%%) lie in no spot and supervise nothing.",
        name,
        between,
        near,
        spots_key,
        100 * share,
    )
    if share <= _SPOT_MISS_WARN or not sm["contiguous"]:
        return
    if sm["kind"] == "circles":
        logger.warning(
            "Sample %r: %.0f%% of the %d nuclei among the spots %r lie in no spot: the circles touch their "
            "neighbours (%.3g apart), as if drawn inside square bins, so the corners between them are lost. For "
            "binned data (e.g. Visium HD), pass the bins as polygons (squares, e.g. `shapely.box`) so every nucleus "
            "is in its bin.",
            name,
            100 * share,
            near,
            spots_key,
            sm["spacing"],
        )
    else:
        logger.warning(
            "Sample %r: %.0f%% of the %d nuclei among the polygons %r lie in none of them: the polygons leave gaps; "
            "check their geometry and transformations.",
            name,
            100 * share,
            near,
            spots_key,
        )


def _add_tile_shapes(tiles: TileSet, samples: list[_Sample], opts: _Options) -> None:
    """``key_added``: the kept tiles as polygons in every sample's ``sdata.shapes``."""
    table = tiles.tile_table()
    for s in samples:
        sub = table[table["sample"] == s.name].drop(columns=["sample"])
        shapes = _tile_grid_shapes(s, sub, opts.tile_size, opts.image_key)
        write_element(s.sdata, opts.key_added, shapes, overwrite=opts.overwrite)
        logger.info("Added `sdata.shapes[%r]` (%d tiles) to sample %r", opts.key_added, len(sub), s.name)
