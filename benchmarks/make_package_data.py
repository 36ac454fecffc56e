"""Regenerate ``src/ghist/datasets/data/xenium_breast_profiles.npz`` from the shared Xenium breast data.

Usage::

    python benchmarks/make_package_data.py [--data ../shared/data/xenium_breast_cells] [--out src/ghist/datasets/data]

The source is the 10x Genomics Xenium human breast cancer preview (In Situ Sample 2, CC BY 4.0, attribution:
10x Genomics) as processed for the GHIST paper's demo: 5,508 cells x 280 genes of raw transcript counts, a cell type
per cell and the nucleus area per cell. The counts are stored as a CSR matrix (uint8 values, uint16 column indices)
so the compressed file stays well under 1.5 MB.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
CELL_TYPES = ("B", "Myeloid", "Endothelial", "Fibroblast", "Macrophage", "Malignant", "Epithelial", "Plasma", "T")


def build(data_dir: Path) -> dict[str, np.ndarray]:
    expr = pd.read_csv(data_dir / "expr_mat_breast_demo.csv", index_col=0)
    types = pd.read_csv(data_dir / "cell_types_breast_demo.csv")
    sizes = pd.read_csv(data_dir / "nuclei_sizes_breast_demo.csv")
    genes = (data_dir / "genes.txt").read_text().split()

    cell_ids = expr.pop("cell_id").to_numpy()
    if not (np.array_equal(cell_ids, types["c_ids"]) and np.array_equal(cell_ids, sizes.iloc[:, 0])):
        raise ValueError("Cell ids of the expression, cell type and nucleus size tables differ.")
    if list(expr.columns) != genes:
        raise ValueError("Gene columns of the expression matrix differ from genes.txt.")

    counts = expr.to_numpy()
    if counts.min() < 0 or counts.max() > np.iinfo(np.uint8).max:
        raise ValueError(f"Counts outside the uint8 range: [{counts.min()}, {counts.max()}].")
    csr = sp.csr_matrix(counts.astype(np.uint8))
    csr.sort_indices()
    cell_type = types["ct_idx"].to_numpy()
    if cell_type.min() < 0 or cell_type.max() >= len(CELL_TYPES):
        raise ValueError(f"Cell type index outside 0..{len(CELL_TYPES) - 1}.")
    return {
        "data": csr.data.astype(np.uint8),
        "indices": csr.indices.astype(np.uint16),
        "indptr": csr.indptr.astype(np.int32),
        "shape": np.asarray(csr.shape, dtype=np.int32),
        "cell_type": cell_type.astype(np.int8),
        "cell_type_names": np.asarray(CELL_TYPES),
        "genes": np.asarray(genes),
        "cell_id": cell_ids.astype(np.int64),
        "nucleus_area": sizes.iloc[:, 1].to_numpy().astype(np.int16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "xenium_breast_cells")
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "ghist" / "datasets" / "data")
    args = parser.parse_args()

    arrays = build(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "xenium_breast_profiles.npz"
    np.savez_compressed(path, **arrays)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    n_cells, n_genes = arrays["shape"]
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {n_cells} cells x {n_genes} genes, sha256 {digest}")


if __name__ == "__main__":
    main()
