"""`ghist.tl.predict`: streamed, tiled whole-slide inference writing a prediction table back into SpatialData."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import ndimage
from spatialdata import SpatialData
from spatialdata.models import TableModel

from .._constants import (
    IMAGE_KEY,
    INSTANCE_KEY,
    LABELS_KEY,
    PRED_CELL_TYPE_KEY,
    PRED_COMPOSITION_KEY,
    PRED_KEY,
    PRED_PROBA_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from .._docs import doc_accelerator, doc_batch_size, doc_image_key, doc_labels_key, doc_params, doc_progress
from .._spatial import element_affine, image_pixel_size, read_labels_window
from .._validation import check_key_added, get_image, get_labels
from ._region import cells_in_region, region_in_labels_space

if TYPE_CHECKING:
    import torch
    from xarray import DataArray

    from .._model import GHISTModel

logger = logging.getLogger(__name__)

# Relative pixel-size difference under which a slide is used as is, without resampling to the model's pixel size.
_RESAMPLE_TOLERANCE = 0.05


@doc_params(
    image_key=doc_image_key,
    labels_key=doc_labels_key,
    batch_size=doc_batch_size,
    accelerator=doc_accelerator,
    progress=doc_progress,
)
def predict(
    sdata: SpatialData,
    model: GHISTModel,
    *,
    image_key: str = IMAGE_KEY,
    labels_key: str = LABELS_KEY,
    key_added: str = PRED_KEY,
    alpha: float = 2.0,
    refine_types: Sequence[str] | None = None,
    tile_overlap: int = 30,
    batch_size: int = 8,
    region_key: str | None = None,
    tta: bool = False,
    overwrite: bool = False,
    accelerator: str = "auto",
    seed: int = 0,
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
        A trained :class:`ghist.GHISTModel`.
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
    region_key
        A shapes element of ``sdata`` (e.g. spots or an annotated region): only cells whose centroid lies
        inside one of its geometries are predicted.
    tta
        Test-time augmentation: average each cell's predicted expression, type probabilities and the tile's
        composition over the 8 flips and 90° rotations of its tile (as in training), at 8 times the compute.
    overwrite
        Replace an existing ``sdata.tables[key_added]``.
    {accelerator}
    seed
        Seed of the refinement's random factors.
    {progress}

    Returns
    -------
    The prediction table, also written to ``sdata.tables[key_added]`` (and to disk if ``sdata`` is backed by
    a zarr store). It annotates ``labels_key`` (``obs["region"]``, ``obs["cell_id"]``) and holds:

    - ``X``: predicted expression on the ``log1p(counts)`` scale;
    - ``obs["ghist_cell_type"]``: predicted cell type (categorical);
    - ``obsm["ghist_cell_type_proba"]``: class probabilities after refinement;
    - ``obsm["ghist_composition"]``: the cell-type composition the network estimated around the cell;
    - ``obsm["spatial"]``: nucleus centroids in the labels' pixel coordinates;
    - ``uns["ghist"]``: the settings of this run.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=1)
    >>> table = ghist.tl.predict(sdata, model)  # doctest: +SKIP
    >>> import squidpy as sq
    >>> sq.gr.spatial_neighbors(table)  # doctest: +SKIP
    >>> sq.gr.nhood_enrichment(table, cluster_key="ghist_cell_type")  # doctest: +SKIP

    """
    import torch

    from .._model import GHISTModel
    from .._version import __version__

    if not isinstance(model, GHISTModel):
        raise TypeError(f"`model` must be a GHISTModel (from `ghist.tl.fit` or `GHISTModel.load`), got {type(model)}.")
    image = get_image(sdata, image_key)
    labels = get_labels(sdata, labels_key)
    check_key_added(sdata, key_added, "tables", overwrite=overwrite)
    if alpha < 0:
        raise ValueError(f"`alpha` must be >= 0, got {alpha}.")
    if not 0 <= tile_overlap < model.tile_size // 2:
        raise ValueError(f"`tile_overlap` must be in [0, {model.tile_size // 2}), got {tile_overlap}.")
    refine_idx = _refine_indices(model, refine_types)
    model._check_trained()

    grid = _SlideGrid.build(sdata, image, image_key, labels_key, model, tile_overlap)
    region = None
    if region_key is not None:
        region = region_in_labels_space(sdata, region_key, labels_key)
        grid = grid.restricted_to(region)
    device = _resolve_device(accelerator)
    # A fused copy (batch norm folded into the convolutions, channels-last): same outputs up to float rounding,
    # faster, and the user's model is left untouched.
    network = model.network.fuse_for_inference(channels_last=True).to(device)
    generator = torch.Generator().manual_seed(seed)
    logger.info(
        "Predicting %d tiles of %d px (scale %.3g of the image) on %s",
        len(grid.origins),
        model.tile_size,
        grid.scale,
        device,
    )

    parts = _run_tiles(
        grid, image, labels, model, network, device, batch_size, alpha, refine_idx, generator, progress, tta
    )
    table = _assemble_table(parts, model, grid, labels_key)
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
            "region_key": region_key,
            "seed": int(seed),
            "genes": list(model.genes),
            "cell_types": list(model.cell_types or []),
            "ghist_version": __version__,
        }
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
            ratio = slide_px / model.pixel_size
            if abs(ratio - 1) > _RESAMPLE_TOLERANCE:
                scale = ratio
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


def _read_image_tile(image: DataArray, grid: _SlideGrid, y0: int, x0: int) -> np.ndarray:
    """RGB tile (3, T, T) uint8 on the working grid, white outside the image."""
    size, scale = grid.tile_size, grid.scale
    h, w = image.sizes["y"], image.sizes["x"]
    if scale == 1.0:
        tile = np.full((3, size, size), 255, dtype=np.uint8)
        ye, xe = min(y0 + size, h), min(x0 + size, w)
        tile[:, : ye - y0, : xe - x0] = np.asarray(image.data[:, y0:ye, x0:xe])
        return tile
    # Pixel centres: working pixel r sits at image coordinate (r + 0.5) / scale - 0.5.
    src_y0 = max(0, math.floor((y0 + 0.5) / scale - 0.5) - 1)
    src_x0 = max(0, math.floor((x0 + 0.5) / scale - 0.5) - 1)
    src_y1 = min(h, math.ceil((y0 + size + 0.5) / scale) + 2)
    src_x1 = min(w, math.ceil((x0 + size + 0.5) / scale) + 2)
    tile = np.full((3, size, size), 255, dtype=np.uint8)
    if src_y1 <= src_y0 or src_x1 <= src_x0:
        return tile
    window = np.asarray(image.data[:, src_y0:src_y1, src_x0:src_x1]).astype(np.float32)
    offset = ((y0 + 0.5) / scale - 0.5 - src_y0, (x0 + 0.5) / scale - 0.5 - src_x0)
    for c in range(3):
        tile[c] = np.clip(
            ndimage.affine_transform(
                window[c], [1 / scale, 1 / scale], offset=offset, output_shape=(size, size), order=1, cval=255.0
            ),
            0,
            255,
        ).round()
    return tile


# ---------------------------------------------------------------------------------------------- inference
def _tile_inputs(
    image: DataArray, labels: DataArray, grid: _SlideGrid, index: int, mean: np.ndarray, std: np.ndarray
) -> dict[str, np.ndarray]:
    y0, x0 = (int(v) for v in grid.origins[index])
    rgb = _read_image_tile(image, grid, y0, x0)
    lab = read_labels_window(labels, grid.to_labels, y0, x0, grid.tile_size, grid.tile_size)
    ids, local = np.unique(lab, return_inverse=True)
    local = local.reshape(lab.shape)
    if ids.size and ids[0] == 0:
        ids = ids[1:]
    else:
        local = local + 1  # no background pixel in this tile: ids start at local 1
    counts = np.bincount(local.ravel(), minlength=ids.size + 1)[1:]
    yy, xx = np.indices(lab.shape)
    sum_y = np.bincount(local.ravel(), weights=yy.ravel(), minlength=ids.size + 1)[1:]
    sum_x = np.bincount(local.ravel(), weights=xx.ravel(), minlength=ids.size + 1)[1:]
    local_x, local_y = sum_x / np.maximum(counts, 1), sum_y / np.maximum(counts, 1)
    centroids = np.stack([local_x + x0, local_y + y0], axis=1)
    # distance from the visible centroid to the nearest tile edge: how much context the network had around it
    t = grid.tile_size
    margin = np.minimum(np.minimum(local_x, t - 1 - local_x), np.minimum(local_y, t - 1 - local_y))
    standardised = (rgb.astype(np.float32) - mean[:, None, None]) / std[:, None, None]
    return {
        "image": standardised,
        "labels": local.astype(np.int64),
        "cell_id": ids.astype(np.int64),
        "visible": counts.astype(np.int64),
        "margin": margin,
        "centroid": centroids,
    }


def _run_tiles(
    grid: _SlideGrid,
    image: DataArray,
    labels: DataArray,
    model: GHISTModel,
    network: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    alpha: float,
    refine_idx: list[int] | None,
    generator: torch.Generator,
    progress: bool,
    tta: bool = False,
) -> dict[str, np.ndarray]:
    import torch
    from tqdm.auto import tqdm

    from .._model._network import neighbourhood_refine, specialist_expression

    mean, std = model.mean, model.std
    groups = {name: [model.cell_types.index(t) for t in members] for name, members in model.cell_type_groups.items()}
    collected: dict[str, list[np.ndarray]] = {
        k: [] for k in ("cell_id", "visible", "margin", "centroid", "expr", "proba", "type", "comp")
    }
    n_tiles = len(grid.origins)
    n_batches = math.ceil(n_tiles / batch_size)
    with torch.inference_mode():
        for b in tqdm(range(n_batches), desc="ghist.tl.predict", unit="batch", disable=not progress):
            items = [
                _tile_inputs(image, labels, grid, i, mean, std)
                for i in range(b * batch_size, min(n_tiles, (b + 1) * batch_size))
            ]
            items = [it for it in items if it["cell_id"].size]
            if not items:
                continue
            offsets = np.cumsum([0] + [it["cell_id"].size for it in items])
            lab = np.stack([np.where(it["labels"] > 0, it["labels"] + off, 0) for it, off in zip(items, offsets)])
            cell_batch = np.concatenate([np.full(it["cell_id"].size, i) for i, it in enumerate(items)])
            n_cells = int(offsets[-1])
            cb = torch.from_numpy(cell_batch).to(device)
            out = _forward(
                network,
                torch.from_numpy(np.stack([it["image"] for it in items])).to(device),
                torch.from_numpy(lab).to(device),
                cb,
                n_cells,
                tta,
            )
            expr = out["expr"]
            if model.n_types:
                proba, comp = out["proba"], out["composition"]
                before = proba.argmax(-1)
                proba, after = neighbourhood_refine(proba, comp, cb, alpha=alpha, types=refine_idx, generator=generator)
                if groups:
                    expr = specialist_expression(expr, out["group_expr"], before, after, groups)
                collected["proba"].append(proba.cpu().numpy())
                collected["type"].append(after.cpu().numpy())
                collected["comp"].append(comp[cb].cpu().numpy())
            expr = torch.clamp(expr / model.expr_scale, min=0)
            collected["expr"].append(expr.cpu().numpy())
            for key in ("cell_id", "visible", "margin", "centroid"):
                collected[key].append(np.concatenate([it[key] for it in items]))
    return {k: (np.concatenate(v) if v else np.empty((0,))) for k, v in collected.items()}


def _forward(network, image, labels, cell_batch, n_cells: int, tta: bool) -> dict[str, Any]:
    """Network outputs in float32 (cell-type logits as probabilities), averaged over the 8 views with ``tta``.

    Cells are pooled by their label ids, so every flipped or rotated view yields its cells in the same order.
    """
    import torch

    from .._model._network import dihedral_view

    views = [(k, flip) for flip in (False, True) for k in range(4)] if tta else [(0, False)]
    sums: dict[str, torch.Tensor] = {}
    group_sums: dict[str, torch.Tensor] = {}

    def add(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        store[key] = value.float() if key not in store else store[key] + value.float()

    for k, flip in views:
        img, lab = dihedral_view(image, k, flip), dihedral_view(labels, k, flip)
        out = network(img.contiguous(memory_format=torch.channels_last), lab.contiguous(), cell_batch, n_cells)
        add(sums, "expr", out["expr"])
        if out.get("cell_logits") is not None:
            add(sums, "proba", torch.softmax(out["cell_logits"].float(), dim=-1))
            add(sums, "composition", out["composition"])
        for name, value in (out.get("group_expr") or {}).items():
            add(group_sums, name, value)
    n = len(views)
    return {
        **{key: value / n for key, value in sums.items()},
        "group_expr": {name: value / n for name, value in group_sums.items()},
    }


def _assemble_table(parts: dict[str, np.ndarray], model: GHISTModel, grid: _SlideGrid, labels_key: str) -> AnnData:
    ids = parts["cell_id"]
    if ids.size == 0:
        raise ValueError(f"No nucleus of {labels_key!r} lies under the image: nothing to predict.")
    # For each cell, the tile where most of its nucleus was visible; among those, the one where it lies farthest
    # from the edges (most context around it; tiles centred on spots put every supervised cell away from them).
    order = np.lexsort((-parts["margin"], -parts["visible"], ids))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    best = order[first]
    # spatialdata's convention (as `spatialdata.get_centroids`): pixel (i, j) covers [j, j+1) x [i, i+1).
    centroid = (np.c_[parts["centroid"][best] + 0.5, np.ones(best.size)] @ grid.to_labels.T)[:, :2]
    obs = pd.DataFrame(
        {REGION_KEY: pd.Categorical([labels_key] * best.size), INSTANCE_KEY: ids[best]},
        index=pd.Index([str(i) for i in ids[best]], name=None),
    )
    table = AnnData(X=parts["expr"][best].astype(np.float32), obs=obs, var=pd.DataFrame(index=list(model.genes)))
    table.obsm[SPATIAL_KEY] = centroid.astype(np.float64)
    if model.n_types:
        proba = parts["proba"][best]
        table.obs[PRED_CELL_TYPE_KEY] = pd.Categorical.from_codes(parts["type"][best], categories=model.cell_types)
        table.obsm[PRED_PROBA_KEY] = pd.DataFrame(proba, index=table.obs_names, columns=model.cell_types)
        table.obsm[PRED_COMPOSITION_KEY] = pd.DataFrame(
            parts["comp"][best], index=table.obs_names, columns=model.cell_types
        )
    return table


def _write_table(sdata: SpatialData, table: AnnData, key: str, overwrite: bool) -> None:
    if key in sdata.tables and overwrite:
        del sdata.tables[key]
        if sdata.is_backed() and key in _on_disk_tables(sdata):
            sdata.delete_element_from_disk(key)
    sdata.tables[key] = table
    if sdata.is_backed():
        sdata.write_element(key)
        logger.info("Wrote table %r to %s", key, sdata.path)


def _on_disk_tables(sdata: SpatialData) -> list[str]:
    try:
        return [name.split("/", 1)[1] for name in sdata.elements_paths_on_disk() if name.startswith("tables/")]
    except Exception:
        return []


def _refine_indices(model: GHISTModel, refine_types: Sequence[str] | None) -> list[int] | None:
    if refine_types is None:
        return None
    if not model.cell_types:
        raise ValueError("`refine_types` was given but the model has no cell types.")
    unknown = [t for t in refine_types if t not in model.cell_types]
    if unknown:
        raise KeyError(f"`refine_types` names {unknown}, not among the model's cell types {model.cell_types}.")
    return [model.cell_types.index(t) for t in refine_types]


def _resolve_device(accelerator: str) -> torch.device:
    import torch

    valid = ("auto", "cpu", "gpu", "cuda", "mps")
    if accelerator not in valid:
        raise ValueError(f"`accelerator` must be one of {valid}, got {accelerator!r}.")
    if accelerator == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"`accelerator={accelerator!r}` but no CUDA device is available.")
        return torch.device("cuda")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("`accelerator='mps'` but MPS is not available.")
    return torch.device(accelerator)
