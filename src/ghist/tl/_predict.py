"""`ghist.tl.predict`: streamed, tiled whole-slide inference writing a prediction table back into SpatialData."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import TableModel

from .._bundled_models import resolve_model
from .._centroids import label_centroids
from .._constants import (
    IMAGE_KEY,
    INSTANCE_KEY,
    LABELS_KEY,
    PRED_CELL_TYPE_KEY,
    PRED_CELL_TYPE_SCORE_KEY,
    PRED_COMPOSITION_KEY,
    PRED_ENTROPY_KEY,
    PRED_KEY,
    PRED_PROBA_KEY,
    PRED_STD_LAYER,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from .._deprecation import renamed_arguments
from .._docs import doc_accelerator, doc_batch_size, doc_image_key, doc_labels_key, doc_params, doc_progress
from .._spatial import check_extents, element_affine, image_pixel_size, working_scale
from .._tiling import plan_grid
from .._validation import check_int, check_number, check_seed, get_image, get_labels, raster_levels
from .._write import check_writable, write_element
from ._predict_rows import CellRows, MemoryRows, StoreRows
from ._region import cells_in_region, region_in_labels_space

if TYPE_CHECKING:
    from torch.utils.data import DataLoader
    from xarray import DataArray

    from .._model import GHISTModel
    from .._model._inference import CellPrediction

logger = logging.getLogger(__name__)


@renamed_arguments(region_key="roi_key")
@doc_params(
    image_key=doc_image_key,
    labels_key=doc_labels_key,
    batch_size=doc_batch_size,
    accelerator=doc_accelerator,
    progress=doc_progress,
)
def predict(
    sdata: SpatialData,
    model: GHISTModel | str | os.PathLike | None = None,
    *,
    image_key: str = IMAGE_KEY,
    labels_key: str = LABELS_KEY,
    key_added: str = PRED_KEY,
    alpha: float = 2.0,
    refine_types: Sequence[str] | None = None,
    tile_overlap: int = 30,
    batch_size: int = 8,
    roi_key: str | None = None,
    tta: bool = False,
    overwrite: bool = False,
    accelerator: str = "auto",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> AnnData:
    """Predict expression, cell type and neighbourhood composition of every nucleus from the H&E image.

    The slide is cut into overlapping tiles read one batch at a time from the (dask-backed) image, so memory
    does not grow with the slide. A nucleus seen by several tiles keeps the prediction of the tile in which
    most of its pixels were visible and, among those, of the tile where it lies farthest from the edges. Within
    each tile, the neighbourhood refinement nudges uncertain cells'
    types so that the tile's predicted composition moves toward the composition the network estimated;
    cells moved into a specialist group take that group's expression.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image and the nucleus labels (no measured table needed).
    model
        A trained :class:`ghist.GHISTModel`, the name of a model shipped with ghist (:func:`ghist.models.available`)
        or the folder of a saved model. ``None`` uses :data:`ghist.models.DEFAULT_MODEL` (a breast H&E model trained
        on spots; its card, :func:`ghist.models.card`, says what it can and cannot do) and logs which model it used.
    {image_key}
    {labels_key}
    key_added
        Key of the prediction table in ``sdata.tables``.
    alpha
        Strength of the neighbourhood refinement; 0 turns it off.
    refine_types
        Cell types the refinement may move cells into or out of (default: all).
    tile_overlap
        Overlap of neighbouring tiles, in pixels at the model's resolution.
    {batch_size}
    roi_key
        A shapes element of ``sdata`` (e.g. spots or an annotated region of interest): only cells whose centroid
        lies inside one of its geometries are predicted.
    tta
        Test-time augmentation: average each cell's predicted expression, type probabilities and the tile's
        composition over the 8 flips and 90° rotations of its tile (as in training), at 8 times the compute.
    overwrite
        Replace an existing ``sdata.tables[key_added]`` (in memory or, for a SpatialData read from a zarr store, only
        on disk). The new table is written beside the old one and swapped in, so a failure leaves the old table, on
        disk and in memory.
    {accelerator}
    seed
        Seed of the refinement's random factors.
    num_workers
        DataLoader worker processes reading and resampling tiles while the network runs (0: read them in this
        process). The predictions do not depend on it.
    {progress}

    Returns
    -------
    The prediction table, also written to ``sdata.tables[key_added]`` (and to disk if ``sdata`` is backed by
    a zarr store). It annotates ``labels_key`` (``obs["region"]``, ``obs["cell_id"]``), one row per nucleus in id
    order, and holds:

    - ``X``: predicted expression on the ``log1p(counts)`` scale;
    - ``layers["ghist_std"]``: its predictive standard deviation per cell and gene, on the same scale: the model's
      variance head (a Gaussian likelihood on ``log1p`` counts, trained on detached features so that it leaves ``X``
      unchanged), with ``tta`` plus the spread of the 8 views (law of total variance), times the post-hoc
      per-gene factor that made ``X +- 1.645 * std`` cover 90% of the validation split's measured values in
      :func:`ghist.tl.fit` (``model.uncertainty_``).
      For models trained on spots the head and that factor were fitted on spots (the summed cells' variance by the
      delta method), so per-cell coverage could not be checked. Cells moved into a specialist group keep the main
      head's spread. Absent, with a warning, for models saved before ghist had a variance head;
    - ``obs["ghist_cell_type_entropy"]``: entropy (nats, in ``[0, log n_types]``) of the refined cell-type
      probabilities, for models with cell types (models without have no type distribution: no column);
    - ``obs["ghist_cell_type"]``: predicted cell type (categorical). A model trained without cell types (e.g. on
      spots) but with reference profiles gives each cell the profile its predicted expression correlates with best,
      with that correlation in ``obs["ghist_cell_type_score"]``, so squidpy's cluster analyses work on it too;
    - ``obsm["ghist_cell_type_proba"]``: class probabilities after refinement;
    - ``obsm["ghist_composition"]``: the cell-type composition the network estimated around the cell;
    - ``obsm["spatial"]``: nucleus centroids in the labels' pixel coordinates, over the whole nucleus (the mean of
      its pixels' centres, pixel ``(i, j)`` at ``(j + 0.5, i + 0.5)``): the rule every ghist function places cells by;
    - ``uns["ghist"]``: the settings of this run (``"params"``) and, for models with a neighbourhood context
      (``fit(context_neighbours=k)``), ``"context_in_view"``: the fraction of cells whose ``k`` nearest cells on the
      whole slide lay in the tile they were predicted from, so that their within-tile context was the slide's
      (``None`` without context); ``"cells_left_out"``: the nuclei of the labels (``"n_labels"``), how many lie
      outside ``roi_key`` (``"outside_roi"``) and how many no tile showed at the model's pixel size
      (``"not_seen"``: too small once resampled, or outside the image; also logged with their ids).

    On a SpatialData backed by a zarr store, ``X`` and the layers are written chunk by chunk as the tiles are
    predicted and are returned as dask arrays read from the store (``.compute()`` loads them), so that memory does
    not grow with the slide; in memory, the table holds numpy arrays.

    Raises
    ------
    ValueError
        Before any prediction: bad arguments, ``key_added`` taken (without ``overwrite``) or not a valid element
        name, labels without nuclei, no nucleus inside ``roi_key``. During it: the model predicts NaN or infinite
        values (nothing is written).

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=1)
    >>> table = ghist.tl.predict(sdata, model)  # doctest: +SKIP

    With no model, the bundled breast model (here on an H&E image with nuclei and nothing else):

    >>> table = ghist.tl.predict(sdata)  # doctest: +SKIP
    >>> import squidpy as sq
    >>> sq.gr.spatial_neighbors_knn(table)  # doctest: +SKIP
    >>> sq.gr.nhood_enrichment(table, cluster_key="ghist_cell_type")  # doctest: +SKIP

    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(
            f"`sdata` must be a SpatialData with the H&E image and the nucleus labels, got {type(sdata).__name__}"
            + (" (a table: pass the SpatialData that holds it and its image)." if isinstance(sdata, AnnData) else ".")
        )
    model = resolve_model(model)
    args = _Arguments(
        image_key=image_key,
        labels_key=labels_key,
        key_added=key_added,
        alpha=alpha,
        refine_types=refine_types,
        tile_overlap=tile_overlap,
        batch_size=batch_size,
        roi_key=roi_key,
        tta=tta,
        overwrite=overwrite,
        accelerator=accelerator,
        seed=seed,
        num_workers=num_workers,
        progress=progress,
    )
    _check_arguments(sdata, model, args)
    plan = _plan(sdata, model, args)
    loader = _read(plan, model, args)
    rows = _run(loader, model, plan, args)
    try:
        table = _write(sdata, _assemble(rows, plan, model, args), args)
    finally:
        rows.close()
    logger.info("Added `sdata.tables[%r]` (%d cells x %d genes)", key_added, table.n_obs, table.n_vars)
    return table


# ---------------------------------------------------------------------------------------------- arguments
@dataclass(frozen=True)
class _Arguments:
    """The run's settings, as given (checked by :func:`_check_arguments`)."""

    image_key: str
    labels_key: str
    key_added: str
    alpha: float
    refine_types: Sequence[str] | None
    tile_overlap: int
    batch_size: int
    roi_key: str | None
    tta: bool
    overwrite: bool
    accelerator: str
    seed: int
    num_workers: int
    progress: bool


def _check_arguments(sdata: SpatialData, model: GHISTModel, args: _Arguments) -> None:
    """Every argument error, before any work (the slide is not read)."""
    from .._model._device import resolve_device
    from .._model._inference import refine_indices

    get_image(sdata, args.image_key)
    get_labels(sdata, args.labels_key)
    # Labels of another pixel size under the same transformation would pair every nucleus with the wrong pixels.
    check_extents(sdata, args.image_key, args.labels_key)
    check_writable(sdata, args.key_added, "tables", overwrite=args.overwrite)  # in memory and in the store
    check_number("alpha", args.alpha, positive=False)  # 0: no refinement
    check_int("tile_overlap", args.tile_overlap, 0, maximum=model.tile_size // 2 - 1)
    check_int("batch_size", args.batch_size, 1)
    check_int("num_workers", args.num_workers, 0)
    check_seed(args.seed)
    refine_indices(model, args.refine_types)
    resolve_device(args.accelerator)
    if getattr(model, "uncertainty_head", None) is None:
        logger.warning(
            "This GHISTModel has no variance head (saved before ghist had one): no `layers[%r]`; re-fit "
            "it to get per-cell uncertainty.",
            PRED_STD_LAYER,
        )
    if not model.is_trained:
        logger.warning("This GHISTModel has not been trained; its predictions are meaningless. Run `ghist.tl.fit`.")


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class _SlideGrid:
    """Tile origins on the model-resolution grid and the maps from that grid to image and labels pixels."""

    origins: np.ndarray  # (n, 2) y0, x0 on the working grid
    scale: float  # working pixels per image pixel
    shape: tuple[int, int]  # working grid size (h, w)
    to_labels: np.ndarray  # 3x3: working (x, y, 1) -> labels (x, y, 1)
    tile_size: int

    @classmethod
    def build(
        cls,
        sdata: SpatialData,
        image: DataArray,
        image_key: str,
        labels_key: str,
        model: GHISTModel,
        overlap: int,
    ) -> _SlideGrid:
        scale = 1.0
        slide_px = image_pixel_size(sdata, image_key)
        if model.pixel_size is not None and slide_px is not None:
            scale = working_scale(slide_px, model.pixel_size)
            if scale != 1.0:
                logger.info("Resampling %r from %.3g to the model's %.3g um/px", image_key, slide_px, model.pixel_size)
        elif model.pixel_size is not None:
            logger.warning(
                "Image %r has no 'microns' coordinate system; assuming the model's pixel size (%.3g um/px).",
                image_key,
                model.pixel_size,
            )
        h, w = image.sizes["y"], image.sizes["x"]
        shape = (max(1, round(h * scale)), max(1, round(w * scale)))
        grid = plan_grid(shape, model.tile_size, overlap=overlap, edge="inside")
        to_image = np.diag([1 / scale, 1 / scale, 1.0])
        to_labels = element_affine(sdata, image_key, labels_key) @ to_image
        return cls(grid.origins, scale, shape, to_labels, model.tile_size)

    def restricted_to(self, region: Any) -> _SlideGrid:
        """Keep only tiles whose footprint in labels space touches the region."""
        from shapely import box, intersects

        corners = []
        for y0, x0 in self.origins:
            pts = np.array([[x0, y0, 1], [x0 + self.tile_size, y0, 1], [x0, y0 + self.tile_size, 1]], dtype=float)
            pts = pts @ self.to_labels.T
            xs, ys = pts[:, 0], pts[:, 1]
            far = pts[1, :2] + pts[2, :2] - pts[0, :2]
            corners.append(
                box(min(xs.min(), far[0]), min(ys.min(), far[1]), max(xs.max(), far[0]), max(ys.max(), far[1]))
            )
        keep = intersects(np.array(corners, dtype=object), region)
        return _SlideGrid(self.origins[keep], self.scale, self.shape, self.to_labels, self.tile_size)


@dataclass(frozen=True)
class _Plan:
    """What to predict: the tiles, the cells wanted (ids ascending, centroids in labels pixels), where rows are kept."""

    grid: _SlideGrid
    levels: list[tuple[float, float, Any]]  # the image's pyramid, finest first
    labels: DataArray
    ids: np.ndarray  # (n,) cells to predict
    centroids: np.ndarray  # (n, 2) their centroids (x, y) in labels pixels, by the one centroid rule
    n_labels: int  # nuclei in the labels
    n_outside_roi: int
    store_folder: Path | None  # keep rows on disk beside this zarr store (a backed SpatialData), else in memory


def _plan(sdata: SpatialData, model: GHISTModel, args: _Arguments) -> _Plan:
    """The tile grid and every nucleus of the labels with its centroid; the region of interest applied to both."""
    image, labels = get_image(sdata, args.image_key), get_labels(sdata, args.labels_key)
    grid = _SlideGrid.build(sdata, image, args.image_key, args.labels_key, model, args.tile_overlap)
    cells = label_centroids(labels)
    if len(cells) == 0:
        raise ValueError(f"Labels {args.labels_key!r} hold no nucleus (every pixel is 0): nothing to predict.")
    keep = np.ones(len(cells), dtype=bool)
    if args.roi_key is not None:
        region = region_in_labels_space(sdata, args.roi_key, args.labels_key)
        keep = cells_in_region(cells.xy, region)
        if not keep.any():
            raise ValueError(
                f"No nucleus centroid of {args.labels_key!r} lies inside `roi_key={args.roi_key!r}` ({len(cells)} "
                "nuclei, none inside): check that the region and the labels share a coordinate system."
            )
        grid = grid.restricted_to(region)
    return _Plan(
        grid=grid,
        levels=raster_levels(sdata.images[args.image_key]),
        labels=labels,
        ids=cells.ids[keep],
        centroids=cells.xy[keep],
        n_labels=len(cells),
        n_outside_roi=int((~keep).sum()),
        store_folder=None if sdata.path is None else Path(sdata.path).parent,
    )


# ---------------------------------------------------------------------------------------------- read
def _read(plan: _Plan, model: GHISTModel, args: _Arguments) -> DataLoader:
    """Batches of the plan's tiles, read and resampled lazily (in worker processes with ``num_workers``)."""
    from torch.utils.data import DataLoader

    from .._model._data import SlideTileDataset, collate_slide_tiles, worker_context

    dataset = SlideTileDataset(
        plan.levels[0][2],
        plan.labels,
        plan.grid.origins,
        scale=plan.grid.scale,
        to_labels=plan.grid.to_labels,
        tile_size=plan.grid.tile_size,
        mean=model.mean,
        std=model.std,
        labels_key=args.labels_key,
        levels=plan.levels,
    )
    # In order (no shuffling): the refinement draws its random factors batch after batch.
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        collate_fn=collate_slide_tiles,
        num_workers=args.num_workers,
        multiprocessing_context=worker_context(args.num_workers),
    )


# ---------------------------------------------------------------------------------------------- run
def _run(loader: DataLoader, model: GHISTModel, plan: _Plan, args: _Arguments) -> CellRows:
    """The model over every batch; each cell keeps the row of the tile that saw it best (one row per cell)."""
    from tqdm.auto import tqdm

    from .._memory import release_freed_memory
    from .._model._device import resolve_device
    from .._model._inference import Predictor

    device = resolve_device(args.accelerator)
    predictor = Predictor(
        model, device=device, alpha=args.alpha, refine_types=args.refine_types, tta=args.tta, seed=args.seed
    )
    with_std = predictor.variance_head is not None
    if plan.store_folder is None:
        keeper: MemoryRows | StoreRows = MemoryRows(plan.ids, len(model.genes), with_std)
    else:
        keeper = StoreRows(plan.ids, len(model.genes), with_std, folder=plan.store_folder)
    logger.info(
        "Predicting %d tiles of %d px (scale %.3g of the image) on %s",
        len(plan.grid.origins),
        model.tile_size,
        plan.grid.scale,
        device,
    )
    bar = tqdm(loader, desc="ghist.tl.predict", unit="batch", total=len(loader), disable=not args.progress)
    try:
        for i, batch in enumerate(bar):
            if i % 16 == 15:
                release_freed_memory()  # the network's freed batch arrays, else kept by glibc as the slide goes on
            if batch is None:  # no nucleus in these tiles
                continue
            prediction = predictor(batch)
            _check_finite(prediction)
            keeper.add(
                batch["cell_id"].numpy(),
                batch["visible"].numpy(),
                batch["margin"].numpy(),
                batch["centroid"].numpy(),
                prediction,
            )
    except BaseException:
        if isinstance(keeper, StoreRows):
            keeper.discard()
        raise
    return keeper.finish()


def _check_finite(prediction: CellPrediction) -> None:
    for name in ("expr", "std", "proba"):
        value = getattr(prediction, name)
        if value is not None and not np.isfinite(value).all():
            raise ValueError(
                f"The model predicts non-finite values ({name}: NaN or infinite) for some cells; nothing was "
                "written. Its weights are likely broken (e.g. a training run that diverged: fit again with a lower "
                "`lr`)."
            )


# ---------------------------------------------------------------------------------------------- assemble
def _assemble(rows: CellRows, plan: _Plan, model: GHISTModel, args: _Arguments) -> AnnData:
    """The prediction table: one row per predicted cell, in id order; what was left out, counted in ``uns``."""
    from .._version import __version__

    ids = rows.ids
    if ids.size == 0:
        raise ValueError(f"No nucleus of {args.labels_key!r} lies under the image: nothing to predict.")
    n_unseen = int(plan.ids.size - ids.size)
    if n_unseen:
        missing = np.setdiff1d(plan.ids, ids)
        logger.warning(
            "%d of %d nuclei of %r are not in the table: no tile showed a pixel of them at the model's %.3g um/px "
            "(too small once resampled, or outside the image), e.g. ids %s.",
            n_unseen,
            plan.ids.size,
            args.labels_key,
            model.pixel_size or float("nan"),
            missing[:10].tolist(),
        )
    if plan.n_outside_roi:
        logger.info(
            "%d nuclei of %r lie outside `roi_key=%r`: not predicted", plan.n_outside_roi, args.labels_key, args.roi_key
        )
    obs = pd.DataFrame(
        {REGION_KEY: pd.Categorical([args.labels_key] * ids.size), INSTANCE_KEY: ids},
        index=pd.Index([str(i) for i in ids], name=None),
    )
    table = AnnData(X=rows.expr, obs=obs, var=pd.DataFrame(index=list(model.genes)))
    table.obsm[SPATIAL_KEY] = plan.centroids[np.searchsorted(plan.ids, ids)]
    if rows.std is not None:
        table.layers[PRED_STD_LAYER] = rows.std
    if model.n_types:
        types = list(model.cell_types)
        table.obs[PRED_ENTROPY_KEY] = rows.type_entropy
        table.obs[PRED_CELL_TYPE_KEY] = pd.Categorical.from_codes(rows.cell_type, categories=types)
        table.obsm[PRED_PROBA_KEY] = pd.DataFrame(rows.proba, index=table.obs_names, columns=types)
        table.obsm[PRED_COMPOSITION_KEY] = pd.DataFrame(rows.composition, index=table.obs_names, columns=types)
    elif rows.type_score is not None:
        names = list(model.reference_names)
        table.obs[PRED_CELL_TYPE_KEY] = pd.Categorical.from_codes(rows.cell_type, categories=names)
        table.obs[PRED_CELL_TYPE_SCORE_KEY] = rows.type_score
    k = int(model.init_params_.get("context_neighbours", 0))
    in_view = _context_in_view(rows, k, model.tile_size) if k else None
    table.uns[UNS_KEY] = {
        "params": {
            "image_key": args.image_key,
            "labels_key": args.labels_key,
            "key_added": args.key_added,
            "alpha": float(args.alpha),
            "refine_types": None if args.refine_types is None else [str(t) for t in args.refine_types],
            "tile_overlap": int(args.tile_overlap),
            "tta": bool(args.tta),
            "tile_size": int(model.tile_size),
            "scale": float(plan.grid.scale),
            "roi_key": args.roi_key,
            "seed": int(args.seed),
            "genes": list(model.genes),
            "cell_types": list(model.cell_types or []),
            "ghist_version": __version__,
        },
        "context_in_view": in_view,
        "cells_left_out": {"n_labels": plan.n_labels, "outside_roi": plan.n_outside_roi, "not_seen": n_unseen},
    }
    return TableModel.parse(table, region=args.labels_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _context_in_view(rows: CellRows, k: int, tile_size: int) -> float:
    """Fraction of cells whose ``k`` nearest cells on the whole slide all lay in the tile they were predicted from.

    The network's neighbourhood context looks for a cell's nearest cells within its tile
    (:mod:`ghist._model._context`); it equals the whole slide's when the ``k``-th nearest cell on the slide is no
    farther from the cell's centroid than the nearest tile edge (``margin`` of its best tile). Distances are between
    visible centroids in pixels at the model's resolution.
    """
    from scipy.spatial import cKDTree

    xy = rows.centroid
    if len(xy) <= 1:
        return 1.0
    distance, _ = cKDTree(xy).query(xy, k=min(k, len(xy) - 1) + 1)  # the first is the cell itself
    in_view = float(np.mean(distance[:, -1] <= rows.margin))
    logger.info("Neighbourhood context: the %d nearest cells of %.1f%% of cells were in view", k, 100 * in_view)
    if in_view < 0.9:
        logger.warning(
            "Only %.0f%% of cells had their %d nearest cells in the tile they were predicted from; a larger "
            "`tile_overlap` (up to %d) gives each cell a tile with more of its neighbourhood in view.",
            100 * in_view,
            k,
            tile_size // 2 - 1,
        )
    return in_view


# ---------------------------------------------------------------------------------------------- write
def _write(sdata: SpatialData, table: AnnData, args: _Arguments) -> AnnData:
    """``sdata.tables[key_added]`` (and the store, when backed), all or nothing; the table as it now is in ``sdata``.

    On a store, the table's dask-backed ``X`` and layers are written chunk by chunk and then read lazily from the
    store (the temporary rows they came from are removed after this).
    """
    return write_element(sdata, args.key_added, table, overwrite=args.overwrite)
