"""Cell types for spatial transcriptomics cells that have none, transferred from a single-cell reference."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import CELL_TYPE_KEY, UNS_KEY
from .._stats import best_correlated, standardise_rows
from .._validation import _preview, check_genes, check_int, check_number, get_counts
from ._reference import reference_profiles

logger = logging.getLogger(__name__)

AnnotationMethod = Literal["correlation", "ingest"]
CorrelationKind = Literal["pearson", "spearman"]
_METHODS = ("correlation", "ingest")
_CORRELATIONS = ("pearson", "spearman")
_BLOCK_ROWS = 20_000  # cells densified at once


def annotate_cell_types(
    adata: AnnData,
    reference: AnnData,
    *,
    groupby: str,
    method: AnnotationMethod = "correlation",
    correlation: CorrelationKind = "pearson",
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    target_sum: float | None = None,
    n_neighbors: int = 15,
    n_comps: int = 50,
    key_added: str = CELL_TYPE_KEY,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Give every measured cell a cell type from a single-cell reference.

    For spatial transcriptomics cells (e.g. a Xenium table) without cell-type labels, so that
    :func:`ghist.pp.make_tiles` can be given ``cell_type_key=key_added``. Only the genes measured in both
    ``adata`` and ``reference`` are used.

    Both datasets are library-size normalised to the same total, ``target_sum`` (default: the median total counts
    of the reference cells over the shared genes), then ``log1p``-transformed.

    - ``method="correlation"``: the reference is reduced to one profile per group with
      :func:`ghist.pp.reference_profiles` (mean ``log1p`` counts, over the shared genes); every cell gets the group
      whose profile correlates best (``correlation="pearson"`` or ``"spearman"``) with its normalised expression.
      The score is that correlation. Cells without any count over the shared genes (or with a constant profile)
      get no type (``NaN``) and a ``NaN`` score.
    - ``method="ingest"``: the label transfer of :func:`scanpy.tl.ingest`: PCA of the normalised reference
      (:func:`scanpy.pp.pca`, ``n_comps`` components), each cell projected onto the reference's principal
      components, then the majority group of its ``n_neighbors`` nearest reference cells. The neighbours are
      exact (scikit-learn) rather than pynndescent's approximate ones; ties go to the group listed first. The score
      is the fraction of those neighbours that belong to the chosen group. Needs a reference with several cells
      per group (ideally tens) and at least two shared genes.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` or ``layers[layer]``, e.g. ``sdata.tables["table"]``.
    reference
        Single-cell reference (e.g. scRNA-seq): cells x genes with raw counts in ``X`` and groups in
        ``obs[groupby]``.
    groupby
        Column of ``reference.obs`` holding the cell types.
    method
        ``"correlation"`` (to reference profiles) or ``"ingest"`` (nearest reference cells in PCA space).
    correlation
        ``"pearson"`` or ``"spearman"``; used by ``method="correlation"``.
    layer
        Layer of ``adata`` holding raw counts (default ``X``).
    genes
        Genes to compare on (default: every gene of ``adata`` also in ``reference``, in ``adata``'s order); each
        must be in both.
    target_sum
        Total counts every cell is normalised to before ``log1p`` (default: median of the reference cells).
    n_neighbors
        Reference neighbours that vote, for ``method="ingest"``.
    n_comps
        Principal components, for ``method="ingest"`` (capped by the number of genes and reference cells).
    key_added
        Column of ``adata.obs`` that receives the cell types.
    overwrite
        Replace existing ``obs[key_added]`` / ``obs[f"{key_added}_score"]`` columns instead of raising.
    copy
        Return an annotated copy instead of annotating ``adata`` in place.

    Returns
    -------
    With ``copy=False``, ``None``; ``adata`` gets ``obs[key_added]`` (categorical, categories in the reference's
    group order), ``obs[f"{key_added}_score"]`` (float) and ``uns["ghist"]["annotate_cell_types"]`` (the settings).
    With ``copy=True``, an annotated copy and ``adata`` is left alone.

    Examples
    --------
    >>> ghist.pp.annotate_cell_types(sdata["table"], scrna, groupby="cell_type")
    >>> sdata["table"].obs[["cell_type", "cell_type_score"]].head()
    >>> tiles = ghist.pp.make_tiles(sdata, cell_type_key="cell_type")

    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected `adata` to be an AnnData, got {type(adata).__name__}.")
    if not isinstance(reference, AnnData):
        raise TypeError(f"Expected `reference` to be an AnnData single-cell reference, got {type(reference).__name__}.")
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {list(_METHODS)}; got {method!r}.")
    if correlation not in _CORRELATIONS:
        raise ValueError(f"`correlation` must be one of {list(_CORRELATIONS)}; got {correlation!r}.")
    if not isinstance(groupby, str):
        raise TypeError(f"`groupby` must be the name of a column of `reference.obs`; got {groupby!r}.")
    if groupby not in reference.obs:
        raise KeyError(f"Column {groupby!r} not found in `reference.obs` (have {list(reference.obs.columns)}).")
    check_number("target_sum", target_sum, optional=True)
    check_int("n_neighbors", n_neighbors, 1)
    check_int("n_comps", n_comps, 1)
    score_key = f"{key_added}_score"
    existing = [k for k in (key_added, score_key) if k in adata.obs]
    if existing and not overwrite:
        raise ValueError(f"`adata.obs` already has column(s) {existing}; pass another `key_added` or `overwrite=True`.")
    if adata.n_obs == 0:
        raise ValueError("`adata` has no cells.")

    if genes is None:
        genes = [g for g in adata.var_names if g in set(reference.var_names)]
        if not genes:
            raise ValueError(
                f"`adata` and `reference` share no gene: `adata` has {_preview(list(adata.var_names))}, the "
                f"reference {_preview(list(reference.var_names))}; expected the same gene names (symbols or ids)."
            )
    else:
        genes = check_genes(adata.var_names, genes, where="`adata`")
        genes = check_genes(reference.var_names, genes, where="the reference")
    if method == "ingest" and len(genes) < 2:
        raise ValueError(f"`method='ingest'` needs at least 2 shared genes; got {len(genes)}.")

    query = get_counts(adata[:, genes], layer=layer, where="`adata`")
    ref_sub = reference[:, genes]
    ref_counts = get_counts(ref_sub, where="the reference")
    ref_lib = np.asarray(ref_counts.sum(axis=1)).ravel()
    if target_sum is None:
        positive = ref_lib[ref_lib > 0]
        if positive.size == 0:
            raise ValueError(f"The reference has no counts over the {len(genes)} shared genes.")
        target_sum = float(np.median(positive))
    logger.info(
        "Annotating %d cells by %s against %d reference cells over %d shared genes.",
        adata.n_obs,
        method if method == "ingest" else f"{correlation} correlation",
        reference.n_obs,
        len(genes),
    )

    if method == "correlation":
        profiles = reference_profiles(reference, groupby, genes=genes)
        names = [str(n) for n in profiles.obs_names]
        codes, score = _by_correlation(query, np.asarray(profiles.X, dtype=np.float64), target_sum, correlation)
    else:
        names, codes, score = _by_ingest(
            query, ref_counts, reference.obs[groupby], target_sum, n_neighbors=n_neighbors, n_comps=n_comps
        )

    out = adata.copy() if copy else adata
    labels = pd.Categorical.from_codes(codes, categories=names)
    out.obs[key_added] = pd.Series(labels, index=out.obs_names)
    out.obs[score_key] = pd.Series(score.astype(np.float32), index=out.obs_names)
    uns = dict(out.uns.get(UNS_KEY, {}))
    uns["annotate_cell_types"] = {
        "params": {
            "groupby": groupby,
            "method": method,
            "correlation": correlation if method == "correlation" else None,
            "layer": layer,
            "target_sum": float(target_sum),
            "n_neighbors": int(n_neighbors) if method == "ingest" else None,
            "n_comps": int(n_comps) if method == "ingest" else None,
            "key_added": key_added,
            "genes": list(genes),
        }
    }
    out.uns[UNS_KEY] = uns
    n_missing = int((codes < 0).sum())
    counts = pd.Series(labels).value_counts()
    logger.info(
        "Added `obs[%r]` (%s) and `obs[%r]`%s.",
        key_added,
        ", ".join(f"{k} {v}" for k, v in counts.items() if v > 0),
        score_key,
        f"; {n_missing} cells without counts over the shared genes got no type" if n_missing else "",
    )
    return out if copy else None


def _log_normalised(block: np.ndarray | sp.spmatrix, target_sum: float) -> np.ndarray:
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    block = block.astype(np.float64)
    lib = block.sum(axis=1, keepdims=True)
    return np.log1p(block / np.where(lib > 0, lib, 1.0) * target_sum)


def _by_correlation(
    query: np.ndarray | sp.spmatrix, profiles: np.ndarray, target_sum: float, correlation: str
) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import rankdata  # scipy.stats is slow to import: not on `import ghist`

    if correlation == "spearman":
        profiles = rankdata(profiles, axis=1)
    if standardise_rows(profiles)[1].all():
        raise ValueError("Every reference profile is constant over the shared genes; cannot correlate.")
    n = query.shape[0]
    codes = np.full(n, -1, dtype=np.int64)
    score = np.full(n, np.nan, dtype=np.float64)
    for start in range(0, n, _BLOCK_ROWS):
        block = _log_normalised(query[start : start + _BLOCK_ROWS], target_sum)
        if correlation == "spearman":
            block = rankdata(block, axis=1)
        best, best_score = best_correlated(block, profiles)
        codes[start : start + len(best)] = best
        score[start : start + len(best)] = best_score
    return codes, score


def _by_ingest(
    query: np.ndarray | sp.spmatrix,
    ref_counts: np.ndarray | sp.spmatrix,
    groups: pd.Series,
    target_sum: float,
    *,
    n_neighbors: int,
    n_comps: int,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    groups = groups if isinstance(groups.dtype, pd.CategoricalDtype) else groups.astype("category")
    groups = groups.cat.remove_unused_categories()
    keep = np.asarray(groups.cat.codes) >= 0
    if keep.sum() < 2:
        raise ValueError(f"`method='ingest'` needs at least 2 reference cells with a group; got {int(keep.sum())}.")
    names = [str(c) for c in groups.cat.categories]
    ref_codes = np.asarray(groups.cat.codes)[keep]
    ref = AnnData(X=_log_normalised(ref_counts[np.flatnonzero(keep)], target_sum).astype(np.float32))
    n_comps = int(min(n_comps, ref.n_vars - 1, ref.n_obs - 1))
    if n_comps < 1:
        raise ValueError("`method='ingest'` needs at least 2 reference cells and 2 shared genes.")
    sc.pp.pca(ref, n_comps=n_comps, zero_center=True, random_state=0)
    mean = np.asarray(ref.X.mean(axis=0), dtype=np.float64)
    components = np.asarray(ref.varm["PCs"], dtype=np.float64)  # genes x comps
    k = int(min(n_neighbors, ref.n_obs))
    index = NearestNeighbors(n_neighbors=k).fit(np.asarray(ref.obsm["X_pca"], dtype=np.float64))

    n = query.shape[0]
    codes = np.empty(n, dtype=np.int64)
    score = np.empty(n, dtype=np.float64)
    n_groups = len(names)
    for start in range(0, n, _BLOCK_ROWS):
        block = _log_normalised(query[start : start + _BLOCK_ROWS], target_sum)
        embedded = (block - mean) @ components
        _, neighbours = index.kneighbors(embedded)
        votes = np.zeros((len(block), n_groups), dtype=np.int64)
        np.add.at(votes, (np.repeat(np.arange(len(block)), k), ref_codes[neighbours].ravel()), 1)
        best = votes.argmax(axis=1)
        codes[start : start + len(best)] = best
        score[start : start + len(best)] = votes[np.arange(len(best)), best] / k
    return names, codes, score
