"""Nuclei: per-type morphology, the random draw of each nucleus' shape and texture, and its outline geometry.

A nucleus is described in continuous microns (centre, orientation, semi-axes, outline harmonics, chromatin
texture), so that it can be rasterised on any pixel grid: :func:`outline_distance` gives the signed distance to
its outline, which both the labels (:mod:`._placement`) and the H&E (:mod:`._stain`) are drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..._constants import XENIUM_BREAST_CELL_TYPES
from ._frame import Frame

# Indices into ghist._constants.XENIUM_BREAST_CELL_TYPES.
B, MYELOID, ENDOTHELIAL, FIBROBLAST, MACROPHAGE, MALIGNANT, EPITHELIAL, PLASMA, T = range(9)
N_TYPES = 9
TYPE_INDEX = {name: i for i, name in enumerate(XENIUM_BREAST_CELL_TYPES)}

N_HARM = 5  # radial harmonics k = 1..5 of the nucleus outline
SIZE = 0.9  # overall scale of nuclei and of their packing
N_CLUMPS = 9  # chromatin clumps per nucleus (unused ones have amplitude 0)

# Nuclear morphology per type, lengths in microns. a, b: semi-axes; power: superellipse exponent (< 2 gives pointed
# ends); harm: amplitude of random outline harmonics (pleomorphism); lobes: amplitude of a 3-lobed outline; kidney:
# depth of a notch on one flank; bend: curvature (1 / micron) of the long axis; H/E: hematoxylin/eosin concentration;
# interior: chromatin density at the centre relative to the rim (low = vesicular); fine: fine chromatin grain;
# clump/n_clumps: coarse chromatin clumps; clock: clumps on a ring (clock-face); nucleoli: expected number.
MORPHOLOGY: dict[int, dict[str, float]] = {
    T: {"a": 2.65, "b": 2.45, "size_cv": 0.07, "power": 2.0, "harm": 0.025, "H": 1.35, "E": 0.03, "interior": 0.95,
        "fine": 0.05, "clump": 0.0, "n_clumps": 0, "nucleoli": 0.0},
    B: {"a": 3.6, "b": 3.3, "size_cv": 0.07, "power": 2.0, "harm": 0.03, "H": 1.1, "E": 0.0, "interior": 0.75,
        "fine": 0.1, "clump": 0.5, "n_clumps": 6, "nucleoli": 0.0},
    PLASMA: {"a": 3.3, "b": 2.55, "size_cv": 0.07, "power": 2.0, "harm": 0.02, "H": 0.8, "E": 0.1, "interior": 0.55,
             "fine": 0.05, "clump": 1.1, "n_clumps": 9, "clock": 1.0, "nucleoli": 0.0},
    MYELOID: {"a": 3.5, "b": 3.3, "size_cv": 0.08, "power": 2.0, "harm": 0.02, "lobes": 0.32, "H": 1.15, "E": 0.14,
              "interior": 0.95, "fine": 0.06, "clump": 0.0, "n_clumps": 0, "nucleoli": 0.0},
    MACROPHAGE: {"a": 4.7, "b": 3.5, "size_cv": 0.09, "power": 2.0, "harm": 0.03, "kidney": 0.5, "H": 0.55,
                 "E": 0.06, "interior": 0.8, "fine": 0.14, "clump": 0.15, "n_clumps": 4, "nucleoli": 0.0},
    MALIGNANT: {"a": 5.5, "b": 4.55, "size_cv": 0.15, "power": 2.0, "harm": 0.085, "H": 0.85, "E": 0.1,
                "interior": 0.38, "fine": 0.14, "clump": 0.5, "n_clumps": 8, "nucleoli": 1.5},
    EPITHELIAL: {"a": 4.2, "b": 3.0, "size_cv": 0.07, "power": 2.0, "harm": 0.02, "H": 0.78, "E": 0.05,
                 "interior": 0.85, "fine": 0.08, "clump": 0.1, "n_clumps": 3, "nucleoli": 0.25},
    FIBROBLAST: {"a": 7.5, "b": 1.5, "size_cv": 0.12, "power": 1.45, "harm": 0.02, "H": 0.85, "E": 0.06,
                 "interior": 0.9, "fine": 0.14, "clump": 0.0, "n_clumps": 0, "nucleoli": 0.0},
    ENDOTHELIAL: {"a": 4.6, "b": 1.05, "size_cv": 0.1, "power": 1.8, "harm": 0.01, "bend": 0.07, "H": 1.3,
                  "E": 0.03, "interior": 0.95, "fine": 0.04, "clump": 0.0, "n_clumps": 0, "nucleoli": 0.0},
}  # fmt: skip

# Cytoplasm painted around some nuclei: radius relative to the nucleus' long semi-axis, stains, offset of the nucleus


@dataclass
class Nuclei:
    """Struct of arrays, one row per nucleus; lengths in microns, angles in radians."""

    cell_type: np.ndarray
    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray
    a: np.ndarray
    b: np.ndarray
    power: np.ndarray
    bend: np.ndarray
    kidney: np.ndarray
    lobes: np.ndarray
    harm_amp: np.ndarray  # (n, N_HARM)
    harm_phase: np.ndarray  # (n, N_HARM)
    H: np.ndarray
    E: np.ndarray
    interior: np.ndarray
    fine: np.ndarray
    fine_k: np.ndarray  # (n, 3, 2) wave vectors of the fine chromatin grain
    fine_phase: np.ndarray  # (n, 3)
    clump_amp: np.ndarray  # (n, N_CLUMPS)
    clump_uv: np.ndarray  # (n, N_CLUMPS, 2) in units of the semi-axes
    clump_sigma: np.ndarray  # (n,)
    nucleolus_amp: np.ndarray  # (n, 2)
    nucleolus_uv: np.ndarray  # (n, 2, 2) in units of the semi-axes
    rmax: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bound of the outline's distance from the centre
    # Per-nucleus arrays of the within-type signals (``datasets._signals``), e.g. latents and the cytoplasm's eosin
    # factor; empty unless ``synthetic(signals=...)`` asks for them, so the default slide is drawn as before.
    signal: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.update_rmax()

    def update_rmax(self) -> None:
        self.rmax = self.a * (1 + self.harm_amp.sum(1) + self.lobes) + np.abs(self.bend) * self.a**2

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, keep: np.ndarray) -> Nuclei:
        kept = {k: getattr(self, k)[keep] for k in self.__dataclass_fields__ if k not in ("rmax", "signal")}
        return Nuclei(**kept, signal={k: v[keep] for k, v in self.signal.items()})


def sample_nuclei(
    rng: np.random.Generator,
    cell_type: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    angle: np.ndarray,
    bend_sign: np.ndarray | None = None,
) -> Nuclei:
    """Draw shape, stain and texture parameters of nuclei of the given types, centres and orientations.

    ``bend_sign`` (+1/-1, 0 = random) sets which side a curved nucleus is concave towards.
    """
    n = len(cell_type)
    p = {k: np.zeros(n) for k in ("a", "b", "power", "bend", "kidney", "lobes", "harm", "H", "E", "interior", "fine",
                                 "clump", "n_clumps", "nucleoli", "clock")}  # fmt: skip
    for t, morph in MORPHOLOGY.items():
        sel = cell_type == t
        for k in p:
            p[k][sel] = morph.get(k, 0.0)
    size = np.exp(rng.normal(0, 1, n) * np.array([MORPHOLOGY[t]["size_cv"] for t in cell_type]) if n else 0)
    aspect = np.exp(rng.normal(0, 0.06, n))
    a = SIZE * p["a"] * size * aspect
    b = SIZE * p["b"] * size / aspect
    sign = rng.choice([-1.0, 1.0], n)
    if bend_sign is not None:
        sign = np.where(bend_sign != 0, np.sign(bend_sign), sign)
    bend = p["bend"] * sign * rng.uniform(0.5, 1.3, n)
    bend += np.where(cell_type == FIBROBLAST, rng.normal(0, 0.02, n), 0.0)
    harm_amp = p["harm"][:, None] * rng.uniform(0.2, 1.0, (n, N_HARM)) / np.sqrt(np.arange(1, N_HARM + 1))
    harm_amp[:, 0] *= 0.3  # k = 1 only shifts the outline
    harm_phase = rng.uniform(0, 2 * np.pi, (n, N_HARM))
    H = p["H"] * np.exp(rng.normal(0, 0.06, n))
    E = p["E"] * np.exp(rng.normal(0, 0.1, n))

    theta = rng.uniform(0, 2 * np.pi, (n, 3))
    wavelength = rng.uniform(0.8, 1.3, (n, 3))
    fine_k = np.stack([np.cos(theta), np.sin(theta)], -1) * (2 * np.pi / wavelength)[..., None]
    fine_phase = rng.uniform(0, 2 * np.pi, (n, 3))

    # Chromatin clumps: random inside the nucleus, or on a ring (clock-face) plus one at the centre.
    n_cl = p["n_clumps"].astype(int)
    active = np.arange(N_CLUMPS)[None, :] < n_cl[:, None]
    clump_amp = np.where(active, p["clump"][:, None] * rng.uniform(0.6, 1.0, (n, N_CLUMPS)), 0.0)
    r = np.sqrt(rng.uniform(0, 1, (n, N_CLUMPS))) * 0.75
    phi = rng.uniform(0, 2 * np.pi, (n, N_CLUMPS))
    clock = p["clock"] > 0
    if clock.any():
        k = np.arange(N_CLUMPS)
        ring = (k[None, :] - 1) * 2 * np.pi / np.maximum(n_cl[:, None] - 1, 1) + rng.uniform(0, 2 * np.pi, (n, 1))
        phi = np.where(clock[:, None], ring + rng.normal(0, 0.12, (n, N_CLUMPS)), phi)
        r = np.where(clock[:, None], np.where(k[None, :] == 0, 0.0, 0.68), r)
    clump_uv = np.stack([r * np.cos(phi), r * np.sin(phi)], -1)
    clump_sigma = np.where(clock, 0.5, 0.6) * np.where(cell_type == MALIGNANT, 1.3, 1.0)

    n_nucleoli = rng.poisson(p["nucleoli"])
    n_nucleoli = np.where(cell_type == MALIGNANT, np.clip(n_nucleoli, 1, 2), np.clip(n_nucleoli, 0, 1))
    nucleolus_amp = np.where(np.arange(2)[None, :] < n_nucleoli[:, None], rng.uniform(0.7, 1.0, (n, 2)), 0.0)
    nucleolus_amp *= np.where(cell_type == MALIGNANT, 1.0, 0.45)[:, None]
    rn = np.sqrt(rng.uniform(0, 1, (n, 2))) * 0.45
    phn = rng.uniform(0, 2 * np.pi, (n, 2))
    nucleolus_uv = np.stack([rn * np.cos(phn), rn * np.sin(phn)], -1)
    return Nuclei(
        cell_type=cell_type.astype(np.int64), x=x, y=y, angle=angle, a=a, b=b, power=p["power"], bend=bend,
        kidney=p["kidney"] * rng.uniform(0.8, 1.15, n), lobes=p["lobes"] * rng.uniform(0.8, 1.2, n),
        harm_amp=harm_amp, harm_phase=harm_phase, H=H, E=E, interior=p["interior"], fine=p["fine"], fine_k=fine_k,
        fine_phase=fine_phase, clump_amp=clump_amp, clump_uv=clump_uv, clump_sigma=clump_sigma,
        nucleolus_amp=nucleolus_amp, nucleolus_uv=nucleolus_uv,
    )  # fmt: skip


def local_coords(nuc: Nuclei, i: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Microns relative to nucleus ``i``, rotated to its long axis and straightened along its bend."""
    dx, dy = x - nuc.x[i], y - nuc.y[i]
    c, s = np.cos(nuc.angle[i]), np.sin(nuc.angle[i])
    u = c * dx + s * dy
    v = -s * dx + c * dy
    if nuc.bend[i] != 0:
        v = v - nuc.bend[i] * u**2
    return u, v


def outline_distance(nuc: Nuclei, i: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed radial distance (microns, < 0 inside) to the outline of nucleus ``i``, and its radius there."""
    rho = np.sqrt(u * u + v * v) + 1e-9
    c, s = u / rho, v / rho  # cos and sin of the polar angle
    a, b, pw = nuc.a[i], nuc.b[i], nuc.power[i]
    if pw == 2.0:
        radius = a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)
    else:
        radius = ((np.abs(c) / a) ** pw + (np.abs(s) / b) ** pw) ** (-1.0 / pw)
    amp, phase = nuc.harm_amp[i], nuc.harm_phase[i]
    lobes, kidney = nuc.lobes[i], nuc.kidney[i]
    n_harm = max((k + 1 for k in range(N_HARM) if amp[k] > 0.004), default=0)
    if lobes > 0:
        n_harm = max(n_harm, 3)
    if n_harm:
        mod = 1.0
        ck, sk = c, s  # cos(k theta), sin(k theta) by the angle-addition recurrence
        for k in range(1, n_harm + 1):
            if k > 1:
                ck, sk = ck * c - sk * s, sk * c + ck * s
            if amp[k - 1] > 0.004:
                mod = mod + amp[k - 1] * (ck * np.cos(phase[k - 1]) - sk * np.sin(phase[k - 1]))
            if k == 3 and lobes > 0:  # three lobes with notches between them
                c3 = ck * np.cos(3 * phase[0]) - sk * np.sin(3 * phase[0])
                mod = mod + lobes * (2 * np.sqrt(np.clip(0.5 + 0.5 * c3, 0, 1)) - 1)
        radius = radius * mod
    if kidney > 0:  # a notch on one flank (angle pi / 2), about 0.45 rad wide
        radius = radius * (1 - kidney * np.exp((s - 1) / 0.45**2))
    return rho - radius, radius


def nucleus_window(nuc: Nuclei, i: int, frame: Frame, pad: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Pixel window of ``frame`` around nucleus ``i`` (``pad`` microns beyond its outline) and its micron coords."""
    col, row = frame.to_pixels(float(nuc.x[i]), float(nuc.y[i]))
    rp = (nuc.rmax[i] + pad) / frame.step + 1
    r0, r1 = max(int(np.floor(row - rp)), 0), min(int(np.ceil(row + rp)) + 1, frame.shape[0])
    c0, c1 = max(int(np.floor(col - rp)), 0), min(int(np.ceil(col + rp)) + 1, frame.shape[1])
    if r1 <= r0 or c1 <= c0:
        return None
    x, y = frame.to_microns(np.arange(c0, c1, dtype=float)[None, :], np.arange(r0, r1, dtype=float)[:, None])
    if np.ndim(x) < 2 or x.shape != (r1 - r0, c1 - c0):
        x, y = np.broadcast_to(x, (r1 - r0, c1 - c0)), np.broadcast_to(y, (r1 - r0, c1 - c0))
    return slice(r0, r1), slice(c0, c1), x, y
