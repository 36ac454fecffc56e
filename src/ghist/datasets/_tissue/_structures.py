"""The data structures shared by the layout steps: region codes, the tissue map, and the proposed nuclei."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ._frame import Frame
from ._nuclei import N_TYPES, TYPE_INDEX

# Region codes of the tissue map.
STROMA, TUMOUR, FAT, AGGREGATE, DUCT, LUMEN, VESSEL = range(7)


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


@dataclass
class Sketch:
    """The tissue map while :func:`~._layout.build_tissue` draws it.

    Holds the field grid, the micron coordinates of its pixel centres and the maps drawn so far, which later steps
    read (a lymphoid aggregate is only drawn in stroma, a duct away from tumour). All steps draw from the one
    ``rng`` in a fixed order, so a seed always gives the same tissue.
    """

    rng: np.random.Generator
    frame: Frame
    region: np.ndarray = field(init=False, repr=False)  # int8 region codes, edited in place by each step
    dist_tumour: np.ndarray = field(init=False, repr=False)  # microns to the nearest tumour pixel (0 inside)
    X: np.ndarray = field(init=False, repr=False)  # micron x of each pixel centre
    Y: np.ndarray = field(init=False, repr=False)  # micron y of each pixel centre
    box: tuple[float, float, float, float] = field(init=False, repr=False)  # (x0, y0, x1, y1) footprint in microns
    area: float = field(init=False, repr=False)  # square microns of the footprint

    def __post_init__(self) -> None:
        h, w = self.frame.shape
        self.box = self.frame.footprint()
        x0, y0, x1, y1 = self.box
        self.area = (x1 - x0) * (y1 - y0)
        rows, cols = np.mgrid[0:h, 0:w]
        self.X, self.Y = self.frame.to_microns(cols.astype(np.float32), rows.astype(np.float32))

    def _at(self, values: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        h, w = self.frame.shape
        c, r = self.frame.to_pixels(px, py)
        return values[np.clip(np.rint(r).astype(int), 0, h - 1), np.clip(np.rint(c).astype(int), 0, w - 1)]

    def region_at(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Region code of the nearest pixel at micron positions (clipped to the grid)."""
        return self._at(self.region, px, py)

    def dist_at(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Distance to tumour (microns) at micron positions (clipped to the grid)."""
        return self._at(self.dist_tumour, px, py)

    def free_points(
        self, n_try: int, ok: Callable[[np.ndarray, np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Uniform random points of the footprint, keeping those where ``ok(x, y)`` holds."""
        x0, y0, x1, y1 = self.box
        px = self.rng.uniform(x0, x1, n_try)
        py = self.rng.uniform(y0, y1, n_try)
        keep = ok(px, py)
        return px[keep], py[keep]
