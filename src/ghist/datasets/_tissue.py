"""Procedural breast-cancer-like tissue for :func:`ghist.datasets.synthetic`.

The tissue is built in continuous micron coordinates: region fields (tumour nests, stroma, lymphoid aggregates,
ducts, vessels, fat), then nuclei with a type-specific shape, placed without overlap on the labels pixel grid, then
an H&E image rasterised from the same continuous description through any pixel grid (identity, scaled or affine),
so that the labels and the image agree whatever transformation links them.

Pixel convention (spatialdata's): pixel ``(row i, col j)`` covers ``[j, j + 1) x [i, i + 1)`` of its intrinsic
coordinate system, its centre is ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import ndimage as ndi

from .._constants import XENIUM_BREAST_CELL_TYPES

# Indices into ghist._constants.XENIUM_BREAST_CELL_TYPES.
B, MYELOID, ENDOTHELIAL, FIBROBLAST, MACROPHAGE, MALIGNANT, EPITHELIAL, PLASMA, T = range(9)
N_TYPES = 9
TYPE_INDEX = {name: i for i, name in enumerate(XENIUM_BREAST_CELL_TYPES)}

# Region codes of the tissue map.
STROMA, TUMOUR, FAT, AGGREGATE, DUCT, LUMEN, VESSEL = range(7)

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
# from the cytoplasm centre (plasma cells: eccentric nucleus), a pale perinuclear hof, foamy vacuoles.
CYTOPLASM: dict[int, dict[str, float]] = {
    PLASMA: {"r": 1.75, "H": 0.2, "E": 0.3, "offset": 0.45, "hof": 1.0},
    MACROPHAGE: {"r": 1.9, "H": 0.03, "E": 0.2, "foamy": 1.0},
    MYELOID: {"r": 1.7, "H": 0.03, "E": 0.3},
    MALIGNANT: {"r": 1.5, "H": 0.05, "E": 0.22},
    EPITHELIAL: {"r": 1.6, "H": 0.04, "E": 0.24},
}


@dataclass
class Frame:
    """Pixel grid whose pixel ``(i, j)`` centre maps to microns ``matrix @ (j + 0.5, i + 0.5, 1)``."""

    shape: tuple[int, int]
    matrix: np.ndarray  # 3 x 3, pixel (x, y, 1) -> microns (x, y, 1)
    inverse: np.ndarray = field(init=False, repr=False)

    step: float = field(init=False, repr=False)  # pixel size in microns (geometric mean of the axes)

    def __post_init__(self) -> None:
        self.inverse = np.linalg.inv(self.matrix)
        self.step = float(np.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))

    @property
    def axis_aligned(self) -> bool:
        return self.matrix[0, 1] == 0 and self.matrix[1, 0] == 0

    def to_microns(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.matrix
        x, y = cols + 0.5, rows + 0.5
        return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuous pixel coordinates (col, row) with pixel centres at integers."""
        m = self.inverse
        return m[0, 0] * x + m[0, 1] * y + m[0, 2] - 0.5, m[1, 0] * x + m[1, 1] * y + m[1, 2] - 0.5

    def footprint(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1) in microns of the grid's area."""
        h, w = self.shape
        m = self.matrix
        corners = m @ np.array([[0, w, 0, w], [0, 0, h, h], [1, 1, 1, 1]], dtype=float)
        return corners[0].min(), corners[1].min(), corners[0].max(), corners[1].max()


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

    def __post_init__(self) -> None:
        self.update_rmax()

    def update_rmax(self) -> None:
        self.rmax = self.a * (1 + self.harm_amp.sum(1) + self.lobes) + np.abs(self.bend) * self.a**2

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, keep: np.ndarray) -> Nuclei:
        return Nuclei(**{k: getattr(self, k)[keep] for k in self.__dataclass_fields__ if k != "rmax"})


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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Tissue layout
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Tissue:
    """Region map and background stains on the field grid (the labels pixel grid, extended by a margin)."""

    frame: Frame
    region: np.ndarray  # int8 region codes
    dist_tumour: np.ndarray  # microns to the nearest tumour pixel (0 inside)
    fibre_angle: np.ndarray  # stroma fibre direction (radians)
    fibre: np.ndarray  # stroma fibre pattern in [0, 1]
    fine: np.ndarray  # fine-grained noise, unit sd
    aggregate_pos: np.ndarray  # (n, 3): x, y, radius of lymphoid aggregates
    eosin: np.ndarray | None = None
    haem: np.ndarray | None = None
    rbc: np.ndarray | None = None

    def lookup(self, name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Nearest-pixel value of a field at micron positions (clipped to the grid)."""
        col, row = self.frame.to_pixels(x, y)
        h, w = self.frame.shape
        row = np.clip(np.rint(row).astype(int), 0, h - 1)
        col = np.clip(np.rint(col).astype(int), 0, w - 1)
        return getattr(self, name)[row, col]


@dataclass
class Candidates:
    """Proposed nuclei: centre, orientation, type distribution and how hard to try placing them."""

    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    angle: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    bend_sign: list = field(default_factory=list)
    retries: list = field(default_factory=list)
    block: list = field(default_factory=list)

    def add(self, x, y, angle, probs, *, bend_sign=None, retries: int = 0) -> None:
        x = np.atleast_1d(np.asarray(x, dtype=float))
        n = len(x)
        self.x.append(x)
        self.y.append(np.broadcast_to(np.asarray(y, dtype=float), (n,)))
        self.angle.append(np.broadcast_to(np.asarray(angle, dtype=float), (n,)))
        self.probs.append(np.broadcast_to(np.asarray(probs, dtype=float), (n, N_TYPES)))
        self.bend_sign.append(np.broadcast_to(np.asarray(0.0 if bend_sign is None else bend_sign, float), (n,)))
        self.retries.append(np.full(n, retries))
        self.block.append(np.full(n, len(self.block)))

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.x:
            return {k: np.zeros((0, N_TYPES) if k == "probs" else 0) for k in self.__dataclass_fields__}
        return {k: np.concatenate(getattr(self, k)) for k in self.__dataclass_fields__}


def onehot(t: int) -> np.ndarray:
    v = np.zeros(N_TYPES)
    v[t] = 1.0
    return v


def mix(**weights: float) -> np.ndarray:
    v = np.zeros(N_TYPES)
    for k, w in weights.items():
        v[TYPE_INDEX[k]] = w
    return v / v.sum()


def _interp_matrix(pos: np.ndarray, n: int) -> sp.csr_matrix:
    """Sparse matrix of linear interpolation weights at continuous indices ``pos`` into ``n`` samples."""
    pos = np.clip(pos, 0, n - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2) if n > 1 else np.zeros(len(pos), np.int64)
    f = pos - i0 if n > 1 else np.zeros(len(pos))
    rows = np.repeat(np.arange(len(pos)), 2)
    cols = np.stack([i0, np.minimum(i0 + 1, n - 1)], 1).ravel()
    vals = np.stack([1 - f, f], 1).ravel()
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(pos), n))


def resample(img: np.ndarray, src: Frame, dst: Frame) -> np.ndarray:
    """Bilinear resampling of ``img`` (on grid ``src``) at the pixel centres of grid ``dst``."""
    h, w = dst.shape
    if src.axis_aligned and dst.axis_aligned:
        xs, _ = dst.to_microns(np.arange(w, dtype=float), 0.0)
        _, ys = dst.to_microns(0.0, np.arange(h, dtype=float))
        cols, _ = src.to_pixels(xs, 0.0)
        _, rows = src.to_pixels(0.0, ys)
        ry, rx = _interp_matrix(rows, img.shape[0]), _interp_matrix(cols, img.shape[1])
        return np.asarray(ry @ (rx @ img.T).T, dtype=np.float32)
    out = np.empty((h, w), np.float32)
    for r0 in range(0, h, 256):  # in row blocks, to bound memory
        rows = np.arange(r0, min(r0 + 256, h), dtype=np.float32)[:, None]
        x, y = dst.to_microns(np.arange(w, dtype=np.float32)[None, :], rows)
        c, r = src.to_pixels(x, y)
        out[r0 : r0 + len(rows)] = ndi.map_coordinates(img, [r, c], order=1, mode="nearest", prefilter=False)
    return out


def _coarse_field(rng: np.random.Generator, frame: Frame, sigma_um: float, step_um: float = 4.0) -> np.ndarray:
    """Smooth unit-sd noise with correlation length ``sigma_um``, computed coarse and interpolated to ``frame``."""
    x0, y0, x1, y1 = frame.footprint()
    shape = (int(np.ceil((y1 - y0) / step_um)) + 3, int(np.ceil((x1 - x0) / step_um)) + 3)
    coarse = smooth_noise(rng, shape, sigma_um / step_um).astype(np.float32)
    grid = Frame(shape, np.array([[step_um, 0, x0 - 1.5 * step_um], [0, step_um, y0 - 1.5 * step_um], [0, 0, 1]]))
    return resample(coarse, grid, frame)


def _hex_lattice(rng: np.random.Generator, box: tuple[float, float, float, float], spacing: float, jitter: float):
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


def build_tissue(rng: np.random.Generator, frame: Frame) -> tuple[Tissue, Candidates]:
    """Lay out tissue compartments on ``frame`` and propose nuclei for each."""
    h, w = frame.shape
    step = frame.step
    x0, y0, x1, y1 = frame.footprint()
    box = (x0, y0, x1, y1)
    area = (x1 - x0) * (y1 - y0)
    rows, cols = np.mgrid[0:h, 0:w]
    X, Y = frame.to_microns(cols.astype(np.float32), rows.astype(np.float32))
    cand = Candidates()

    # Tumour nests: thresholded smooth noise (about a third of the area).
    tumour_f = _coarse_field(rng, frame, 22.0) + 0.35 * _coarse_field(rng, frame, 9.0)
    tumour = tumour_f > np.quantile(tumour_f, 1 - rng.uniform(0.32, 0.38))
    dist_tumour = ndi.distance_transform_edt(~tumour) * step if tumour.any() else np.full((h, w), 1e3)
    dist_tumour = dist_tumour.astype(np.float32)
    region = np.where(tumour, TUMOUR, STROMA).astype(np.int8)

    # Fat lobules, away from tumour.
    fat_f = _coarse_field(rng, frame, 45.0)
    far = dist_tumour > 20
    fat = (
        far & (fat_f > np.quantile(fat_f[far], max(1 - 0.045 * far.size / max(far.sum(), 1), 0))) if far.any() else far
    )
    region[fat] = FAT

    def free_points(n_try: int, ok) -> tuple[np.ndarray, np.ndarray]:
        px = rng.uniform(x0, x1, n_try)
        py = rng.uniform(y0, y1, n_try)
        keep = ok(px, py)
        return px[keep], py[keep]

    def region_at(px, py):
        c, r = frame.to_pixels(px, py)
        return region[np.clip(np.rint(r).astype(int), 0, h - 1), np.clip(np.rint(c).astype(int), 0, w - 1)]

    def dist_at(px, py):
        c, r = frame.to_pixels(px, py)
        return dist_tumour[np.clip(np.rint(r).astype(int), 0, h - 1), np.clip(np.rint(c).astype(int), 0, w - 1)]

    # Normal ducts: lumen surrounded by two layers of epithelium.
    n_duct = rng.poisson(area / 210.0**2)
    dx_, dy_ = free_points(30 * n_duct + 5, lambda px, py: (region_at(px, py) == STROMA) & (dist_at(px, py) > 16))
    ducts = []
    for cx, cy in zip(dx_, dy_):
        if len(ducts) >= n_duct:
            break
        room = float(dist_at(np.array([cx]), np.array([cy]))[0]) - 1.0
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
        # Epithelium: a columnar luminal layer (nuclei pointing at the lumen) and a flatter basal layer.
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
            ok = region_at(px, py) == DUCT
            cand.add(px[ok], py[ok], ang[ok] + rng.normal(0, 0.15, ok.sum()), onehot(EPITHELIAL), retries=1)

    # Lymphoid aggregates: B-cell rich core, T-cell mantle.
    n_agg = rng.poisson(area / 150.0**2)
    ax, ay = free_points(20 * n_agg + 5, lambda px, py: (region_at(px, py) == STROMA) & (dist_at(px, py) > 18))
    aggs = []
    agg_noise = _coarse_field(rng, frame, 8.0)
    agg_mask = np.zeros((h, w), bool)
    agg_rnorm = np.full((h, w), np.inf, np.float32)
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
        agg_rnorm = np.minimum(agg_rnorm, rn)
        agg_mask |= (rn < 1) & np.isin(region, (STROMA, FAT))
    region[agg_mask] = AGGREGATE

    # Vessels: winding tubes lined by flat endothelial cells, with red blood cells in the lumen.
    n_vessel = rng.poisson(area / 120.0**2)
    seeds_r, seeds_c, widths = [], [], []
    vx, vy = free_points(10 * n_vessel + 5, lambda px, py: region_at(px, py) == STROMA)
    for cx, cy in list(zip(vx, vy))[:n_vessel]:
        length = rng.uniform(50, 170)
        half_width = rng.uniform(2.5, 6.0)
        n_step = int(length / 1.0)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.05, n_step))
        px = cx + np.cumsum(np.cos(heading))
        py = cy + np.cumsum(np.sin(heading))
        ok = np.isin(region_at(px, py), (STROMA, FAT))
        if ok.mean() < 0.5:
            continue
        c, r = frame.to_pixels(px[ok], py[ok])
        seeds_r.append(r)
        seeds_c.append(c)
        widths.append(np.full(ok.sum(), half_width))
        # Endothelium along both walls, staggered.
        idx = np.arange(rng.integers(0, 5), n_step, 5)
        side = np.where(np.arange(len(idx)) % 2 == 0, 1.0, -1.0)
        nx, ny = -np.sin(heading[idx]), np.cos(heading[idx])
        off = half_width + 1.0
        ex, ey = px[idx] + side * nx * off, py[idx] + side * ny * off
        good = np.isin(region_at(ex, ey), (STROMA, FAT)) & ok[idx]
        cand.add(ex[good], ey[good], heading[idx][good], onehot(ENDOTHELIAL), bend_sign=-side[good], retries=1)
    # Capillaries in cross-section: a small lumen between two endothelial nuclei.
    n_cap = rng.poisson(area / 75.0**2)
    kx, ky = free_points(n_cap, lambda px, py: region_at(px, py) == STROMA)
    for cx, cy in zip(kx, ky):
        radius = rng.uniform(1.8, 3.2)
        c, r = frame.to_pixels(np.array([cx]), np.array([cy]))
        seeds_r.append(r)
        seeds_c.append(c)
        widths.append(np.array([radius]))
        phi = rng.uniform(0, 2 * np.pi)
        for side in (1.0, -1.0):
            ex, ey = cx + side * np.cos(phi) * (radius + 1.0), cy + side * np.sin(phi) * (radius + 1.0)
            cand.add(ex, ey, phi + np.pi / 2, onehot(ENDOTHELIAL), bend_sign=-side, retries=1)
    if seeds_r:
        sr = np.clip(np.rint(np.concatenate(seeds_r)).astype(int), 0, h - 1)
        sc = np.clip(np.rint(np.concatenate(seeds_c)).astype(int), 0, w - 1)
        wd = np.concatenate(widths)
        seed_id = np.full((h, w), -1, np.int64)
        seed_id[sr, sc] = np.arange(len(sr))
        dist, (ir, ic) = ndi.distance_transform_edt(seed_id < 0, return_indices=True)
        lumen = dist * step <= wd[seed_id[ir, ic]]
        region[lumen & np.isin(region, (STROMA, FAT))] = VESSEL

    # Stroma: fibres wrap around tumour nests; orientation and banding from one potential.
    psi = 0.8 * np.minimum(dist_tumour, 60) + 22.0 * _coarse_field(rng, frame, 35.0)
    gy, gx = np.gradient(psi.astype(np.float64), step)
    fibre_angle = (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)
    wobble = 2.5 * _coarse_field(rng, frame, 3.0, step_um=1.0)
    bundles = _coarse_field(rng, frame, 6.0, step_um=2.0)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * psi / 2.6 + wobble)
    fibre = np.clip(0.55 + 0.3 * bundles + 0.35 * (stripes - 0.5), 0, 1).astype(np.float32)
    fine = smooth_noise(rng, (h, w), 0.6 / step).astype(np.float32)

    tissue = Tissue(frame=frame, region=region, dist_tumour=dist_tumour, fibre_angle=fibre_angle, fibre=fibre,
                    fine=fine, aggregate_pos=np.array(aggs).reshape(-1, 3))  # fmt: skip

    # Tumour nests: cohesive sheets of malignant cells, a few infiltrating immune cells.
    lx, ly = _hex_lattice(rng, box, SIZE * 11.9, 1.0)
    sel = region_at(lx, ly) == TUMOUR
    cand.add(lx[sel], ly[sel], rng.uniform(0, np.pi, sel.sum()), onehot(MALIGNANT), retries=3)
    # Lymphoid aggregates: dense lattice of small round cells.
    lx, ly = _hex_lattice(rng, box, SIZE * 7.2, 0.5)
    sel = region_at(lx, ly) == AGGREGATE
    lx, ly = lx[sel], ly[sel]
    if len(aggs):
        a_ = np.array(aggs)
        rnorm = (np.hypot(lx[:, None] - a_[:, 0], ly[:, None] - a_[:, 1]) / a_[:, 2]).min(1)
    else:
        rnorm = np.ones(len(lx))
    core = np.clip((0.75 - rnorm) / 0.25, 0, 1)[:, None]
    probs = core * mix(B=0.72, T=0.22, Macrophage=0.06) + (1 - core) * mix(
        T=0.84, B=0.08, Macrophage=0.04, Myeloid=0.04
    )
    cand.add(lx, ly, rng.uniform(0, np.pi, len(lx)), probs, retries=3)
    # Immune cells scattered through the nests.
    px, py = free_points(int(area / 900), lambda px, py: region_at(px, py) == TUMOUR)
    cand.add(px, py, rng.uniform(0, np.pi, len(px)), mix(T=0.6, Macrophage=0.4))

    # Stroma: denser and more immune near tumour, plasma cells around aggregates, fibroblasts along fibres.
    px, py = _hex_lattice(rng, box, SIZE * 7.2, 0.8)
    sel = np.isin(region_at(px, py), (STROMA, FAT))
    px, py = px[sel], py[sel]
    d = dist_at(px, py)
    dens = 0.8 + 0.2 * np.exp(-d / 30.0)
    is_fat = region_at(px, py) == FAT
    dens = np.where(is_fat, 0.03, dens)
    keep = rng.uniform(0, 1, len(px)) < dens
    px, py, d = px[keep], py[keep], d[keep]
    near = np.exp(-d / 25.0)[:, None]
    far = mix(Fibroblast=0.38, T=0.28, Macrophage=0.16, Plasma=0.06, Myeloid=0.06, B=0.03, Endothelial=0.03)
    close = mix(T=0.55, Macrophage=0.28, Fibroblast=0.07, Plasma=0.04, Myeloid=0.06)
    probs = near * close + (1 - near) * far
    if len(aggs):
        a_ = np.array(aggs)
        rn = (np.hypot(px[:, None] - a_[:, 0], py[:, None] - a_[:, 1]) / a_[:, 2]).min(1)
        halo = np.exp(-np.clip(rn - 1, 0, None) / 0.25)[:, None]
        probs = (1 - 0.6 * halo) * probs + 0.6 * halo * mix(Plasma=0.45, B=0.2, T=0.35)
    angle = tissue.lookup("fibre_angle", px, py) + rng.normal(0, 0.12, len(px))
    cand.add(px, py, angle, probs, retries=3)
    # Lymphocytes and macrophages filling the gaps left between stromal cells.
    px, py = free_points(int(area / 70), lambda px, py: region_at(px, py) == STROMA)
    cand.add(px, py, rng.uniform(0, np.pi, len(px)), mix(T=0.7, Macrophage=0.12, Plasma=0.06, Myeloid=0.06, B=0.06))
    return tissue, cand


# --------------------------------------------------------------------------------------------------------------------
# Placing nuclei on the labels grid
# --------------------------------------------------------------------------------------------------------------------


def place_nuclei(
    rng: np.random.Generator, tissue: Tissue, cand: Candidates, allowed: np.ndarray, *, min_px: int = 4
) -> tuple[Nuclei, np.ndarray]:
    """Draw each candidate's type (restricted to ``allowed``) and shape; keep those that fit without touching.

    Returns the placed nuclei and the instance raster on ``tissue.frame`` (0 = background, ``k + 1`` = nucleus
    ``k``). Neighbouring nuclei keep a gap of at least one pixel.
    """
    arr = cand.arrays()
    probs = arr["probs"] * allowed[None, :]
    total = probs.sum(1)
    ok = total > 0
    u = rng.uniform(0, 1, len(total))
    cum = np.cumsum(probs / np.where(ok, total, 1)[:, None], axis=1)
    cell_type = np.minimum((cum < u[:, None]).sum(1), N_TYPES - 1)
    sel = np.flatnonzero(ok)
    nuc = sample_nuclei(
        rng, cell_type[sel], arr["x"][sel], arr["y"][sel], arr["angle"][sel], bend_sign=arr["bend_sign"][sel]
    )
    retries = arr["retries"][sel]
    jitter = rng.normal(0, 1.2, (len(sel), 2))
    # Blocks in the order they were proposed; within a block, big nuclei first and small ones fill the gaps.
    order = np.lexsort((rng.uniform(0, 1, len(sel)), -np.round(nuc.a * nuc.b, 0), arr["block"][sel]))

    frame = tissue.frame
    gap = frame.step  # microns
    occ = np.zeros(frame.shape, np.int32)
    halo = np.zeros(frame.shape, bool)
    placed = []
    for i in order:
        for attempt in range(retries[i] + 1):
            if attempt == 1:  # move a little
                nuc.x[i] += jitter[i, 0]
                nuc.y[i] += jitter[i, 1]
            elif attempt == 2:  # move the other way
                nuc.x[i] -= 2 * jitter[i, 0]
                nuc.y[i] -= 2 * jitter[i, 1]
            elif attempt == 3:  # move sideways
                nuc.x[i] += jitter[i, 0] - jitter[i, 1]
                nuc.y[i] += jitter[i, 1] + jitter[i, 0]
            col, row = frame.to_pixels(float(nuc.x[i]), float(nuc.y[i]))
            ri, ci = round(row), round(col)
            if 0 <= ri < frame.shape[0] and 0 <= ci < frame.shape[1] and halo[ri, ci]:
                continue  # the centre is already taken
            win = nucleus_window(nuc, i, frame, pad=gap)
            if win is None:
                break
            rs, cs, x, y = win
            d, _ = outline_distance(nuc, i, *local_coords(nuc, i, x, y))
            core = d <= 0
            if core.sum() < min_px:
                break
            if (halo[rs, cs] & core).any():
                continue
            occ[rs, cs][core] = len(placed) + 1
            halo[rs, cs] |= d <= gap
            placed.append(i)
            break
    # Rows in placement order, so that row k has id k + 1 in ``occ``.
    return nuc.subset(np.array(placed, dtype=np.int64)), occ


# --------------------------------------------------------------------------------------------------------------------
# Stains
# --------------------------------------------------------------------------------------------------------------------


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
    E[lumen] = 0.02 + 0.05 * np.clip(_coarse_field(rng, frame, 3.0, step_um=1.0)[lumen], 0, None)
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
        e_add = cyto["E"] * wgt
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
    stain_h = 1 + 0.05 * _coarse_field(rng, frame, 90.0, step_um=8.0)
    stain_e = 1 + 0.08 * _coarse_field(rng, frame, 90.0, step_um=8.0)

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
