"""A small synthetic sample shaped like ``spatialdata_io.xenium`` output plus ``xenium_aligned_image``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import GLOBAL_CS, IMAGE_KEY, LABELS_KEY, TABLE_KEY
from .._validation import check_int, check_number
from ._synthetic import synthetic

if TYPE_CHECKING:
    from spatialdata import SpatialData

XENIUM_UM_PER_UNIT = 0.2125  # µm per "global" unit of spatialdata-io's Xenium reader (a morphology image pixel)
_CONTROLS = {"NegControlProbe_00001": "Negative Control Probe", "UnassignedCodeword_0001": "Unassigned Codeword"}
_CELL_MARGIN_UM = 2.0  # cytoplasm drawn around each nucleus in labels["cell_labels"]


def synthetic_xenium(
    *,
    image_size: int = 256,
    n_genes: int | None = None,
    pixel_size: float = 0.5,
    seed: int = 0,
) -> SpatialData:
    """A synthetic Xenium sample with its post-Xenium H&E, laid out as spatialdata-io reads the real thing.

    The tissue, H&E and counts are those of :func:`ghist.datasets.synthetic` (``image_transform="affine"``); only the
    layout changes, to what ``spatialdata_io.xenium(path, cells_as_circles=False, cells_boundaries=False,
    nucleus_boundaries=True, transcripts=False, morphology_mip=False, morphology_focus=False)`` followed by
    ``sdata.images["he_image"] = spatialdata_io.xenium_aligned_image(he_path, alignment_csv)`` returns for XOA 2.0
    and later, so that the steps of the Xenium tutorial (:func:`ghist.pp.prepare_xenium` first) can run anywhere
    in seconds. Offline and deterministic given ``seed``.

    Parameters
    ----------
    image_size
        Side of the square nucleus labels image, in pixels.
    n_genes
        Number of genes (see :func:`ghist.datasets.synthetic`); two control probes are added.
    pixel_size
        µm per nucleus labels pixel. Xenium's own are 0.2125 µm; the default 0.5 fits more cells in a small image
        (the labels' ``Scale`` to ``"global"`` says so, as it does for the reader's lower pyramid levels).
    seed
        Random seed.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with, as spatialdata-io (``"global"``: Xenium pixels of 0.2125 µm, and no
    ``"microns"`` coordinate system):

    - ``images["he_image"]``: the H&E, RGB ``uint8`` ``(c, y, x)`` with channels ``r, g, b``, single-scale and in
      one dask chunk, with the alignment ``Affine`` (H&E pixels -> ``"global"``);
    - ``labels["nucleus_labels"]``: nucleus ids numbering the nucleus polygons (not the cells' ids);
    - ``labels["cell_labels"]``: whole-cell masks (nucleus plus 2 µm), ids ``1..n`` in table order;
    - ``shapes["nucleus_boundaries"]``: nucleus outlines in µm (discs of each nucleus's area), indexed by nucleus
      id, with the owning cell's string id in ``cell_id``;
    - ``tables["table"]``: raw counts (CSR ``float32``) of every cell, genes and control probes
      (``var["feature_types"]``); ``obs["cell_id"]``: Xenium-style string ids (also the ``obs_names``),
      ``obs["cell_labels"]``, ``obs["nucleus_count"]``, areas, ``obs["region"] = "cell_labels"``; annotating
      ``"cell_labels"`` through ``obs["cell_labels"]``; ``obsm["spatial"]``: cell centroids in µm. No cell types,
      as Xenium gives none.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic_xenium(image_size=192, n_genes=20, seed=0)
    >>> prepared = ghist.pp.prepare_xenium(sdata)  # ghist's data contract: "he", "nuclei", "table"
    >>> prepared.tables["table"].n_vars  # the control probes are left out
    20

    """
    check_int("image_size", image_size, 16)
    check_number("pixel_size", pixel_size)
    import dask.array as da
    import geopandas as gpd
    import shapely
    from scipy import ndimage
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Scale, get_transformation

    base = synthetic(image_size=image_size, n_genes=n_genes, pixel_size=pixel_size, image_transform="affine", seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(7)[6])
    table = base.tables[TABLE_KEY]
    n = table.n_obs
    labels = np.asarray(base.labels[LABELS_KEY].data)  # synthetic ids 1..n = table rows + 1
    unit = pixel_size / XENIUM_UM_PER_UNIT  # "global" units per labels pixel

    # Nucleus ids number the polygons in an order of their own; cells are numbered 1..n in table order.
    nucleus_of_cell = rng.permutation(n) + 1
    lut = np.zeros(n + 1, np.uint32)
    lut[1:] = nucleus_of_cell
    nuclei = lut[labels]
    distance, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    cells = np.where(distance * pixel_size <= _CELL_MARGIN_UM, labels[iy, ix], 0).astype(np.uint32)

    cell_ids = np.array([_xenium_cell_id(v) for v in rng.choice(2**31, size=n, replace=False)])
    nucleus_area = np.bincount(labels.ravel(), minlength=n + 1)[1:] * pixel_size**2
    cell_area = np.bincount(cells.ravel(), minlength=n + 1)[1:] * pixel_size**2
    centroid_um = np.asarray(table.obsm["spatial"], dtype=np.float64) * pixel_size

    genes = list(table.var_names)
    controls = rng.poisson(0.05, size=(n, len(_CONTROLS))).astype(np.float32)
    counts = sp.hstack([sp.csr_matrix(table.X, dtype=np.float32), sp.csr_matrix(controls)], format="csr")
    gene_counts = np.asarray(table.X.sum(axis=1)).ravel()
    obs = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "transcript_counts": gene_counts.astype(np.int64),
            "control_probe_counts": controls[:, 0].astype(np.int64),
            "total_counts": (gene_counts + controls.sum(1)).astype(np.int64),
            "cell_area": cell_area,
            "nucleus_area": nucleus_area,
            "nucleus_count": np.ones(n, np.int64),
            "region": pd.Categorical(["cell_labels"] * n),
            "cell_labels": np.arange(1, n + 1, dtype=np.int64),
        },
        index=pd.Index(cell_ids),
    )
    var = pd.DataFrame(
        {"feature_types": ["Gene Expression"] * len(genes) + list(_CONTROLS.values())},
        index=pd.Index([*genes, *_CONTROLS]),
    )
    xenium_table = AnnData(X=counts, obs=obs, var=var)
    xenium_table.obsm["spatial"] = centroid_um
    xenium_table = TableModel.parse(xenium_table, region="cell_labels", region_key="region", instance_key="cell_labels")

    to_global = {GLOBAL_CS: Scale([unit, unit], axes=("y", "x"))}
    discs = shapely.buffer(shapely.points(centroid_um), np.sqrt(nucleus_area / np.pi))
    boundaries = gpd.GeoDataFrame({"cell_id": cell_ids}, geometry=discs, index=pd.Index(nucleus_of_cell))
    boundaries = boundaries.sort_index()
    um_to_global = {GLOBAL_CS: Scale([1 / XENIUM_UM_PER_UNIT] * 2, axes=("x", "y"))}

    he = base.images[IMAGE_KEY]
    he_to_labels = get_transformation(he, GLOBAL_CS).to_affine_matrix(("x", "y"), ("x", "y"))
    alignment = np.diag([unit, unit, 1.0]) @ np.asarray(he_to_labels, dtype=np.float64)
    he_image = Image2DModel.parse(
        da.from_array(np.asarray(he.data), chunks=-1),  # as `xenium_aligned_image`: the whole image in one chunk
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={GLOBAL_CS: Affine(alignment, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    return SpatialData(
        images={"he_image": he_image},
        labels={
            "nucleus_labels": Labels2DModel.parse(nuclei, dims=("y", "x"), transformations=to_global),
            "cell_labels": Labels2DModel.parse(cells, dims=("y", "x"), transformations=to_global),
        },
        shapes={"nucleus_boundaries": ShapesModel.parse(boundaries, transformations=um_to_global)},
        tables={TABLE_KEY: xenium_table},
    )


def _xenium_cell_id(value: int) -> str:
    """Xenium's string cell id: the 8 hex digits of an integer written with the letters a-p, then ``-1``."""
    return "".join(chr(ord("a") + int(h, 16)) for h in f"{int(value):08x}") + "-1"
