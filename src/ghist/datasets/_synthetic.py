"""Offline synthetic H&E + nuclei + Xenium-like expression, and a matching single-cell reference."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._centroids import label_centroids
from .._constants import (
    CELL_TYPE_KEY,
    GLOBAL_CS,
    IMAGE_KEY,
    INSTANCE_KEY,
    LABELS_KEY,
    MICRONS_CS,
    REGION_KEY,
    SPATIAL_KEY,
    SYNTHETIC_UNS_KEY,
    TABLE_KEY,
    XENIUM_BREAST_CELL_TYPES,
)
from .._deprecation import renamed_arguments
from .._validation import check_genes, check_int, check_number, check_seed
from . import _signals
from ._profiles import load_profiles

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

HE_TRANSFORMS = ("identity", "scale", "affine")
DEFAULT_HE_SCALE = {"identity": 1.0, "scale": 0.5, "affine": 0.8}
AFFINE_ROTATION_DEG = 4.0
AFFINE_SHIFT = (3.3, -2.1)  # labels pixels, added to the centring translation


def _resolve_cell_types(cell_types: Sequence[str] | None) -> list[str]:
    valid = list(XENIUM_BREAST_CELL_TYPES)
    if cell_types is None:
        return valid
    if isinstance(cell_types, str):
        cell_types = [cell_types]
    cell_types = list(cell_types)
    if not cell_types:
        raise ValueError(f"`cell_types` is empty; expected a non-empty subset of {valid}.")
    unknown = [t for t in cell_types if t not in valid]
    if unknown:
        raise ValueError(f"`cell_types` has unknown types {unknown}; expected a subset of {valid}.")
    if len(set(cell_types)) != len(cell_types):
        raise ValueError(f"`cell_types` lists a type more than once: {cell_types}.")
    return cell_types


def _resolve_type_weights(type_weights: Mapping[str, float] | None) -> dict[str, float]:
    if type_weights is None:
        return {}
    valid = list(XENIUM_BREAST_CELL_TYPES)
    unknown = [t for t in type_weights if t not in valid]
    if unknown:
        raise ValueError(f"`type_weights` has unknown types {unknown}; expected keys among {valid}.")
    bad = {t: w for t, w in type_weights.items() if not (np.isfinite(w) and w > 0)}
    if bad:
        raise ValueError(f"`type_weights` must be finite and > 0, got {bad}.")
    return {str(t): float(w) for t, w in type_weights.items()}


def _select_genes(n_genes: int | None) -> list[str]:
    prof = load_profiles()
    if n_genes is None:
        return list(prof.genes)
    check_int("n_genes", n_genes, 1, maximum=len(prof.genes))
    top = np.sort(prof.variable_genes()[:n_genes])  # the most variable genes, in panel order
    return [prof.genes[i] for i in top]


def _he_matrix(he_transform: str, image_size: int, he_scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """3 x 3 matrix mapping H&E pixel coordinates (x, y, 1) to labels pixel coordinates, and the H&E shape."""
    n = image_size
    if he_transform == "identity":
        return np.eye(3), (n, n)
    if he_transform == "scale":
        m = round(n / he_scale)
        return np.diag([n / m, n / m, 1.0]), (m, m)
    theta = np.deg2rad(AFFINE_ROTATION_DEG)
    rot = he_scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = int(np.ceil(n * (abs(np.cos(theta)) + abs(np.sin(theta))) / he_scale)) + 2
    shift = np.array([n / 2 + AFFINE_SHIFT[0], n / 2 + AFFINE_SHIFT[1]]) - rot @ np.array([m / 2, m / 2])
    mat = np.eye(3)
    mat[:2, :2] = rot
    mat[:2, 2] = shift
    return mat, (m, m)


def _assign_counts(
    rng: np.random.Generator, type_idx: np.ndarray, area: np.ndarray, gene_idx: np.ndarray, thinning: float
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Draw a real Xenium cell of the same type for every synthetic cell; bigger nuclei get bigger real cells."""
    prof = load_profiles()
    source = np.empty(len(type_idx), np.int64)
    for t in np.unique(type_idx):
        cells = np.flatnonzero(type_idx == t)
        pool = np.flatnonzero(prof.cell_type == t)
        drawn = rng.choice(pool, size=len(cells), replace=True)
        drawn = drawn[np.argsort(prof.nucleus_area[drawn] + rng.uniform(0, 1e-3, len(drawn)), kind="stable")]
        log_area = np.log(np.maximum(area[cells], 1))
        noisy = log_area + rng.normal(0, 1.0, len(cells)) * max(log_area.std(), 0.05)
        source[cells[np.argsort(noisy, kind="stable")]] = drawn
    counts = prof.counts[source][:, gene_idx].tocsr()
    if thinning < 1:
        counts.data = rng.binomial(counts.data, thinning)
        counts.eliminate_zeros()
    counts = counts.astype(np.float32)
    counts.sort_indices()
    return counts, source


def _is_real(value: object) -> bool:
    """A real number that is not a bool: ``True`` is an int to Python but never a meant size or share."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


@renamed_arguments(he_transform="image_transform", he_scale="image_scale")
def synthetic(
    *,
    image_size: int = 1024,
    n_genes: int | None = None,
    cell_types: Sequence[str] | None = None,
    type_weights: Mapping[str, float] | None = None,
    pixel_size: float = 0.5,
    image_transform: Literal["identity", "scale", "affine"] = "identity",
    image_scale: float | None = None,
    n_cells: int | None = None,
    thinning: float = 0.9,
    signals: str | Sequence[str] | None = None,
    signal_strength: float = 1.0,
    seed: int = 0,
) -> SpatialData:
    """Synthetic breast-cancer-like H&E with nucleus labels and Xenium-like single-cell expression.

    Runs offline and is deterministic given ``seed``. The tissue is laid out in continuous micron coordinates:
    tumour nests of large pleomorphic vesicular malignant nuclei with nucleoli; collagen stroma whose fibres wrap
    around the nests, with elongated fibroblasts aligned to them and immune cells that are denser near tumour;
    lymphoid aggregates (B-cell rich core, small round dark T cells around, plasma cells with eccentric clock-face
    nuclei at the rim); ducts lined by regular oval epithelial nuclei around a lumen; vessels lined by thin curved
    endothelial nuclei with red blood cells inside; fat with empty adipocytes. Macrophages have pale kidney-shaped
    nuclei in foamy cytoplasm, myeloid cells small lobulated dark nuclei. Nuclei are placed on the labels grid
    without touching; the H&E is then rendered by Beer-Lambert mixing of hematoxylin and eosin through the
    H&E's own pixel grid (which may be scaled or rotated relative to the labels), with slow stain variation across
    the slide, slight blur and noise.

    Each cell's counts are those of a real cell of the same type from the 10x Genomics Xenium breast cancer
    preview (In Situ Sample 2, CC BY 4.0, as processed for the GHIST paper's demo), drawn at random with
    bigger nuclei tending to get cells with bigger nuclei (and libraries), then binomially thinned. Within a type,
    a cell's counts then carry little that its image shows, so that predicting each type's mean expression is
    nearly as good as any model can do. ``signals`` adds what a model can learn beyond types: per-cell latents
    that the H&E shows, each driving a few genes (Poisson extra counts, thinned like the rest, added to the real
    cell's counts, so count noise stays):

    - ``"proliferation"``: cycling cells (45% of malignant cells, 15% of B, 12% of T, a few percent of the
      others) have nuclei up to 1.6 times bigger, darker, with coarse chromatin granules; they express MKI67,
      TOP2A, CENPF and PCLAF. Latent: 0 for resting cells, 0.25-1 along the cycle.
    - ``"hypoxia"``: depth into a tumour nest (smoothstep of the distance to stroma, saturating at 22 microns);
      hypoxic malignant cells have more eosinophilic cytoplasm and express NDUFA4L2, STC1 and PDK4.
    - ``"neighbourhood"``: ``1 - exp(-n / 2)`` of the ``n`` immune nuclei (T, B, plasma, macrophage, myeloid)
      within 15 microns; malignant cells express CD274, PDCD1LG2, WARS and SERPINB9 with it (interferon-gamma
      response). So that it is not just the nest border, some patches of the nests are infiltrated by T cells and
      macrophages (the proposals' types change there, not the layout).

    Turning signals on keeps the tissue layout of the seed; with signals off (the default) the output is
    exactly what it was before signals existed.

    Parameters
    ----------
    image_size
        Side of the square labels image, in pixels.
    n_genes
        Number of genes. ``None``: the whole 280-gene panel; ``k``: the ``k`` most variable genes (in panel order).
    cell_types
        Cell types to generate, a subset of :data:`ghist._constants.XENIUM_BREAST_CELL_TYPES`, in the order of the
        categories of ``obs["cell_type"]`` (default: all nine). Every compartment draws its cells from its own mix
        of types restricted to these; compartments made only of excluded types (e.g. ducts without
        ``"Epithelial"``) stay empty.
    type_weights
        Relative weights (> 0) of cell types, multiplying each type's share wherever a compartment mixes several
        types (stroma, lymphoid aggregates, immune cells in tumour nests); unnamed types keep weight 1. Single-type
        compartments (tumour nests, ducts, vessel walls) are unchanged. Used to vary composition between slides.
    pixel_size
        Microns per labels pixel; sets the ``"microns"`` coordinate system and how many cells fit in the image.
    image_transform
        How the H&E pixel grid relates to the labels (``"global"`` coordinate system):
        ``"identity"``: the same grid; ``"scale"``: a ``Scale`` (H&E pixels ``image_scale`` times the labels
        pixels, default 0.5, i.e. twice finer); ``"affine"``: an ``Affine`` made of a 4 degree rotation, a scale
        (``image_scale``, default 0.8) and a translation, with an H&E large enough to cover the whole labels image.
    image_scale
        Size of an H&E pixel in labels pixels; default depends on ``image_transform`` (see there).
    n_cells
        Keep only this many labelled cells, chosen at random (the others are not drawn at all). ``None`` keeps
        every cell that fits; a warning is given if fewer than ``n_cells`` fit.
    thinning
        Binomial thinning probability applied to the real counts (1 keeps them unchanged).
    signals
        Within-type signals to add: ``"all"``, one name, or a subset of ``("proliferation", "hypoxia",
        "neighbourhood")`` (see above); ``None``: none. Each needs at least one of its genes among the selected ones.
    signal_strength
        Multiplies the extra counts of the driven genes (at latent 1 and strength 1: 3-8 counts per gene, before
        thinning); the image cues do not change with it. In ``(0, 10]``; only with ``signals``.
    seed
        Random seed: the same seed gives identical arrays, another seed another tissue layout.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with

    - ``images["he"]``: H&E, RGB ``uint8``, dims ``(c, y, x)``;
    - ``labels["nuclei"]``: ``int32`` nucleus ids ``1..n``, 0 = background;
    - ``tables["table"]``: raw counts (CSR ``float32``, integer values) of every labelled nucleus, annotating
      ``"nuclei"`` through ``obs["region"]`` and ``obs["cell_id"]`` (the label id); ``obs["cell_type"]``
      (categorical); ``obsm["spatial"]``: nucleus centroids ``(x, y)`` in labels pixels (pixel ``(i, j)`` has its
      centre at ``(j + 0.5, i + 0.5)``, as in :func:`spatialdata.get_centroids`); ``uns["synthetic"]``: the
      settings (seed, pixel size, transform, ...). With ``signals``: one ``obs`` column per signal holding each
      cell's latent in ``[0, 1]`` (``obs["proliferation"]``, ...), and ``uns["synthetic"]["signals"][name]``: the
      ``genes`` it drives, the ``cell_types`` that respond, ``extra_counts_at_1`` (mean extra counts per gene at
      latent 1, before thinning) and a ``description``; ``uns["synthetic"]["signal_strength"]``.

    Both elements have the coordinate systems ``"global"`` (labels pixels) and ``"microns"``.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(image_size=256, n_genes=50, seed=1)
    >>> sdata["table"].n_vars
    50

    Cells whose image tells more than their type: score a model on the driven genes, against the latents.

    >>> sdata = ghist.datasets.synthetic(image_size=256, signals="all", seed=1)
    >>> table = sdata["table"]
    >>> table.uns["synthetic"]["signals"]["proliferation"]["genes"]
    ['MKI67', 'TOP2A', 'CENPF', 'PCLAF']
    >>> float(table.obs["proliferation"].max()) <= 1.0
    True

    """
    check_int("image_size", image_size, 16)
    check_number("pixel_size", pixel_size)  # µm per labels pixel
    if image_transform not in HE_TRANSFORMS:
        raise ValueError(f"`image_transform` must be one of {list(HE_TRANSFORMS)}, got {image_transform!r}.")
    if image_transform == "identity" and image_scale not in (None, 1, 1.0):
        raise ValueError(
            f"`image_scale` must be None with image_transform='identity', got {image_scale!r}; use 'scale'."
        )
    if image_scale is None:
        image_scale = DEFAULT_HE_SCALE[image_transform]
    if not _is_real(image_scale) or not np.isfinite(image_scale) or not 0.2 <= image_scale <= 5:
        raise ValueError(f"`image_scale` must be between 0.2 and 5 labels pixels per H&E pixel, got {image_scale!r}.")
    check_int("n_cells", n_cells, 1, optional=True)
    if not (_is_real(thinning) and 0 < thinning <= 1):
        raise ValueError(f"`thinning` must be in (0, 1], got {thinning!r}.")
    check_seed(seed)
    # The tissue generator (scipy.ndimage) and SpatialData load here, not on ``import ghist``.
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, TableModel
    from spatialdata.transformations import Affine, Identity, Scale

    from . import _tissue

    types = _resolve_cell_types(cell_types)
    weights = _resolve_type_weights(type_weights)
    genes = _select_genes(n_genes)
    signals = _signals.resolve_signals(signals, signal_strength, genes)
    start = time.perf_counter()
    image_size = int(image_size)

    rng_layout, rng_place, rng_keep, rng_paint, rng_render, rng_expr = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)
    )
    # The signals draw from a seventh stream, so that turning them on leaves the other six (the layout) as they are.
    rng_signal = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(7)[6])
    ps = float(pixel_size)
    he_mat, he_shape = _he_matrix(image_transform, image_size, float(image_scale))
    to_um = np.diag([ps, ps, 1.0])
    he_frame = _tissue.Frame(he_shape, to_um @ he_mat)
    # The field grid: labels pixels, extended to cover the H&E.
    fx0, fy0, fx1, fy1 = _tissue.Frame(he_shape, he_mat).footprint()
    ox, oy = min(int(np.floor(fx0)), 0), min(int(np.floor(fy0)), 0)
    ex, ey = max(int(np.ceil(fx1)), image_size), max(int(np.ceil(fy1)), image_size)
    shift = np.eye(3)
    shift[:2, 2] = (ox, oy)
    field = _tissue.Frame((ey - oy, ex - ox), to_um @ shift)

    tissue, cand = _tissue.build_tissue(rng_layout, field)
    allowed = np.isin(np.array(XENIUM_BREAST_CELL_TYPES), types) * np.array(
        [weights.get(t, 1.0) for t in XENIUM_BREAST_CELL_TYPES]
    )
    if "neighbourhood" in signals:
        _signals.inflame_nests(rng_signal, tissue, cand)
    adjust = _signals.proliferation_adjuster(rng_signal) if "proliferation" in signals else None
    nuc, occ = _tissue.place_nuclei(rng_place, tissue, cand, allowed, adjust=adjust)

    # Labels: the part of the field grid under the labels image; drop slivers of nuclei cut by its border.
    crop = (slice(-oy, -oy + image_size), slice(-ox, -ox + image_size))
    full_area = np.bincount(occ.ravel(), minlength=len(nuc) + 1)[1:]
    inside = np.bincount(occ[crop].ravel(), minlength=len(nuc) + 1)[1:]
    labelled = (inside >= 4) & (inside >= 0.25 * full_area)
    if not labelled.any():
        raise ValueError(
            f"No cell of types {types} fits in a {image_size} px image with seed {seed}; "
            "use a larger `image_size`, more `cell_types` or another `seed`."
        )
    if n_cells is not None:
        idx = np.flatnonzero(labelled)
        if len(idx) < n_cells:
            warnings.warn(
                f"Only {len(idx)} cells fit in a {image_size} px image; returning {len(idx)} instead of "
                f"n_cells={n_cells}. Use a larger `image_size` for more cells.",
                UserWarning,
                stacklevel=2,
            )
        else:
            drop = rng_keep.choice(idx, size=len(idx) - n_cells, replace=False)
            exists = np.ones(len(nuc), bool)
            exists[drop] = False
            remap = np.zeros(len(nuc) + 1, np.int32)
            remap[1:][exists] = np.arange(1, exists.sum() + 1)
            occ = remap[occ]
            nuc, labelled = nuc.subset(exists), labelled[exists]
    if signals:
        _signals.context_latents(tissue, nuc, signals)
    _tissue.paint_background(rng_paint, tissue, nuc, occ)
    he = _tissue.render_he(rng_render, tissue, nuc, he_frame)

    lut = np.zeros(len(nuc) + 1, np.int32)
    lut[1:][labelled] = np.arange(1, labelled.sum() + 1, dtype=np.int32)
    labels = lut[occ[crop]]
    n = int(labelled.sum())
    cell_type_idx = nuc.cell_type[labelled]

    # Centroids (x, y) in labels pixels by the one centroid rule; every labelled nucleus keeps pixels (ids 1..n).
    nuclei = label_centroids(labels)
    area = nuclei.area

    prof = load_profiles()
    gene_idx = np.array([prof.genes.index(g) for g in genes])
    counts, _ = _assign_counts(rng_expr, cell_type_idx, area * ps**2, gene_idx, float(thinning))
    latents = {name: nuc.signal[name][labelled].astype(np.float64) for name in signals}
    if signals:
        counts, signal_record = _signals.drive_counts(
            rng_signal, counts, genes, cell_type_idx, latents, float(signal_strength), float(thinning)
        )

    names = np.array(XENIUM_BREAST_CELL_TYPES)[cell_type_idx]
    obs = pd.DataFrame(
        {
            INSTANCE_KEY: np.arange(1, n + 1, dtype=np.int64),
            REGION_KEY: pd.Categorical([LABELS_KEY] * n, categories=[LABELS_KEY]),
            CELL_TYPE_KEY: pd.Categorical(names, categories=types),
        },
        index=pd.Index([f"cell_{i}" for i in range(1, n + 1)]),
    )
    for name, latent in latents.items():
        obs[name] = latent
    table = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    table.obsm[SPATIAL_KEY] = nuclei.xy
    table.uns[SYNTHETIC_UNS_KEY] = {
        "seed": int(seed),
        "pixel_size": ps,
        "image_size": image_size,
        "he_transform": image_transform,
        "he_scale": float(np.sqrt(abs(np.linalg.det(he_mat[:2, :2])))),
        "he_rotation_deg": AFFINE_ROTATION_DEG if image_transform == "affine" else 0.0,
        "cell_types": list(types),
        "type_weights": weights,
        "n_genes": len(genes),
        "thinning": float(thinning),
        "source": "10x Genomics Xenium human breast cancer preview, In Situ Sample 2 (CC BY 4.0)",
    }
    if signals:  # only then, so that the default table stays as it was
        table.uns[SYNTHETIC_UNS_KEY]["signals"] = signal_record
        table.uns[SYNTHETIC_UNS_KEY]["signal_strength"] = float(signal_strength)
    table = TableModel.parse(table, region=LABELS_KEY, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    microns = Scale([ps, ps], axes=("y", "x"))
    labels_el = Labels2DModel.parse(
        labels, dims=("y", "x"), transformations={GLOBAL_CS: Identity(), MICRONS_CS: microns}
    )
    if image_transform == "identity":
        he_global = Identity()
    elif image_transform == "scale":
        he_global = Scale([he_mat[1, 1], he_mat[0, 0]], axes=("y", "x"))
    else:
        he_global = Affine(he_mat, input_axes=("x", "y"), output_axes=("x", "y"))
    he_microns = Affine(to_um @ he_mat, input_axes=("x", "y"), output_axes=("x", "y"))
    if image_transform != "affine":
        he_microns = Scale([ps * he_mat[1, 1], ps * he_mat[0, 0]], axes=("y", "x"))
    image_el = Image2DModel.parse(
        he,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={GLOBAL_CS: he_global, MICRONS_CS: he_microns},
    )
    logger.info(
        "Synthetic tissue: %d labelled cells (%d nuclei drawn), %d genes, H&E %s, in %.1f s",
        n,
        len(nuc),
        len(genes),
        he_shape,
        time.perf_counter() - start,
    )
    return SpatialData(images={IMAGE_KEY: image_el}, labels={LABELS_KEY: labels_el}, tables={TABLE_KEY: table})


def synthetic_reference(
    *,
    n_cells_per_type: int = 200,
    genes: Sequence[str] | None = None,
    cell_types: Sequence[str] | None = None,
    library_size: float = 600.0,
    dispersion: float = 3.0,
    seed: int = 0,
) -> AnnData:
    """Single-cell-RNA-seq-like reference for the synthetic cell types.

    For each type, counts are negative-binomial draws around a profile mixing the type's mean Xenium profile with
    that of a random real cell of the type (within-type variety), distorted by a gene-wise platform bias
    (log-normal, the same for all cells) and scaled to a library size unlike Xenium's.

    Parameters
    ----------
    n_cells_per_type
        Cells generated per type.
    genes
        Genes (columns), a subset of the 280-gene panel; default the whole panel.
    cell_types
        Types to generate (default all of :data:`ghist._constants.XENIUM_BREAST_CELL_TYPES`), in category order.
    library_size
        Median total counts per cell over the panel.
    dispersion
        Negative-binomial inverse dispersion (larger = closer to Poisson).
    seed
        Random seed.

    Returns
    -------
    AnnData with raw counts (CSR ``float32``, integer values) in ``X``, ``obs["cell_type"]`` (categorical) and the
    settings in ``uns["synthetic"]``.

    Examples
    --------
    >>> import ghist
    >>> ref = ghist.datasets.synthetic_reference(n_cells_per_type=10)
    >>> ref.shape
    (90, 280)

    """
    check_int("n_cells_per_type", n_cells_per_type, 1)
    check_number("library_size", library_size)
    check_number("dispersion", dispersion)
    check_seed(seed)
    prof = load_profiles()
    genes = check_genes(list(prof.genes), genes, where="the packaged Xenium breast panel")
    types = _resolve_cell_types(cell_types)
    gene_idx = np.array([prof.genes.index(g) for g in genes])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))

    bias = np.exp(rng.normal(0, 0.6, len(prof.genes)))
    type_mean = prof.type_mean()
    blocks = []
    for name in types:
        t = XENIUM_BREAST_CELL_TYPES.index(name)
        pool = np.flatnonzero(prof.cell_type == t)
        real = np.asarray(prof.counts[rng.choice(pool, n_cells_per_type)].todense(), dtype=np.float64)
        real = (real + 0.05) / (real + 0.05).sum(1, keepdims=True)
        mean = type_mean[t] / type_mean[t].sum()
        frac = (0.6 * mean + 0.4 * real) * bias
        frac /= frac.sum(1, keepdims=True)
        lib = library_size * np.exp(rng.normal(0, 0.35, (n_cells_per_type, 1)))
        mu = (lib * frac)[:, gene_idx]
        blocks.append(rng.poisson(rng.gamma(dispersion, mu / dispersion)))
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    obs = pd.DataFrame(
        {CELL_TYPE_KEY: pd.Categorical(np.repeat(types, n_cells_per_type), categories=types)},
        index=pd.Index([f"ref_{i}" for i in range(X.shape[0])]),
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.uns[SYNTHETIC_UNS_KEY] = {
        "seed": int(seed),
        "n_cells_per_type": int(n_cells_per_type),
        "library_size": float(library_size),
        "dispersion": float(dispersion),
        "cell_types": list(types),
    }
    return adata
