"""Pixel grids in micron space, and the smooth noise fields the tissue is drawn from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import ndimage as ndi


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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


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


def coarse_field(rng: np.random.Generator, frame: Frame, sigma_um: float, step_um: float = 4.0) -> np.ndarray:
    """Smooth unit-sd noise with correlation length ``sigma_um``, computed coarse and interpolated to ``frame``."""
    x0, y0, x1, y1 = frame.footprint()
    shape = (int(np.ceil((y1 - y0) / step_um)) + 3, int(np.ceil((x1 - x0) / step_um)) + 3)
    coarse = smooth_noise(rng, shape, sigma_um / step_um).astype(np.float32)
    grid = Frame(shape, np.array([[step_um, 0, x0 - 1.5 * step_um], [0, step_um, y0 - 1.5 * step_um], [0, 0, 1]]))
    return resample(coarse, grid, frame)
