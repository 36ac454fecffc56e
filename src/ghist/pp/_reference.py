"""Single-cell reference profiles: one expression profile per cell group."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import UNS_KEY
from .._validation import check_genes, check_profiles, get_counts

logger = logging.getLogger(__name__)

_INTEGER_CHECK_VALUES = 100_000  # values inspected when checking that counts look raw


def reference_profiles(
    adata: AnnData,
    groupby: str,
    *,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
) -> AnnData:
    """Reduce a single-cell reference to one expression profile per group.

    Each profile is the **mean of** ``log1p(counts)`` over the group's cells (log first, then average: the same
    scale as the expression that :func:`ghist.pp.make_tiles` stores and the network predicts). Cells whose
    ``groupby`` value is missing are left out, and so are empty categories.

    Parameters
    ----------
    adata
        Single-cell reference (e.g. scRNA-seq): cells x genes with raw counts in ``X`` or ``layers[layer]``.
    groupby
        Column of ``adata.obs`` holding the groups (e.g. cell types or finer clusters).
    genes
        Genes to keep, in this order (default: all of ``adata.var_names``). Usually the genes of the tiles.
    layer
        Layer holding raw counts (default ``X``).

    Returns
    -------
    Groups x genes :class:`~anndata.AnnData`: ``X`` float32 mean log1p counts, ``obs_names`` the group names (in
    category order for a categorical column, sorted otherwise), ``obs["n_cells"]`` the number of cells per group,
    ``uns["ghist"]["params"]`` the settings. ``adata`` is not modified.

    Examples
    --------
    >>> ref = ghist.pp.reference_profiles(scrna, "cell_type", genes=tiles.genes)
    >>> ref.to_df().loc["T", "CD3E"]

    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData single-cell reference, got {type(adata).__name__}.")
    if not isinstance(groupby, str):
        raise TypeError(f"`groupby` must be the name of a column of `adata.obs`; got {groupby!r}.")
    if groupby not in adata.obs:
        raise KeyError(f"Column {groupby!r} not found in `adata.obs` (have {list(adata.obs.columns)}).")
    genes = check_genes(adata.var_names, genes, where="the reference `adata`")
    if adata.n_obs == 0:
        raise ValueError("The reference `adata` has no cells.")

    column = adata.obs[groupby]
    groups = column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
    groups = groups.cat.remove_unused_categories()
    if isinstance(column.dtype, pd.CategoricalDtype):
        categories = list(groups.cat.categories)
    else:
        categories = sorted(groups.cat.categories, key=str)
        groups = groups.cat.reorder_categories(categories)
    codes = np.asarray(groups.cat.codes)
    keep = codes >= 0
    if not keep.any():
        raise ValueError(f"Column {groupby!r} of the reference has no non-missing group.")
    if not keep.all():
        logger.info("Leaving out %d reference cells without a %r value.", int((~keep).sum()), groupby)
    names = [str(c) for c in categories]
    if len(set(names)) != len(names):
        raise ValueError(f"Groups of {groupby!r} are not unique as strings: {names}.")

    sub = adata[keep][:, genes] if not keep.all() else adata[:, genes]
    X = get_counts(sub, layer=layer, where="the reference `adata`", integer=False)  # warns below instead
    _warn_if_not_counts(X)
    X = X.tocsr().astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    X = X.log1p() if sp.issparse(X) else np.log1p(X)

    codes = codes[keep]
    n_groups = len(names)
    n_cells = np.bincount(codes, minlength=n_groups)
    indicator = sp.csr_matrix(
        (1.0 / n_cells[codes], (codes, np.arange(codes.size))), shape=(n_groups, codes.size), dtype=np.float64
    )
    means = indicator @ X
    means = means.toarray() if sp.issparse(means) else np.asarray(means)

    check_profiles(means, names, where=f"The reference profiles of {groupby!r}")

    obs = pd.DataFrame({"n_cells": n_cells.astype(np.int64)}, index=pd.Index(names, name=groupby))
    out = AnnData(X=means.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    out.uns[UNS_KEY] = {
        "params": {"groupby": groupby, "layer": layer, "n_genes": len(genes), "profile": "mean of log1p(counts)"}
    }
    logger.info("Made %d reference profiles over %d genes from %d cells.", n_groups, len(genes), int(codes.size))
    return out


def _warn_if_not_counts(X: np.ndarray | sp.spmatrix) -> None:
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    values = values[:_INTEGER_CHECK_VALUES]
    if values.size and not np.allclose(values, np.round(values)):
        logger.warning(
            "The reference holds non-integer values; `reference_profiles` expects raw counts (it takes log1p). "
            "Pass `layer=` with raw counts if `X` is normalised."
        )
