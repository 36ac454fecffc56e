"""Spatial folds of a tile store: horizontal bands of tile rows, and the train / val / test split of each row.

Shared by :func:`ghist.pp.make_tiles` (which refuses folds that leave a split empty before cutting anything) and
:class:`ghist.pp.TileSet` (which recomputes the splits of a store for another fold without cutting again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._validation import ValidationError, check_int

__all__ = ["SPLIT_NAMES", "TEST", "TRAIN", "VAL", "row_bands", "split_rows"]

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")


def row_bands(n_rows: int, n_folds: int) -> np.ndarray:
    """1-based band of every tile row: ``n_folds`` horizontal bands of (nearly) equal height, top to bottom."""
    return (np.arange(n_rows) * n_folds // max(n_rows, 1) + 1).astype(np.int8)


def split_rows(n_rows: int, n_folds: int, fold: int | None) -> np.ndarray:
    """Split (``TRAIN``/``VAL``/``TEST``) of every tile row.

    Band ``fold`` is test; the validation band is the tenth of the rows (at least one) right below it, wrapping
    around to the top; the rest trains. ``fold=None``: every row trains.
    """
    split = np.full(n_rows, TRAIN, dtype=np.int8)
    if fold is None:
        return split
    test = np.flatnonzero(row_bands(n_rows, n_folds) == fold)
    split[test] = TEST
    if test.size == 0:
        return split
    n_val = max(1, math.floor(n_rows / 10 + 0.5))
    val = (test[-1] + 1 + np.arange(n_val)) % n_rows
    val = val[split[val] != TEST]
    split[val] = VAL
    return split


def _check_folds(n_folds: int, fold: int | None) -> None:
    check_int("n_folds", n_folds, 2)
    check_int("fold", fold, 1, optional=True, maximum=n_folds)  # 1-based: the test band


def _split_problem(name: str, n_rows: int, n_folds: int, fold: int | None, tile_size: int) -> str | None:
    if fold is None:
        return None
    split = split_rows(n_rows, n_folds, fold)
    counts = {SPLIT_NAMES[s]: int((split == s).sum()) for s in (TRAIN, VAL, TEST)}
    empty = [k for k, v in counts.items() if v == 0]
    if not empty:
        return None
    return (
        f"sample {name!r} has {n_rows} rows of {tile_size}-px tiles; with n_folds={n_folds}, fold={fold} the "
        f"{'/'.join(empty)} split would be empty (train {counts['train']}, val {counts['val']}, test {counts['test']} "
        f"rows); expected at least one row each: use a smaller `tile_size` or fewer `n_folds`."
    )


def _check_splits(names: Sequence[str], n_rows: Sequence[int], n_folds: int, fold: int | None, tile_size: int) -> None:
    """Refuse a fold that leaves a split of some sample empty (every such sample reported at once)."""
    problems = [
        p
        for name, rows in zip(names, n_rows)
        if (p := _split_problem(name, rows, n_folds, fold, tile_size)) is not None
    ]
    if problems:
        raise ValueError(problems[0]) if len(problems) == 1 else ValidationError(problems)


def _tile_splits(
    n_rows: Sequence[int], n_folds: int, fold: int | None, sample: np.ndarray, row: np.ndarray
) -> np.ndarray:
    """Split of every tile, from its sample and its grid row (``n_rows``: tile rows of each sample)."""
    per_sample = [split_rows(n, n_folds, fold) for n in n_rows]
    first_row = np.concatenate([[0], np.cumsum(n_rows)[:-1]]).astype(np.int64)
    return np.concatenate(per_sample).astype(np.int8)[first_row[sample] + row]


def _ignored_cells(
    split: np.ndarray, sample: np.ndarray, offsets: np.ndarray, cell_ids: np.ndarray
) -> tuple[np.ndarray, int]:
    """Tile cells a training tile must ignore, and the number of distinct cells.

    Tile ``t``'s cells are ``cell_ids[offsets[t]:offsets[t + 1]]``. A nucleus cut by a tile boundary is in both
    tiles; where one of them is held out (validation or test), the training tile must not supervise it, or the cell
    would be evaluated on what it was trained on.
    """
    tile_of_cell = np.repeat(np.arange(len(sample)), np.diff(offsets))
    key = (sample[tile_of_cell] << 32) | cell_ids  # ids are unique within a sample only
    held_out = split[tile_of_cell] != TRAIN
    return ~held_out & np.isin(key, key[held_out]), int(np.unique(key).size)
