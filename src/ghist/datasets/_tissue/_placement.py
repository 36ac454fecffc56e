"""Placing nuclei on the labels grid: each proposed nucleus gets its type and shape, and is kept if it fits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._nuclei import N_TYPES, Nuclei, local_coords, nucleus_window, outline_distance, sample_nuclei
from ._structures import Candidates, Tissue


def place_nuclei(
    rng: np.random.Generator,
    tissue: Tissue,
    cand: Candidates,
    allowed: np.ndarray,
    *,
    min_px: int = 4,
    adjust: Callable[[Nuclei], None] | None = None,
) -> tuple[Nuclei, np.ndarray]:
    """Draw each candidate's type (restricted to ``allowed``) and shape; keep those that fit without touching.

    ``adjust`` may edit the drawn nuclei in place before they are placed (the within-type signals change the size
    and chromatin of cycling cells); it must not draw from ``rng``, so that the layout stays that of the seed.

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
    if adjust is not None:
        adjust(nuc)
        nuc.update_rmax()
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
