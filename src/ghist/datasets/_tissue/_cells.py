"""Cell proposals: where the nuclei of each compartment go and which types they may be.

Cells are proposed on jittered hexagonal lattices, whose spacing sets the packing of each compartment (tight
sheets in tumour nests, dense small cells in lymphoid aggregates, looser stroma), plus uniform random points that
add single immune cells. Each proposal carries a distribution over cell types that depends on where it lies, so
that context (distance to tumour, aggregate core or rim) predicts the type as it does in real tissue.
"""

from __future__ import annotations

import numpy as np

from ._nuclei import MALIGNANT, SIZE
from ._structures import AGGREGATE, FAT, STROMA, TUMOUR, Candidates, Sketch, Tissue, mix, onehot


def propose_cells(sk: Sketch, tissue: Tissue, cand: Candidates, aggregates: list[tuple[float, float, float]]) -> None:
    """Propose the nuclei of tumour nests, lymphoid aggregates and stroma, in this order.

    Parameters
    ----------
    sk
        The finished tissue map, with the layout's random generator.
    tissue
        The same map with its stroma fibres, which orient the stromal cells.
    cand
        Proposals so far (ducts, vessels); one block is appended per group of cells.
    aggregates
        ``(x, y, radius)`` of each lymphoid aggregate, in microns.

    """
    _tumour_sheets(sk, cand)
    _aggregate_cells(sk, cand, aggregates)
    _nest_infiltrate(sk, cand)
    _stromal_cells(sk, tissue, cand, aggregates)
    _stromal_infiltrate(sk, cand)


def _tumour_sheets(sk: Sketch, cand: Candidates) -> None:
    """Tumour nests: cohesive sheets of malignant cells on a wide lattice (big nuclei)."""
    rng = sk.rng
    lx, ly = hex_lattice(rng, sk.box, SIZE * 11.9, 1.0)
    sel = sk.region_at(lx, ly) == TUMOUR
    cand.add(lx[sel], ly[sel], rng.uniform(0, np.pi, sel.sum()), onehot(MALIGNANT), retries=3)


def _aggregate_cells(sk: Sketch, cand: Candidates, aggregates: list[tuple[float, float, float]]) -> None:
    """Lymphoid aggregates: a dense lattice of small round cells, B cells in the core and T cells at the rim."""
    rng = sk.rng
    lx, ly = hex_lattice(rng, sk.box, SIZE * 7.2, 0.5)
    sel = sk.region_at(lx, ly) == AGGREGATE
    lx, ly = lx[sel], ly[sel]
    if len(aggregates):
        a_ = np.array(aggregates)
        rnorm = (np.hypot(lx[:, None] - a_[:, 0], ly[:, None] - a_[:, 1]) / a_[:, 2]).min(1)
    else:
        rnorm = np.ones(len(lx))
    core = np.clip((0.75 - rnorm) / 0.25, 0, 1)[:, None]
    probs = core * mix(B=0.72, T=0.22, Macrophage=0.06) + (1 - core) * mix(
        T=0.84, B=0.08, Macrophage=0.04, Myeloid=0.04
    )
    cand.add(lx, ly, rng.uniform(0, np.pi, len(lx)), probs, retries=3)


def _nest_infiltrate(sk: Sketch, cand: Candidates) -> None:
    """Immune cells scattered through the tumour nests, filling gaps between malignant cells."""
    rng = sk.rng
    px, py = sk.free_points(int(sk.area / 900), lambda px, py: sk.region_at(px, py) == TUMOUR)
    cand.add(px, py, rng.uniform(0, np.pi, len(px)), mix(T=0.6, Macrophage=0.4))


def _stromal_cells(sk: Sketch, tissue: Tissue, cand: Candidates, aggregates: list[tuple[float, float, float]]) -> None:
    """Stroma and fat: fibroblasts along the fibres, and an immune mix that depends on the neighbourhood.

    Stroma is denser and more inflamed (T cells, macrophages) near tumour, mostly fibroblasts far from it, and rich
    in plasma cells around lymphoid aggregates; fat keeps only a few cells.
    """
    rng = sk.rng
    px, py = hex_lattice(rng, sk.box, SIZE * 7.2, 0.8)
    sel = np.isin(sk.region_at(px, py), (STROMA, FAT))
    px, py = px[sel], py[sel]
    d = sk.dist_at(px, py)
    dens = 0.8 + 0.2 * np.exp(-d / 30.0)
    is_fat = sk.region_at(px, py) == FAT
    dens = np.where(is_fat, 0.03, dens)
    keep = rng.uniform(0, 1, len(px)) < dens
    px, py, d = px[keep], py[keep], d[keep]
    near = np.exp(-d / 25.0)[:, None]
    far = mix(Fibroblast=0.38, T=0.28, Macrophage=0.16, Plasma=0.06, Myeloid=0.06, B=0.03, Endothelial=0.03)
    close = mix(T=0.55, Macrophage=0.28, Fibroblast=0.07, Plasma=0.04, Myeloid=0.06)
    probs = near * close + (1 - near) * far
    if len(aggregates):
        a_ = np.array(aggregates)
        rn = (np.hypot(px[:, None] - a_[:, 0], py[:, None] - a_[:, 1]) / a_[:, 2]).min(1)
        halo = np.exp(-np.clip(rn - 1, 0, None) / 0.25)[:, None]
        probs = (1 - 0.6 * halo) * probs + 0.6 * halo * mix(Plasma=0.45, B=0.2, T=0.35)
    angle = tissue.lookup("fibre_angle", px, py) + rng.normal(0, 0.12, len(px))
    cand.add(px, py, angle, probs, retries=3)


def _stromal_infiltrate(sk: Sketch, cand: Candidates) -> None:
    """Lymphocytes and macrophages filling the gaps left between stromal cells."""
    rng = sk.rng
    px, py = sk.free_points(int(sk.area / 70), lambda px, py: sk.region_at(px, py) == STROMA)
    cand.add(px, py, rng.uniform(0, np.pi, len(px)), mix(T=0.7, Macrophage=0.12, Plasma=0.06, Myeloid=0.06, B=0.06))


def hex_lattice(
    rng: np.random.Generator, box: tuple[float, float, float, float], spacing: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Points of a randomly rotated hexagonal lattice covering ``box`` (plus ``spacing``), jittered by ``jitter``."""
    x0, y0, x1, y1 = box
    pad = 2 * spacing
    theta = rng.uniform(0, np.pi / 3)
    diag = np.hypot(x1 - x0, y1 - y0) / 2 + pad
    n = int(np.ceil(diag / spacing)) + 1
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    u = (i + 0.5 * (j % 2)) * spacing
    v = j * spacing * np.sqrt(3) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x = cx + np.cos(theta) * u - np.sin(theta) * v + rng.normal(0, jitter, u.shape)
    y = cy + np.sin(theta) * u + np.cos(theta) * v + rng.normal(0, jitter, u.shape)
    keep = (x >= x0 - spacing) & (x <= x1 + spacing) & (y >= y0 - spacing) & (y <= y1 + spacing)
    return x[keep], y[keep]
