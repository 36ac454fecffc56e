"""Within-type signals of :func:`ghist.datasets.synthetic`: per-cell latents the H&E shows, and the genes they drive.

Without them, a cell's counts are those of a random real cell of its type, so that predicting each type's mean
expression is nearly the best any model can do. Each signal adds a per-cell latent in ``[0, 1]`` that the image
carries, and extra counts of a few genes that grow with it:

- ``"proliferation"``: cycling cells (a share that depends on the type, most among malignant cells) have bigger,
  darker nuclei with coarse chromatin granules, and express the cell-cycle genes;
- ``"hypoxia"``: malignant cells deep inside a tumour nest, far from the stroma where the vessels run, have more
  eosinophilic cytoplasm and express hypoxia-induced genes;
- ``"neighbourhood"``: malignant cells with many immune cells (T, B, plasma, macrophage, myeloid) around them
  express interferon-gamma-induced genes (PD-L1 ...).

Extra counts are Poisson draws (thinned like the real counts), added to the real cell's counts: count noise stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .._constants import XENIUM_BREAST_CELL_TYPES

if TYPE_CHECKING:
    from ._tissue._nuclei import Nuclei
    from ._tissue._structures import Candidates, Tissue

SIGNALS = ("proliferation", "hypoxia", "neighbourhood")

# Extra counts at latent 1 (signal_strength 1) for each driven gene: about what a cycling, hypoxic or IFN-gamma
# exposed breast cancer cell shows on a Xenium panel.
SIGNAL_GENES: dict[str, dict[str, float]] = {
    "proliferation": {"MKI67": 4.0, "TOP2A": 8.0, "CENPF": 4.0, "PCLAF": 4.0},
    "hypoxia": {"NDUFA4L2": 5.0, "STC1": 4.0, "PDK4": 3.0},
    "neighbourhood": {"CD274": 4.0, "PDCD1LG2": 3.0, "WARS": 5.0, "SERPINB9": 3.0},
}
SIGNAL_TYPES: dict[str, tuple[str, ...]] = {
    "proliferation": tuple(XENIUM_BREAST_CELL_TYPES),
    "hypoxia": ("Malignant",),
    "neighbourhood": ("Malignant",),
}
# Share of cycling cells per type.
CYCLING = {"B": 0.15, "Myeloid": 0.03, "Endothelial": 0.05, "Fibroblast": 0.05, "Macrophage": 0.05,
           "Malignant": 0.45, "Epithelial": 0.08, "Plasma": 0.03, "T": 0.12}  # fmt: skip
IMMUNE = ("B", "Myeloid", "Macrophage", "Plasma", "T")
HYPOXIA_DEPTH_UM = 22.0  # depth into a nest (microns from the stroma) where hypoxia saturates
HOT_PATCH_UM = 30.0  # correlation length of the immune-rich patches of the nests
HOT_SHARE = 0.6  # share of a nest's proposals that become immune cells where the patch is hottest
NEIGHBOUR_RADIUS_UM = 15.0  # centre-to-centre radius within which immune neighbours count
NEIGHBOUR_SCALE = 2.0  # neighbourhood latent = 1 - exp(-immune neighbours / NEIGHBOUR_SCALE)
DESCRIPTION = {
    "proliferation": "cycling cells: bigger, darker nuclei with coarse chromatin granules",
    "hypoxia": "depth into a tumour nest (distance to stroma); hypoxic cells have more eosinophilic cytoplasm",
    "neighbourhood": f"immune nuclei within {NEIGHBOUR_RADIUS_UM:g} microns (1 - exp(-n / {NEIGHBOUR_SCALE:g}))",
}


def resolve_signals(signals: str | Sequence[str] | None, strength: object, genes: Sequence[str]) -> tuple[str, ...]:
    """Checked signal names, in :data:`SIGNALS` order; ``()`` for none."""
    if signals is None:
        names: list[str] = []
    elif isinstance(signals, str):
        names = list(SIGNALS) if signals == "all" else [signals]
    else:
        names = list(signals)
    bad = [s for s in names if not isinstance(s, str) or s not in SIGNALS]
    if bad:
        raise ValueError(f"`signals` has unknown signals {bad}; expected 'all' or a subset of {list(SIGNALS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`signals` lists a signal more than once: {names}.")
    ok = isinstance(strength, int | float | np.integer | np.floating) and not isinstance(strength, bool | np.bool_)
    if not (ok and np.isfinite(strength) and 0 < strength <= 10):
        raise ValueError(f"`signal_strength` must be a number in (0, 10], got {strength!r}.")
    if not names and strength != 1:
        raise ValueError(f"`signal_strength={strength!r}` has no effect without `signals`; pass signals=... too.")
    for name in names:
        if not set(SIGNAL_GENES[name]) & set(genes):
            raise ValueError(
                f"Signal {name!r} drives {sorted(SIGNAL_GENES[name])}, none of which is among the {len(genes)} "
                "selected genes; use a larger `n_genes` (or None) or drop the signal."
            )
    return tuple(s for s in SIGNALS if s in names)


def proliferation_adjuster(rng: np.random.Generator) -> Callable[[Nuclei], None]:
    """Edit nuclei in place: cycling ones (latent ``> 0``) get bigger, darker, with coarse chromatin granules."""
    from ._tissue._nuclei import N_CLUMPS

    def adjust(nuc: Nuclei) -> None:
        n = len(nuc)
        share = np.array([CYCLING[XENIUM_BREAST_CELL_TYPES[t]] for t in nuc.cell_type]) if n else np.zeros(0)
        cycling = rng.uniform(0, 1, n) < share
        p = np.where(cycling, rng.uniform(0.25, 1.0, n), 0.0)
        scale = 1 + 0.28 * p  # a G2 nucleus holds twice the DNA: about 1.6 times the area at p = 1
        nuc.a *= scale
        nuc.b *= scale
        nuc.H *= 1 + 0.45 * p  # hyperchromatic
        nuc.interior = np.maximum(nuc.interior, 0.6 * p + (1 - p) * nuc.interior)
        nuc.fine = nuc.fine + 0.12 * p
        granules = 0.9 * p[:, None] * rng.uniform(0.6, 1.0, (n, N_CLUMPS))
        nuc.clump_amp = np.where(cycling[:, None], np.maximum(nuc.clump_amp, granules), nuc.clump_amp)
        nuc.clump_sigma = np.where(cycling, np.minimum(nuc.clump_sigma, 0.45), nuc.clump_sigma)
        nuc.signal["proliferation"] = p

    return adjust


def inflame_nests(rng: np.random.Generator, tissue: Tissue, cand: Candidates) -> None:
    """Turn some tumour-sheet proposals into lymphocytes and macrophages, in patches ("hot" parts of the nests).

    Without this, malignant cells meet immune cells only at the nest border, so that the neighbourhood latent would
    be little more than the opposite of the hypoxia one. Only the proposals' type distributions change: the layout
    and the placement draws stay those of the seed.
    """
    from ._tissue._frame import coarse_field
    from ._tissue._nuclei import MALIGNANT
    from ._tissue._structures import mix

    hot = coarse_field(rng, tissue.frame, HOT_PATCH_UM)
    infiltrate = mix(T=0.75, Macrophage=0.25)
    h, w = tissue.frame.shape
    for k, probs in enumerate(cand.probs):
        if not len(probs) or not np.all(probs[:, MALIGNANT] == 1):
            continue
        col, row = tissue.frame.to_pixels(cand.x[k], cand.y[k])
        f = hot[np.clip(np.rint(row).astype(int), 0, h - 1), np.clip(np.rint(col).astype(int), 0, w - 1)]
        q = HOT_SHARE * np.clip(f / 1.5, 0, 1)[:, None]
        cand.probs[k] = (1 - q) * probs + q * infiltrate


def context_latents(tissue: Tissue, nuc: Nuclei, signals: Sequence[str]) -> None:
    """Store the context latents of the placed nuclei in ``nuc.signal`` (and the eosin factor of hypoxic cells)."""
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    from ._tissue._structures import TUMOUR

    mal = nuc.cell_type == XENIUM_BREAST_CELL_TYPES.index("Malignant")
    if "hypoxia" in signals:
        depth = ndi.distance_transform_edt(tissue.region == TUMOUR) * tissue.frame.step
        col, row = tissue.frame.to_pixels(nuc.x, nuc.y)
        h, w = tissue.frame.shape
        d = depth[np.clip(np.rint(row).astype(int), 0, h - 1), np.clip(np.rint(col).astype(int), 0, w - 1)]
        t = np.clip(d / HYPOXIA_DEPTH_UM, 0, 1)
        hyp = t * t * (3 - 2 * t)
        nuc.signal["hypoxia"] = hyp
        nuc.signal["cyto_eosin"] = np.where(mal, 1 + 1.2 * hyp, 1.0)
    if "neighbourhood" in signals:
        immune = np.isin(nuc.cell_type, [XENIUM_BREAST_CELL_TYPES.index(t) for t in IMMUNE])
        xy = np.column_stack([nuc.x, nuc.y])
        n_imm = np.zeros(len(nuc))
        if immune.any() and len(nuc):
            tree = cKDTree(xy[immune])
            n_imm = np.array([len(v) for v in tree.query_ball_point(xy, NEIGHBOUR_RADIUS_UM)], float)
            n_imm -= immune  # an immune cell is not its own neighbour
        nuc.signal["neighbourhood"] = 1 - np.exp(-n_imm / NEIGHBOUR_SCALE)


def drive_counts(
    rng: np.random.Generator,
    counts: sp.csr_matrix,
    genes: Sequence[str],
    cell_type: np.ndarray,
    latents: dict[str, np.ndarray],
    strength: float,
    thinning: float,
) -> tuple[sp.csr_matrix, dict[str, dict]]:
    """Add Poisson extra counts of each signal's genes to responding cells; returns counts and the ``uns`` record."""
    rows, cols, vals = [], [], []
    record: dict[str, dict] = {}
    for name, latent in latents.items():
        types = SIGNAL_TYPES[name]
        responds = np.isin(cell_type, [XENIUM_BREAST_CELL_TYPES.index(t) for t in types])
        driven = {g: a for g, a in SIGNAL_GENES[name].items() if g in genes}
        for gene, amp in driven.items():
            extra = rng.poisson(thinning * strength * amp * latent * responds)
            hit = np.flatnonzero(extra)
            rows.append(hit)
            cols.append(np.full(len(hit), list(genes).index(gene)))
            vals.append(extra[hit])
        record[name] = {
            "genes": list(driven),
            "cell_types": list(types),
            "extra_counts_at_1": {g: float(strength * a) for g, a in driven.items()},
            "description": DESCRIPTION[name],
        }
    if rows:
        extra = sp.csr_matrix(
            (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))), shape=counts.shape
        )
        counts = (counts + extra).tocsr().astype(np.float32)
        counts.sort_indices()
    return counts, record
