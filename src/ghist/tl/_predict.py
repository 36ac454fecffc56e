"""`ghist.tl.predict`: streamed, tiled whole-slide inference writing a prediction table back into SpatialData."""

from __future__ import annotations

import logging
import math
import os
import shutil
import warnings
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
from .._docs import doc_accelerator, doc_batch_size, doc_image_key, doc_labels_key, doc_params, doc_progress
from .._spatial import check_extents, element_affine, image_pixel_size, working_scale
from .._validation import check_int, check_key_added, check_seed, get_image, get_labels, raster_levels
from ._region import cells_in_region, region_in_labels_space

if TYPE_CHECKING:
    from xarray import DataArray

    from .._model import GHISTModel

logger = logging.getLogger(__name__)


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
    region_key: str | None = None,
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
        Replace an existing ``sdata.tables[key_added]``. On a zarr-backed ``sdata`` the new table is written in full
        under a temporary name before the old one is replaced, so a failure leaves the old table, on disk and in
        memory.
    {accelerator}
    seed
        Seed of the refinement's random factors.
    num_workers
        DataLoader worker processes reading and resampling tiles while the network runs (0: read them in this
        process). The predictions do not depend on it.
    {progress}
    region_key
        Deprecated alias of ``roi_key`` (spatialdata's ``region_key`` names a table column); will be removed.

    Returns
    -------
    The prediction table, also written to ``sdata.tables[key_added]`` (and to disk if ``sdata`` is backed by
    a zarr store). It annotates ``labels_key`` (``obs["region"]``, ``obs["cell_id"]``) and holds:

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
    - ``obsm["spatial"]``: nucleus centroids in the labels' pixel coordinates;
    - ``uns["ghist"]``: the settings of this run (``"params"``) and, for models with a neighbourhood context
      (``fit(context_neighbours=k)``), ``"context_in_view"``: the fraction of cells whose ``k`` nearest cells on the
      whole slide lay in the tile they were predicted from, so that their within-tile context was the slide's
      (``None`` without context).

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
    from torch.utils.data import DataLoader

    from .._model._data import SLIDE_CELL_KEYS, SlideTileDataset, collate_slide_tiles, worker_context
    from .._model._device import resolve_device
    from .._model._inference import Predictor, refine_indices
    from .._version import __version__

    if region_key is not None:
        warnings.warn(
            "`region_key` of `ghist.tl.predict` is renamed `roi_key`; `region_key` goes in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        if roi_key is not None and roi_key != region_key:
            raise TypeError("Pass `roi_key` only (`region_key` is its deprecated name), not both.")
        roi_key = region_key
    if not isinstance(sdata, SpatialData):
        raise TypeError(
            f"`sdata` must be a SpatialData with the H&E image and the nucleus labels, got {type(sdata).__name__}"
            + (" (a table: pass the SpatialData that holds it and its image)." if isinstance(sdata, AnnData) else ".")
        )
    model = resolve_model(model)
    image = get_image(sdata, image_key)
    labels = get_labels(sdata, labels_key)
    # Labels of another pixel size under the same transformation would pair every nucleus with the wrong pixels.
    check_extents(sdata, image_key, labels_key)
    check_key_added(sdata, key_added, "tables", overwrite=overwrite)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"`alpha` must be a finite number >= 0 (0: no refinement); got {alpha!r}.")
    check_int("tile_overlap", tile_overlap, 0, maximum=model.tile_size // 2 - 1)
    check_seed(seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int | np.integer) or num_workers < 0:
        raise ValueError(f"`num_workers` must be an integer >= 0, got {num_workers!r}.")
    refine_indices(model, refine_types)
    device = resolve_device(accelerator)
    if getattr(model, "uncertainty_head", None) is None:
        logger.warning(
            "This GHISTModel has no variance head (saved before ghist had one): no `layers[%r]`; re-fit "
            "it to get per-cell uncertainty.",
            PRED_STD_LAYER,
        )
    if not model.is_trained:
        logger.warning("This GHISTModel has not been trained; its predictions are meaningless. Run `ghist.tl.fit`.")

    grid = _SlideGrid.build(sdata, image, image_key, labels_key, model, tile_overlap)
    region = None
    if roi_key is not None:
        region = region_in_labels_space(sdata, roi_key, labels_key)
        grid = grid.restricted_to(region)
    predictor = Predictor(model, device=device, alpha=alpha, refine_types=refine_types, tta=tta, seed=seed)
    dataset = SlideTileDataset(
        image,
        labels,
        grid.origins,
        scale=grid.scale,
        to_labels=grid.to_labels,
        tile_size=grid.tile_size,
        mean=model.mean,
        std=model.std,
        labels_key=labels_key,
        levels=raster_levels(sdata.images[image_key]),
    )
    # In order (no shuffling): the refinement draws its random factors batch after batch.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_slide_tiles,
        num_workers=num_workers,
        multiprocessing_context=worker_context(num_workers),
    )
    logger.info(
        "Predicting %d tiles of %d px (scale %.3g of the image) on %s",
        len(grid.origins),
        model.tile_size,
        grid.scale,
        device,
    )
    parts = predictor.run(
        loader, keep=("cell_id", *SLIDE_CELL_KEYS), progress=progress, total=len(loader), compact=_one_row_per_cell
    )
    table = _assemble_table(parts, model, grid, labels_key)
    k = int(model.init_params_.get("context_neighbours", 0))
    in_view = _context_in_view(parts, k) if k else None
    if in_view is not None:
        logger.info("Neighbourhood context: the %d nearest cells of %.1f%% of cells were in view", k, 100 * in_view)
        if in_view < 0.9:
            logger.warning(
                "Only %.0f%% of cells had their %d nearest cells in the tile they were predicted from; a larger "
                "`tile_overlap` (up to %d) gives each cell a tile with more of its neighbourhood in view.",
                100 * in_view,
                k,
                model.tile_size // 2 - 1,
            )
    if region is not None:
        keep = cells_in_region(table.obsm[SPATIAL_KEY], region)
        table = table[keep].copy()
    table.uns[UNS_KEY] = {
        "params": {
            "image_key": image_key,
            "labels_key": labels_key,
            "key_added": key_added,
            "alpha": float(alpha),
            "refine_types": None if refine_types is None else [str(t) for t in refine_types],
            "tile_overlap": int(tile_overlap),
            "tta": bool(tta),
            "tile_size": int(model.tile_size),
            "scale": float(grid.scale),
            "roi_key": roi_key,
            "seed": int(seed),
            "genes": list(model.genes),
            "cell_types": list(model.cell_types or []),
            "ghist_version": __version__,
        },
        "context_in_view": in_view,
    }
    table = TableModel.parse(table, region=labels_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    _write_table(sdata, table, key_added, overwrite)
    logger.info("Added `sdata.tables[%r]` (%d cells x %d genes)", key_added, table.n_obs, table.n_vars)
    return table


# ---------------------------------------------------------------------------------------------- geometry
@dataclass
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
        size = model.tile_size
        stride = size - overlap
        ys = _starts(shape[0], size, stride)
        xs = _starts(shape[1], size, stride)
        origins = np.array([(y, x) for y in ys for x in xs], dtype=np.int64)
        to_image = np.diag([1 / scale, 1 / scale, 1.0])
        to_labels = element_affine(sdata, image_key, labels_key) @ to_image
        return cls(origins, scale, shape, to_labels, size)

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


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    starts.append(length - size)
    return starts


# ---------------------------------------------------------------------------------------------- table
def _best_rows(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Row of each cell's best tile, ordered by cell id.

    The tile where most of its nucleus was visible; among those, the one where it lies farthest from the edges (most
    context around it; tiles centred on spots put every supervised cell away from them); then the first seen.
    """
    ids = parts["cell_id"]
    order = np.lexsort((-parts["margin"], -parts["visible"], ids))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    return order[first]


def _context_in_view(parts: dict[str, np.ndarray], k: int) -> float:
    """Fraction of cells whose ``k`` nearest cells on the whole slide all lay in the tile they were predicted from.

    The network's neighbourhood context looks for a cell's nearest cells within its tile
    (:mod:`ghist._model._context`); it equals the whole slide's when the ``k``-th nearest cell on the slide is no
    farther from the cell's centroid than the nearest tile edge (``parts["margin"]`` of its best tile). Distances
    are between visible centroids in pixels at the model's resolution.
    """
    from scipy.spatial import cKDTree

    xy = parts["centroid"]
    if len(xy) <= 1:
        return 1.0
    distance, _ = cKDTree(xy).query(xy, k=min(k, len(xy) - 1) + 1)  # the first is the cell itself
    return float(np.mean(distance[:, -1] <= parts["margin"]))


def _one_row_per_cell(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    best = _best_rows(parts)
    return {key: value[best] for key, value in parts.items()}


def _assemble_table(parts: dict[str, np.ndarray], model: GHISTModel, grid: _SlideGrid, labels_key: str) -> AnnData:
    """The prediction table from ``parts`` with one row per cell (``Predictor.run(compact=_one_row_per_cell)``)."""
    from .._model._uncertainty import entropy

    ids = parts["cell_id"]
    if ids.size == 0:
        raise ValueError(f"No nucleus of {labels_key!r} lies under the image: nothing to predict.")
    # spatialdata's convention (as `spatialdata.get_centroids`): pixel (i, j) covers [j, j+1) x [i, i+1).
    centroid = (np.c_[parts["centroid"] + 0.5, np.ones(ids.size)] @ grid.to_labels.T)[:, :2]
    obs = pd.DataFrame(
        {REGION_KEY: pd.Categorical([labels_key] * ids.size), INSTANCE_KEY: ids},
        index=pd.Index([str(i) for i in ids], name=None),
    )
    table = AnnData(X=parts["expr"].astype(np.float32), obs=obs, var=pd.DataFrame(index=list(model.genes)))
    table.obsm[SPATIAL_KEY] = centroid.astype(np.float64)
    if "std" in parts:
        table.layers[PRED_STD_LAYER] = parts["std"].astype(np.float32)
    if model.n_types:
        proba = parts["proba"]
        table.obs[PRED_ENTROPY_KEY] = entropy(proba)
        table.obs[PRED_CELL_TYPE_KEY] = pd.Categorical.from_codes(parts["type"], categories=model.cell_types)
        table.obsm[PRED_PROBA_KEY] = pd.DataFrame(proba, index=table.obs_names, columns=model.cell_types)
        table.obsm[PRED_COMPOSITION_KEY] = pd.DataFrame(parts["comp"], index=table.obs_names, columns=model.cell_types)
    elif getattr(model, "reference_names", None):
        _types_from_reference(table, model)
    return table


def _types_from_reference(table: AnnData, model: GHISTModel) -> None:
    """Cell types of a model trained without them (e.g. on spots) that holds reference profiles.

    Each cell gets the profile its predicted expression correlates with best (Pearson over the genes, on the
    ``log1p`` scale), by the same rule as :func:`ghist.pp.annotate_cell_types` for measured cells; the correlation is
    its score. Cells with a constant prediction get no type; constant profiles are never chosen.
    """
    from .._stats import best_correlated

    profiles = model.network.reference.detach().cpu().numpy().astype(np.float64) / model.expr_scale
    codes, score = best_correlated(np.asarray(table.X, dtype=np.float64), profiles)
    table.obs[PRED_CELL_TYPE_KEY] = pd.Categorical.from_codes(codes, categories=list(model.reference_names))
    table.obs[PRED_CELL_TYPE_SCORE_KEY] = score


def _write_table(sdata: SpatialData, table: AnnData, key: str, overwrite: bool) -> None:
    """Put ``table`` at ``sdata.tables[key]`` (and on disk when backed), all or nothing.

    On a zarr-backed SpatialData the table is first written completely under a temporary name; only then is the old
    table moved aside, the new folder moved in (renames within the store) and the in-memory dict updated. Any
    failure before that leaves the store and ``sdata`` as they were; the temporary element is removed.
    """
    del overwrite  # checked by `check_key_added` before any work
    if not sdata.is_backed() or sdata.path is None:
        sdata.tables[key] = table
        return
    tables_dir = Path(sdata.path) / "tables"
    tmp, old = f"{key}__ghist_tmp", f"{key}__ghist_old"
    for name in (tmp, old):
        if name in sdata:
            raise ValueError(f"`sdata` has an element {name!r}; `ghist.tl.predict` needs that name to write {key!r}.")
        _remove(tables_dir / name)  # left on disk by a run killed mid-way
    try:
        sdata.tables[tmp] = table
        sdata.write_element(tmp)
    except BaseException:
        sdata.tables.pop(tmp, None)
        if (tables_dir / tmp).exists():
            _remove(tables_dir / tmp)
            _consolidate(sdata)
        raise
    finally:
        sdata.tables.pop(tmp, None)
    target = tables_dir / key
    had_old = target.exists()
    try:
        if had_old:
            os.replace(target, tables_dir / old)
        os.replace(tables_dir / tmp, target)
    except BaseException:
        if had_old and not target.exists() and (tables_dir / old).exists():
            os.replace(tables_dir / old, target)
        _remove(tables_dir / tmp)
        _consolidate(sdata)
        raise
    _remove(tables_dir / old)
    sdata.tables[key] = table
    _consolidate(sdata)
    logger.info("Wrote table %r to %s", key, sdata.path)


def _consolidate(sdata: SpatialData) -> None:
    # The store's consolidated metadata lists the elements by name: rewrite it after folders moved or went away.
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
