"""Stains: background hematoxylin and eosin of each compartment, cytoplasm, red blood cells, and the H&E render."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._frame import Frame, coarse_field, resample, smooth_noise
from ._nuclei import (
    EPITHELIAL,
    MACROPHAGE,
    MALIGNANT,
    MYELOID,
    PLASMA,
    Nuclei,
    local_coords,
    nucleus_window,
    outline_distance,
)
from ._structures import AGGREGATE, DUCT, FAT, LUMEN, STROMA, TUMOUR, VESSEL, Tissue

# from the cytoplasm centre (plasma cells: eccentric nucleus), a pale perinuclear hof, foamy vacuoles.
CYTOPLASM: dict[int, dict[str, float]] = {
    PLASMA: {"r": 1.75, "H": 0.2, "E": 0.3, "offset": 0.45, "hof": 1.0},
    MACROPHAGE: {"r": 1.9, "H": 0.03, "E": 0.2, "foamy": 1.0},
    MYELOID: {"r": 1.7, "H": 0.03, "E": 0.3},
    MALIGNANT: {"r": 1.5, "H": 0.05, "E": 0.22},
    EPITHELIAL: {"r": 1.6, "H": 0.04, "E": 0.24},
}


def paint_background(rng: np.random.Generator, tissue: Tissue, nuc: Nuclei, occ: np.ndarray) -> None:
    """Hematoxylin, eosin and red-blood-cell density outside nuclei, on the field grid."""
    region, fibre, fine = tissue.region, tissue.fibre, tissue.fine
    frame = tissue.frame
    h, w = frame.shape
    step = frame.step
    E = np.zeros((h, w), np.float32)
    H = np.zeros((h, w), np.float32)

    stroma = region == STROMA
    e_str = (0.1 + 0.24 * fibre) * (1 + 0.12 * fine)
    cleft = (fibre < 0.18) & (fine > 0.2)
    e_str = np.where(cleft, 0.3 * e_str, e_str)
    E[stroma] = e_str[stroma]
    H[stroma] = 0.03
    for code, e, hh in ((TUMOUR, 0.15, 0.03), (AGGREGATE, 0.09, 0.05), (DUCT, 0.12, 0.03), (FAT, 0.012, 0.0),
                        (VESSEL, 0.1, 0.0)):  # fmt: skip
        m = region == code
        E[m] = e * (1 + 0.25 * fine[m])
        H[m] = hh
    lumen = region == LUMEN
    E[lumen] = 0.02 + 0.05 * np.clip(coarse_field(rng, frame, 3.0, step_um=1.0)[lumen], 0, None)
    H[lumen] = 0.005

    # Fat: empty adipocytes separated by thin pink membranes.
    fat = region == FAT
    if fat.any():
        n_seed = max(int(fat.sum() * step**2 / (32.0**2)), 1)
        rr, cc = np.nonzero(fat)
        pick = rng.choice(len(rr), size=min(n_seed, len(rr)), replace=False)
        seed = np.zeros((h, w), np.int32)
        seed[rr[pick], cc[pick]] = np.arange(1, len(pick) + 1)
        _, (ir, ic) = ndi.distance_transform_edt(seed == 0, return_indices=True)
        owner = seed[ir, ic]
        edge = np.zeros((h, w), bool)
        edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
        edge[1:, :] |= owner[1:, :] != owner[:-1, :]
        edge = ndi.binary_dilation(edge, iterations=max(round(0.4 / step), 0)) if step < 0.4 else edge
        E[fat & edge] = 0.42
        H[fat & edge] = 0.03

    # Cell borders in tumour nests and ducts: pale lines between neighbouring cells.
    sheet = np.isin(region, (TUMOUR, DUCT))
    if (occ > 0).any():
        _, (ir, ic) = ndi.distance_transform_edt(occ == 0, return_indices=True)
        owner = occ[ir, ic]
        dist_own = np.hypot(ir - np.arange(h)[:, None], ic - np.arange(w)[None, :]) * step
        edge = np.zeros((h, w), bool)
        edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
        edge[1:, :] |= owner[1:, :] != owner[:-1, :]
        border = sheet & edge & (dist_own > 1.5)
        E[border] *= 0.72
        H[border] *= 0.6

    # Cytoplasm of plasma cells, macrophages, myeloid, malignant and epithelial cells.
    dirs = rng.uniform(0, 2 * np.pi, len(nuc))
    vac = np.clip(smooth_noise(rng, (h, w), 0.7 / step), 0, None).astype(np.float32)
    cell_var = np.exp(rng.normal(0, 0.2, len(nuc)))
    for i in np.flatnonzero(np.isin(nuc.cell_type, list(CYTOPLASM))):
        cyto = CYTOPLASM[int(nuc.cell_type[i])]
        rc = cyto["r"] * nuc.a[i]
        off = cyto.get("offset", 0.0) * rc
        cx, cy = nuc.x[i] + off * np.cos(dirs[i]), nuc.y[i] + off * np.sin(dirs[i])
        c, r = frame.to_pixels(np.array([cx]), np.array([cy]))
        rp = rc / step + 2
        r0, r1 = max(int(r[0] - rp), 0), min(int(r[0] + rp) + 2, h)
        c0, c1 = max(int(c[0] - rp), 0), min(int(c[0] + rp) + 2, w)
        if r1 <= r0 or c1 <= c0:
            continue
        rows, cols = np.mgrid[r0:r1, c0:c1]
        x, y = frame.to_microns(cols.astype(float), rows.astype(float))
        dist = np.hypot(x - cx, y - cy)
        wgt = np.clip((rc - dist) / 1.2, 0, 1) * cell_var[i]
        if cyto.get("hof"):  # pale Golgi zone beside the nucleus, towards the cytoplasm
            hx = nuc.x[i] + (nuc.a[i] + 0.9) * np.cos(dirs[i])
            hy = nuc.y[i] + (nuc.a[i] + 0.9) * np.sin(dirs[i])
            wgt = wgt * (1 - 0.75 * np.exp(-((x - hx) ** 2 + (y - hy) ** 2) / (2 * 1.1**2)))
        e_add = cyto["E"] * wgt * (nuc.signal["cyto_eosin"][i] if "cyto_eosin" in nuc.signal else 1.0)
        if cyto.get("foamy"):
            e_add = e_add * (1 - 0.7 * np.clip(vac[r0:r1, c0:c1], 0, 1))
        E[r0:r1, c0:c1] = np.maximum(E[r0:r1, c0:c1], E[r0:r1, c0:c1] * (1 - wgt) + e_add)
        H[r0:r1, c0:c1] = np.maximum(H[r0:r1, c0:c1], cyto["H"] * wgt)

    # Red blood cells filling part of the vessel lumens.
    rbc = np.zeros((h, w), np.float32)
    vessel = region == VESSEL
    if vessel.any():
        rr, cc = np.nonzero(vessel)
        n_rbc = int(vessel.sum() * step**2 * 0.3 / (np.pi * 3.5**2)) + 1
        pick = rng.choice(len(rr), size=min(n_rbc, len(rr)), replace=False)
        rp = 3.8 / step + 1
        for r, c in zip(rr[pick], cc[pick]):
            r0, r1 = max(int(r - rp), 0), min(int(r + rp) + 2, h)
            c0, c1 = max(int(c - rp), 0), min(int(c + rp) + 2, w)
            rows, cols = np.mgrid[r0:r1, c0:c1]
            dist = np.hypot(rows - r, cols - c) * step
            disc = np.clip((3.5 - dist) / 0.6, 0, 1) * (1 - 0.3 * np.exp(-(dist**2) / 2.0))
            rbc[r0:r1, c0:c1] = np.maximum(rbc[r0:r1, c0:c1], disc)
        rbc *= ndi.gaussian_filter(vessel.astype(np.float32), 0.4 / step)
    tissue.eosin, tissue.haem, tissue.rbc = E, H, rbc


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def render_he(rng: np.random.Generator, tissue: Tissue, nuc: Nuclei, frame: Frame) -> np.ndarray:
    """Rasterise the tissue through pixel grid ``frame``: RGB ``uint8`` with dims ``(c, y, x)``."""
    h, w = frame.shape
    step = frame.step

    def sample(img: np.ndarray) -> np.ndarray:
        return resample(img, tissue.frame, frame)

    Ebg, Hbg, rbc = sample(tissue.eosin), sample(tissue.haem), sample(tissue.rbc)
    stain_h = 1 + 0.05 * coarse_field(rng, frame, 90.0, step_um=8.0)
    stain_e = 1 + 0.08 * coarse_field(rng, frame, 90.0, step_um=8.0)

    Hn = np.zeros((h, w), np.float32)
    En = np.zeros((h, w), np.float32)
    A = np.zeros((h, w), np.float32)
    for i in range(len(nuc)):
        win = nucleus_window(nuc, i, frame, pad=step + 0.5)
        if win is None:
            continue
        rs, cs, x, y = win
        u, v = local_coords(nuc, i, x, y)
        d, radius = outline_distance(nuc, i, u, v)
        alpha = np.clip(0.5 - d / step, 0, 1)
        if not alpha.any():
            continue
        s = np.clip((d + radius) / radius, 0, 1)
        chrom = nuc.interior[i] + (1 - nuc.interior[i]) * _smoothstep((s - 0.55) / 0.45)
        grain = np.cos(u[..., None] * nuc.fine_k[i, :, 0] + v[..., None] * nuc.fine_k[i, :, 1] + nuc.fine_phase[i])
        chrom = chrom * (1 + nuc.fine[i] * grain.mean(-1) * 3.0)
        a, b = nuc.a[i], nuc.b[i]
        sig2 = 2 * nuc.clump_sigma[i] ** 2
        for k in np.flatnonzero(nuc.clump_amp[i]):
            cu, cv = nuc.clump_uv[i, k]
            chrom = chrom + nuc.clump_amp[i, k] * np.exp(-((u - a * cu) ** 2 + (v - b * cv) ** 2) / sig2)
        hval = nuc.H[i] * chrom
        eval_ = np.full_like(hval, nuc.E[i])
        for k in np.flatnonzero(nuc.nucleolus_amp[i]):
            cu, cv = nuc.nucleolus_uv[i, k]
            g = nuc.nucleolus_amp[i, k] * np.exp(-((u - a * cu) ** 2 + (v - b * cv) ** 2) / (2 * 0.5**2))
            hval = hval + 0.9 * g
            eval_ = eval_ + 0.6 * g
        Hn[rs, cs] += alpha * hval
        En[rs, cs] += alpha * eval_
        A[rs, cs] += alpha
    A = np.clip(A, 0, 1)
    Ht = (Hbg * (1 - A) + Hn) * stain_h
    Et = (Ebg * (1 - A) + En) * stain_e
    del Hn, En, A, Hbg, Ebg, stain_h, stain_e

    hv = np.array([0.62, 0.74, 0.29]) + rng.normal(0, 0.01, 3)
    ev = np.array([0.08, 0.86, 0.42]) + rng.normal(0, 0.015, 3)
    hv, ev = hv / np.linalg.norm(hv), ev / np.linalg.norm(ev)
    rv = np.array([0.06, 0.45, 0.45])
    hs, es = np.exp(rng.normal(0, 0.03)), np.exp(rng.normal(0, 0.05))
    glass = np.array([0.02, 0.03, 0.015])
    out = np.empty((3, h, w), np.float32)
    sigma = max(0.3 / step, 0.5)
    for ch in range(3):
        od = Ht * (hs * hv[ch]) + Et * (es * ev[ch]) + rbc * rv[ch] + glass[ch]
        img = 255.0 * np.power(10.0, -od, dtype=np.float32)
        img = ndi.gaussian_filter(img, sigma)
        img += rng.normal(0, 2.0, (h, w)).astype(np.float32)
        out[ch] = img
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
