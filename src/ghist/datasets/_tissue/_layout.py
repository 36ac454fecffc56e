"""Tissue layout: the compartments of a breast-cancer section, drawn one after the other on the field grid.

:func:`build_tissue` runs the steps below in a fixed order, all drawing from one random generator; the order is part
of the data set (a given seed must always give the same slide), so steps are only ever appended, never reordered.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from . import _cells
from ._frame import Frame, coarse_field, smooth_noise
from ._nuclei import ENDOTHELIAL, EPITHELIAL, SIZE
from ._structures import (
    AGGREGATE,
    DUCT,
    FAT,
    LUMEN,
    STROMA,
    TUMOUR,
    VESSEL,
    Candidates,
    Sketch,
    Tissue,
    onehot,
)


def build_tissue(rng: np.random.Generator, frame: Frame) -> tuple[Tissue, Candidates]:
    """Lay out the compartments of a breast-cancer section on ``frame`` and propose the nuclei of each.

    The section mimics what a Xenium breast panel sees on H&E, so that a model must read morphology and context,
    not just nuclear size, to tell the cell types apart:

    - **tumour nests** (about a third of the area): cohesive sheets of malignant cells with a few infiltrating
      T cells and macrophages;
    - **fat lobules** away from the tumour: empty adipocytes, almost no nuclei;
    - **normal ducts** in the stroma: a lumen lined by a columnar luminal and a flatter basal epithelial layer;
    - **lymphoid aggregates**: a B-cell rich core in a T-cell mantle, with plasma cells around them;
    - **vessels**: winding tubes and capillary cross-sections lined by flat, curved endothelial nuclei;
    - **stroma** everywhere else: fibres wrapping around the nests, fibroblasts aligned with them, and an immune
      infiltrate that is denser near the tumour.

    Nuclei are only *proposed* here (position, orientation, distribution over types);
    :func:`~._placement.place_nuclei` draws their type and shape and keeps those that fit.

    Parameters
    ----------
    rng
        The generator of the layout; the steps draw from it one after the other, always in the same order.
    frame
        The field grid: the labels pixel grid, extended where the H&E reaches beyond it (a scaled or rotated
        H&E), so that the image has tissue wherever it has pixels.

    Returns
    -------
    The region map with its stroma fibre fields, and the proposed nuclei (in blocks, one per :meth:`Candidates.add`).

    """
    sk = Sketch(rng, frame)
    cand = Candidates()
    _tumour_nests(sk)
    _fat_lobules(sk)
    ducts = _ducts(sk, cand)
    aggregates = _lymphoid_aggregates(sk, ducts)
    lumens: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    _vessels(sk, cand, lumens)
    _capillaries(sk, cand, lumens)
    _carve_lumens(sk, lumens)
    tissue = _stroma_fibres(sk, aggregates)
    _cells.propose_cells(sk, tissue, cand, aggregates)
    return tissue, cand


def _tumour_nests(sk: Sketch) -> None:
    """Tumour nests: thresholded smooth noise over about a third of the area; the rest starts as stroma.

    Also sets the distance to tumour, which later steps use to keep ducts, aggregates and fat away from the nests
    and to make the stroma denser and more inflamed near them.
    """
    rng, frame = sk.rng, sk.frame
    h, w = frame.shape
    tumour_f = coarse_field(rng, frame, 22.0) + 0.35 * coarse_field(rng, frame, 9.0)
    tumour = tumour_f > np.quantile(tumour_f, 1 - rng.uniform(0.32, 0.38))
    dist_tumour = ndi.distance_transform_edt(~tumour) * frame.step if tumour.any() else np.full((h, w), 1e3)
    sk.dist_tumour = dist_tumour.astype(np.float32)
    sk.region = np.where(tumour, TUMOUR, STROMA).astype(np.int8)


def _fat_lobules(sk: Sketch) -> None:
    """Fat lobules: smooth blobs over about 4.5% of the area that is more than 20 microns from tumour."""
    fat_f = coarse_field(sk.rng, sk.frame, 45.0)
    far = sk.dist_tumour > 20
    fat = (
        far & (fat_f > np.quantile(fat_f[far], max(1 - 0.045 * far.size / max(far.sum(), 1), 0))) if far.any() else far
    )
    sk.region[fat] = FAT


def _ducts(sk: Sketch, cand: Candidates) -> list[tuple[float, float, float, float, float]]:
    """Normal ducts in the stroma: an elliptic lumen surrounded by two layers of epithelium.

    The luminal layer is columnar (nuclei pointing at the lumen), the basal layer flatter (nuclei along the wall),
    so that epithelial cells are recognised by their arrangement around a lumen as much as by their nuclei.

    Returns
    -------
    One ``(x, y, outer semi-axis a, outer semi-axis b, angle)`` per duct, in microns and radians.

    """
    rng, region, X, Y = sk.rng, sk.region, sk.X, sk.Y
    n_duct = rng.poisson(sk.area / 210.0**2)

    def open_stroma(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        return (sk.region_at(px, py) == STROMA) & (sk.dist_at(px, py) > 16)

    dx_, dy_ = sk.free_points(30 * n_duct + 5, open_stroma)
    ducts = []
    for cx, cy in zip(dx_, dy_):
        if len(ducts) >= n_duct:
            break
        room = float(sk.dist_at(np.array([cx]), np.array([cy]))[0]) - 1.0
        la0 = min(rng.uniform(4, 10), room - 15.5 * SIZE)
        if la0 < 3:
            continue
        lb0 = la0 * rng.uniform(0.6, 1.0)
        ra, rb = la0 + 15.5 * SIZE, lb0 + 15.5 * SIZE
        phi = rng.uniform(0, np.pi)
        if any(np.hypot(cx - p[0], cy - p[1]) < ra + p[2] + 12 for p in ducts):
            continue
        ducts.append((cx, cy, ra, rb, phi))
        c, s = np.cos(phi), np.sin(phi)
        u = c * (X - cx) + s * (Y - cy)
        v = -s * (X - cx) + c * (Y - cy)
        ro = np.hypot(u / ra, v / rb)
        rl = np.hypot(u / la0, v / lb0)
        free = region != TUMOUR
        region[(ro < 1) & free] = DUCT
        region[(rl < 1) & free] = LUMEN
        for depth, spacing, radial in ((4.8 * SIZE, 6.6 * SIZE, True), (12.0 * SIZE, 9.0 * SIZE, False)):
            la, lb = la0 + depth, lb0 + depth
            perim = np.pi * (3 * (la + lb) - np.sqrt((3 * la + lb) * (la + 3 * lb)))
            n_c = max(int(perim / spacing), 3)
            t = np.linspace(0, 2 * np.pi, n_c, endpoint=False) + rng.uniform(0, 2 * np.pi)
            lu, lv = la * np.cos(t), lb * np.sin(t)
            px = cx + c * lu - s * lv + rng.normal(0, 0.4, n_c)
            py = cy + s * lu + c * lv + rng.normal(0, 0.4, n_c)
            nu, nv = np.cos(t) / la, np.sin(t) / lb  # outward normal in the duct's frame
            normal = np.arctan2(s * nu + c * nv, c * nu - s * nv)
            ang = normal if radial else normal + np.pi / 2
            ok = sk.region_at(px, py) == DUCT
            cand.add(px[ok], py[ok], ang[ok] + rng.normal(0, 0.15, ok.sum()), onehot(EPITHELIAL), retries=1)
    return ducts


def _lymphoid_aggregates(
    sk: Sketch, ducts: list[tuple[float, float, float, float, float]]
) -> list[tuple[float, float, float]]:
    """Lymphoid aggregates: roundish patches (22-36 micron radius, ragged edge) of stroma or fat, apart from ducts.

    Their cells (B-cell core, T-cell mantle, plasma-cell halo) are proposed by :func:`~._cells.propose_cells`,
    which needs the centres and radii returned here.

    Returns
    -------
    One ``(x, y, radius)`` per aggregate, in microns.

    """
    rng, frame, X, Y = sk.rng, sk.frame, sk.X, sk.Y
    h, w = frame.shape
    n_agg = rng.poisson(sk.area / 150.0**2)
    ax, ay = sk.free_points(20 * n_agg + 5, lambda px, py: (sk.region_at(px, py) == STROMA) & (sk.dist_at(px, py) > 18))
    aggs = []
    agg_noise = coarse_field(rng, frame, 8.0)
    agg_mask = np.zeros((h, w), bool)
    for cx, cy in zip(ax, ay):
        if len(aggs) >= n_agg:
            break
        radius = rng.uniform(22, 36)
        if any(np.hypot(cx - p[0], cy - p[1]) < radius + p[2] + 15 for p in aggs):
            continue
        if any(np.hypot(cx - p[0], cy - p[1]) < radius + p[2] + 6 for p in ducts):
            continue
        aggs.append((cx, cy, radius))
        rn = np.hypot(X - cx, Y - cy) / radius * (1 + 0.12 * agg_noise)
        agg_mask |= (rn < 1) & np.isin(sk.region, (STROMA, FAT))
    sk.region[agg_mask] = AGGREGATE
    return aggs


def _vessels(sk: Sketch, cand: Candidates, lumens: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Vessels: winding tubes (50-170 microns long) through stroma and fat, lined by flat endothelial nuclei.

    The endothelium alternates between the two walls, each nucleus curved around the lumen. The centre line is
    appended to ``lumens`` as ``(rows, cols, half widths)`` on the field grid for :func:`_carve_lumens`.
    """
    rng, frame = sk.rng, sk.frame
    n_vessel = rng.poisson(sk.area / 120.0**2)
    vx, vy = sk.free_points(10 * n_vessel + 5, lambda px, py: sk.region_at(px, py) == STROMA)
    for cx, cy in list(zip(vx, vy))[:n_vessel]:
        length = rng.uniform(50, 170)
        half_width = rng.uniform(2.5, 6.0)
        n_step = int(length / 1.0)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.05, n_step))
        px = cx + np.cumsum(np.cos(heading))
        py = cy + np.cumsum(np.sin(heading))
        ok = np.isin(sk.region_at(px, py), (STROMA, FAT))
        if ok.mean() < 0.5:
            continue
        c, r = frame.to_pixels(px[ok], py[ok])
        lumens.append((r, c, np.full(ok.sum(), half_width)))
        # Endothelium along both walls, staggered.
        idx = np.arange(rng.integers(0, 5), n_step, 5)
        side = np.where(np.arange(len(idx)) % 2 == 0, 1.0, -1.0)
        nx, ny = -np.sin(heading[idx]), np.cos(heading[idx])
        off = half_width + 1.0
        ex, ey = px[idx] + side * nx * off, py[idx] + side * ny * off
        good = np.isin(sk.region_at(ex, ey), (STROMA, FAT)) & ok[idx]
        cand.add(ex[good], ey[good], heading[idx][good], onehot(ENDOTHELIAL), bend_sign=-side[good], retries=1)


def _capillaries(sk: Sketch, cand: Candidates, lumens: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Capillaries in cross-section: a small lumen (1.8-3.2 micron radius) between two endothelial nuclei."""
    rng, frame = sk.rng, sk.frame
    n_cap = rng.poisson(sk.area / 75.0**2)
    kx, ky = sk.free_points(n_cap, lambda px, py: sk.region_at(px, py) == STROMA)
    for cx, cy in zip(kx, ky):
        radius = rng.uniform(1.8, 3.2)
        c, r = frame.to_pixels(np.array([cx]), np.array([cy]))
        lumens.append((r, c, np.array([radius])))
        phi = rng.uniform(0, 2 * np.pi)
        for side in (1.0, -1.0):
            ex, ey = cx + side * np.cos(phi) * (radius + 1.0), cy + side * np.sin(phi) * (radius + 1.0)
            cand.add(ex, ey, phi + np.pi / 2, onehot(ENDOTHELIAL), bend_sign=-side, retries=1)


def _carve_lumens(sk: Sketch, lumens: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Mark as vessel the stroma and fat within each centre-line point's half width of the nearest point."""
    if not lumens:
        return
    h, w = sk.frame.shape
    sr = np.clip(np.rint(np.concatenate([r for r, _, _ in lumens])).astype(int), 0, h - 1)
    sc = np.clip(np.rint(np.concatenate([c for _, c, _ in lumens])).astype(int), 0, w - 1)
    wd = np.concatenate([wd for _, _, wd in lumens])
    seed_id = np.full((h, w), -1, np.int64)
    seed_id[sr, sc] = np.arange(len(sr))
    dist, (ir, ic) = ndi.distance_transform_edt(seed_id < 0, return_indices=True)
    lumen = dist * sk.frame.step <= wd[seed_id[ir, ic]]
    sk.region[lumen & np.isin(sk.region, (STROMA, FAT))] = VESSEL


def _stroma_fibres(sk: Sketch, aggregates: list[tuple[float, float, float]]) -> Tissue:
    """Stroma fibres that wrap around tumour nests; returns the finished tissue map.

    Orientation and banding come from one potential (distance to tumour plus large-scale noise): fibres run along
    its level lines, so they wrap around the nests and fibroblasts placed along them do too.
    """
    rng, frame = sk.rng, sk.frame
    h, w = frame.shape
    step = frame.step
    psi = 0.8 * np.minimum(sk.dist_tumour, 60) + 22.0 * coarse_field(rng, frame, 35.0)
    gy, gx = np.gradient(psi.astype(np.float64), step)
    fibre_angle = (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)
    wobble = 2.5 * coarse_field(rng, frame, 3.0, step_um=1.0)
    bundles = coarse_field(rng, frame, 6.0, step_um=2.0)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * psi / 2.6 + wobble)
    fibre = np.clip(0.55 + 0.3 * bundles + 0.35 * (stripes - 0.5), 0, 1).astype(np.float32)
    fine = smooth_noise(rng, (h, w), 0.6 / step).astype(np.float32)
    return Tissue(frame=frame, region=sk.region, dist_tumour=sk.dist_tumour, fibre_angle=fibre_angle, fibre=fibre,
                  fine=fine, aggregate_pos=np.array(aggregates).reshape(-1, 3))  # fmt: skip
