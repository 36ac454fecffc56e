"""Small SpatialData samples for the tiling tests: random disk nuclei, an RGB image, a table of Poisson counts.

The image's red channel encodes the nucleus under each image pixel (the id itself, 255 on background), rasterised
analytically in the image's own pixel space, so tests can check the labels that ``make_tiles`` resampled into that
pixel space against an independent ground truth. Green and blue are random.
"""

from __future__ import annotations

from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale

BACKGROUND_RED = 255
UM_PER_GLOBAL = 0.5  # micrometres per "global" unit


def _disks(rng: np.random.Generator, height: float, width: float, n: int, rmin: float, rmax: float) -> np.ndarray:
    """Non-overlapping disks (cx, cy, r) inside [0, width] x [0, height], by rejection."""
    disks: list[tuple[float, float, float]] = []
    for _ in range(n * 200):
        if len(disks) == n:
            break
        r = rng.uniform(rmin, rmax)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 1.5) ** 2 for x, y, q in disks):
            disks.append((cx, cy, r))
    return np.asarray(disks, dtype=np.float64).reshape(-1, 3)


def _rasterise(disks: np.ndarray, ids: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Id of the disk containing each global point (0 outside every disk)."""
    out = np.zeros(gx.shape, dtype=np.int32)
    for (cx, cy, r), i in zip(disks, ids):
        out[(gx - cx) ** 2 + (gy - cy) ** 2 <= r**2] = i
    return out


def image_matrix(kind: str | None) -> np.ndarray:
    """3x3 affine mapping image pixel (x, y) to "global" for each test placement of the image."""
    if kind is None:
        return np.eye(3)
    if kind == "scale":  # image at twice the labels' resolution
        return np.diag([0.5, 0.5, 1.0])
    if kind == "scale_down":  # image at a third of the labels' resolution, anisotropic
        return np.diag([3.0, 2.5, 1.0])
    if kind == "translate":
        return np.array([[1.0, 0, 7.0], [0, 1.0, -5.0], [0, 0, 1]])
    if kind == "affine":  # rotation by 0.2 rad, scale 0.75, translation
        s, a = 0.75, 0.2
        return np.array([[s * np.cos(a), -s * np.sin(a), 6.0], [s * np.sin(a), s * np.cos(a), -4.0], [0, 0, 1]])
    raise ValueError(kind)


def _make_sdata(
    *,
    seed: int = 0,
    height: int = 96,
    width: int = 128,
    n_cells: int = 40,
    n_genes: int = 8,
    radius: tuple[float, float] = (3.0, 6.0),
    image_transform: str | None = None,
    labels_scale: float = 1.0,
    n_types: int = 3,
    unmeasured: float = 0.0,
    missing_types: float = 0.0,
    sparse: bool = True,
    chunks: int | None = 32,
    gene_names: list[str] | None = None,
    microns: bool = True,
) -> SpatialData:
    """A SpatialData with images["he"], labels["nuclei"] and tables["table"] over a (height x width) global extent.

    ``image_transform`` places the image in another pixel space (see :func:`image_matrix`); ``labels_scale`` is the
    size of a label pixel in global units. ``unmeasured`` is the fraction of nuclei left out of the table and
    ``missing_types`` the fraction of table cells with an unknown (NaN) type.
    """
    rng = np.random.default_rng(seed)
    disks = _disks(rng, height, width, n_cells, *radius)
    n = len(disks)
    ids = np.sort(rng.choice(np.arange(1, 255), size=n, replace=False)).astype(np.int32)
    rng.shuffle(ids)

    # Labels, in their own pixel space (label px -> global: scale by labels_scale).
    lh, lw = int(np.ceil(height / labels_scale)), int(np.ceil(width / labels_scale))
    ly, lx = np.mgrid[0:lh, 0:lw]
    labels = _rasterise(disks, ids, (lx + 0.5) * labels_scale, (ly + 0.5) * labels_scale)

    # Image, in its own pixel space (image px -> global: A).
    A = image_matrix(image_transform)
    corners = np.linalg.inv(A) @ np.array([[0, width, 0, width], [0, 0, height, height], [1, 1, 1, 1]])
    ih, iw = int(np.ceil(corners[1].max())), int(np.ceil(corners[0].max()))
    iy, ix = np.mgrid[0:ih, 0:iw]
    gx = A[0, 0] * (ix + 0.5) + A[0, 1] * (iy + 0.5) + A[0, 2]
    gy = A[1, 0] * (ix + 0.5) + A[1, 1] * (iy + 0.5) + A[1, 2]
    truth = _rasterise(disks, ids, gx, gy)
    image = rng.integers(0, 256, size=(3, ih, iw), dtype=np.uint8)
    image[0] = np.where(truth > 0, truth, BACKGROUND_RED).astype(np.uint8)

    if image_transform is None:
        image_global = Identity()
    elif A[0, 1] == 0 and A[1, 0] == 0 and A[0, 2] == 0 and A[1, 2] == 0:
        image_global = Scale([A[1, 1], A[0, 0]], axes=("y", "x"))
    else:
        image_global = Affine(A, input_axes=("x", "y"), output_axes=("x", "y"))
    labels_global = Identity() if labels_scale == 1 else Scale([labels_scale, labels_scale], axes=("y", "x"))
    image_t = {"global": image_global}
    labels_t = {"global": labels_global}
    if microns:
        image_t["microns"] = Affine(
            np.diag([UM_PER_GLOBAL, UM_PER_GLOBAL, 1.0]) @ A, input_axes=("x", "y"), output_axes=("x", "y")
        )
        labels_t["microns"] = Scale([UM_PER_GLOBAL * labels_scale] * 2, axes=("y", "x"))
    image_el = Image2DModel.parse(
        image, dims=("c", "y", "x"), transformations=image_t, chunks=None if chunks is None else (3, chunks, chunks)
    )
    labels_el = Labels2DModel.parse(
        labels, dims=("y", "x"), transformations=labels_t, chunks=None if chunks is None else (chunks, chunks)
    )

    # Table: a shuffled subset of the nuclei, Poisson counts with type-dependent rates.
    present = np.isin(ids, np.unique(labels))
    measured_mask = present & (rng.random(n) >= unmeasured)
    if not measured_mask.any():
        measured_mask[np.flatnonzero(present)[:1]] = True
    order = rng.permutation(np.flatnonzero(measured_mask))
    types = rng.integers(0, n_types, size=n)
    rates = rng.gamma(2.0, 2.0, size=(n_types, n_genes))
    counts = rng.poisson(rates[types[order]]).astype(np.float32)
    names = gene_names if gene_names is not None else [f"G{i}" for i in range(n_genes)]
    cell_type = pd.Categorical([f"T{t}" for t in types[order]], categories=[f"T{t}" for t in range(n_types)])
    missing = rng.random(len(order)) < missing_types
    missing[:1] = False  # one typed cell at least: make_tiles refuses a cell type column that is all NaN
    cell_type[missing] = np.nan
    obs = pd.DataFrame(
        {
            "cell_id": ids[order].astype(np.int64),
            "region": pd.Categorical(["nuclei"] * len(order)),
            "cell_type": cell_type,
        },
        index=[f"c{i}" for i in ids[order]],
    )
    adata = ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, obs=obs, var=pd.DataFrame(index=names[:n_genes]))
    adata.obsm["spatial"] = disks[order, :2]
    table = TableModel.parse(adata, region="nuclei", region_key="region", instance_key="cell_id")
    return SpatialData(images={"he": image_el}, labels={"nuclei": labels_el}, tables={"table": table})


def _counts_by_id(
    sdata: SpatialData, genes: list[str] | None = None, table_key: str = "table"
) -> dict[int, np.ndarray]:
    """log1p(counts) of every table cell, keyed by nucleus id (the expected ``expr`` rows)."""
    table = sdata.tables[table_key]
    if genes is not None:
        table = table[:, genes]
    X = table.X.toarray() if sp.issparse(table.X) else np.asarray(table.X)
    return {int(i): np.log1p(x.astype(np.float32)) for i, x in zip(table.obs["cell_id"], X)}


@pytest.fixture
def make_sdata() -> Callable[..., SpatialData]:
    """The sample factory (:func:`_make_sdata`)."""
    return _make_sdata


@pytest.fixture
def counts_by_id() -> Callable[..., dict[int, np.ndarray]]:
    """Expected ``expr`` rows by nucleus id (:func:`_counts_by_id`)."""
    return _counts_by_id


@pytest.fixture
def sdata() -> SpatialData:
    """A small sample: 96 x 128 px, 40 nuclei, 8 genes, 3 cell types, image and labels in the same pixel space."""
    return _make_sdata(seed=0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Any attempt to open a network connection fails; the model folders of Cellpose and InstanSeg are empty ones."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "cellpose_models"))
    monkeypatch.setenv("INSTANSEG_BIOIMAGEIO_PATH", str(tmp_path / "instanseg_models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
