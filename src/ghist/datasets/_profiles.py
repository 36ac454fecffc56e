"""Real per-cell Xenium breast profiles shipped with ghist (10x Genomics, CC BY 4.0; see ``data/README.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import numpy as np
import scipy.sparse as sp

from .._constants import XENIUM_BREAST_CELL_TYPES

PROFILES_FILE = "xenium_breast_profiles.npz"


@dataclass(frozen=True)
class XeniumProfiles:
    """Raw counts (cells x genes, CSR ``int32``), cell type index per cell, type names, genes, nucleus areas."""

    counts: sp.csr_matrix
    cell_type: np.ndarray
    cell_type_names: tuple[str, ...]
    genes: tuple[str, ...]
    nucleus_area: np.ndarray

    def type_mean(self) -> np.ndarray:
        """Mean raw counts per cell type, ``(n_types, n_genes)``."""
        onehot = sp.csr_matrix(
            (np.ones(len(self.cell_type)), (self.cell_type, np.arange(len(self.cell_type)))),
            shape=(len(self.cell_type_names), len(self.cell_type)),
        )
        sums = np.asarray((onehot @ self.counts).todense(), dtype=np.float64)
        return sums / np.maximum(np.bincount(self.cell_type, minlength=len(self.cell_type_names)), 1)[:, None]

    def variable_genes(self) -> np.ndarray:
        """Gene indices sorted from most to least variable (variance of ``log1p`` library-normalised counts)."""
        counts = self.counts.astype(np.float64)
        lib = np.asarray(counts.sum(axis=1)).ravel()
        norm = sp.diags(np.median(lib) / np.maximum(lib, 1)) @ counts
        norm.data = np.log1p(norm.data)
        mean = np.asarray(norm.mean(axis=0)).ravel()
        var = np.asarray(norm.multiply(norm).mean(axis=0)).ravel() - mean**2
        return np.argsort(-var, kind="stable")


@lru_cache(maxsize=1)
def load_profiles() -> XeniumProfiles:
    """Load the packaged profiles once per process."""
    with files(__package__).joinpath("data", PROFILES_FILE).open("rb") as fh:
        npz = np.load(fh, allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}
    counts = sp.csr_matrix(
        (arrays["data"].astype(np.int32), arrays["indices"].astype(np.int32), arrays["indptr"]),
        shape=tuple(int(s) for s in arrays["shape"]),
    )
    names = tuple(str(n) for n in arrays["cell_type_names"])
    if names != tuple(XENIUM_BREAST_CELL_TYPES):  # pragma: no cover - guards a stale data file
        raise RuntimeError(f"Packaged cell types {names} differ from XENIUM_BREAST_CELL_TYPES.")
    return XeniumProfiles(
        counts=counts,
        cell_type=arrays["cell_type"].astype(np.int64),
        cell_type_names=names,
        genes=tuple(str(g) for g in arrays["genes"]),
        nucleus_area=arrays["nucleus_area"].astype(np.float64),
    )
