"""`ghist.tl.predict_cohort`: predict many H&E slides (optionally on dask.distributed) and summarise each one."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from .._constants import IMAGE_KEY, LABELS_KEY, PRED_CELL_TYPE_KEY, PRED_KEY
from .._docs import doc_image_key, doc_labels_key, doc_params, doc_progress

if TYPE_CHECKING:
    from distributed import Client

    from .._model import GHISTModel

logger = logging.getLogger(__name__)

COHORT_UNS_KEY = "ghist_cohort"
FEATURE_KINDS = ("count", "prop", "expr", "expr_by_type", "score")
# predict() arguments that predict_cohort sets itself.
_RESERVED = ("image_key", "labels_key", "key_added", "overwrite", "progress")


@doc_params(image_key=doc_image_key, labels_key=doc_labels_key, progress=doc_progress)
def predict_cohort(
    slides: Mapping[str, SpatialData | str | os.PathLike],
    model: GHISTModel,
    *,
    image_key: str = IMAGE_KEY,
    labels_key: str = LABELS_KEY,
    client: Client | None = None,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    per_type: bool = False,
    segment: bool = True,
    segment_kwargs: Mapping[str, Any] | None = None,
    score_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    **predict_kwargs: Any,
) -> AnnData:
    """Predict every slide of a cohort and summarise each one into a row of per-sample features.

    For each slide, the nuclei are segmented first when ``labels_key`` is missing (with
    :func:`ghist.pp.segment_nuclei`, if ``segment=True``), then :func:`ghist.tl.predict` predicts every cell, and
    the cells are summarised into one row: cell-type proportions, mean predicted expression, optionally mean
    expression within each predicted type and gene-set scores. The result is ready for
    :func:`ghist.tl.survival` once clinical columns are joined into its ``obs``.

    The user's slides are never modified: each slide is predicted on a new in-memory
    :class:`~spatialdata.SpatialData` that shares its image and labels (nothing is written into the object nor
    into its zarr store), and the per-cell tables are discarded after summarising. Run :func:`ghist.tl.predict`
    on a slide to keep its cells.

    With a :class:`dask.distributed.Client`, each slide is one task (slides given as paths are read by the
    worker); the model's weights are sent once to every worker (:meth:`~distributed.Client.scatter`) and the
    prediction runs on the workers' CPUs (unless ``accelerator`` says otherwise). Without a client, slides are
    predicted one after the other in this process.

    Parameters
    ----------
    slides
        Sample id -> a :class:`~spatialdata.SpatialData` or the path of a SpatialData zarr store (read with
        :func:`spatialdata.read_zarr` where the slide is predicted).
    model
        A trained :class:`ghist.GHISTModel`.
    {image_key}
    {labels_key}
    client
        A :class:`dask.distributed.Client` to run the slides on; ``None`` runs them here, one after the other.
    gene_sets
        Gene-set name -> genes. Each set is scored per cell with :func:`scanpy.tl.score_genes` on the predicted
        expression and averaged over the slide's cells. Genes outside the model's panel are ignored (with a
        warning); a set with none of its genes in the panel is an error.
    per_type
        Also give the mean expression of every gene within every predicted cell type (``n_types * n_genes``
        features, ``NaN`` where a slide has no cell of a type).
    segment
        Segment the nuclei of slides that lack ``labels_key``; with ``False`` such a slide is an error.
    segment_kwargs
        Extra arguments of :func:`ghist.pp.segment_nuclei` (e.g. ``method``, ``min_area_um2``).
    score_kwargs
        Extra arguments of :func:`scanpy.tl.score_genes` (e.g. ``ctrl_size``, ``n_bins``). Defaults here:
        ``random_state=0`` (reproducible scores) and ``n_bins`` the number of genes // 10, between 1 and 25 (so
        that small panels still have control genes in every expression bin).
    {progress}
    **predict_kwargs
        Passed on to :func:`ghist.tl.predict` (e.g. ``alpha``, ``batch_size``, ``accelerator``, ``seed``).

    Returns
    -------
    Samples x features :class:`~anndata.AnnData` (``obs_names``: the sample ids, in the order of ``slides``) with

    - ``X``: the features; ``var_names``: ``n_cells``, ``prop:<type>`` (fraction of the slide's cells predicted
      as the type), ``expr:<gene>`` (mean predicted ``log1p`` expression), ``expr:<type>:<gene>`` (with
      ``per_type``) and ``score:<name>`` (with ``gene_sets``);
    - ``var["kind"]``: ``"count"``, ``"prop"``, ``"expr"``, ``"expr_by_type"`` or ``"score"``;
    - ``obs["segmented"]``: whether the slide's nuclei were segmented here;
    - ``uns["ghist_cohort"]["params"]``: the settings of the run.

    Examples
    --------
    >>> slides, clinical = ghist.datasets.synthetic_cohort(40)  # doctest: +SKIP
    >>> cohort = ghist.tl.predict_cohort(slides, model, gene_sets={{"immune": ["PTPRC", "CD3E"]}})  # doctest: +SKIP
    >>> cohort.obs = cohort.obs.join(clinical)  # doctest: +SKIP
    >>> ghist.tl.survival(cohort, duration_key="time", event_key="event")  # doctest: +SKIP

    With a cluster, one task per slide:

    >>> from dask.distributed import Client
    >>> cohort = ghist.tl.predict_cohort(paths, model, client=Client(n_workers=4))  # doctest: +SKIP

    """
    from .._model import GHISTModel
    from .._version import __version__

    if not isinstance(model, GHISTModel):
        raise TypeError(f"`model` must be a GHISTModel (from `ghist.tl.fit` or `GHISTModel.load`), got {type(model)}.")
    if not isinstance(slides, Mapping):
        raise TypeError(f"`slides` must be a mapping of sample id -> SpatialData or zarr path, got {type(slides)}.")
    if len(slides) == 0:
        raise ValueError("`slides` is empty; expected at least one sample id -> SpatialData or zarr path.")
    reserved = sorted(set(predict_kwargs) & set(_RESERVED))
    if reserved:
        raise TypeError(f"{reserved} are set by `predict_cohort`; pass `image_key`/`labels_key` to it directly.")
    samples = [str(s) for s in slides]
    if len(set(samples)) != len(samples):
        raise ValueError("Sample ids of `slides` are not unique once converted to strings.")
    for sample, slide in slides.items():
        _check_slide(str(sample), slide, image_key, labels_key, segment)
    gene_sets = _check_gene_sets(gene_sets, model.genes)
    names, kinds = _feature_names(model, gene_sets, per_type)
    options = {
        "image_key": image_key,
        "labels_key": labels_key,
        "gene_sets": gene_sets,
        "per_type": bool(per_type),
        "segment": bool(segment),
        "segment_kwargs": dict(segment_kwargs or {}),
        "score_kwargs": dict(score_kwargs or {}),
        "predict_kwargs": dict(predict_kwargs),
    }
    start = time.perf_counter()
    if client is None:
        results = _run_local(slides, model, options, progress)
    else:
        options["predict_kwargs"].setdefault("accelerator", "cpu")
        results = _run_distributed(slides, model, {**options, "in_worker": True}, client, progress)

    X = np.vstack([results[s][0] for s in slides])
    obs = pd.DataFrame({"segmented": [bool(results[s][1]) for s in slides]}, index=pd.Index(samples))
    var = pd.DataFrame({"kind": pd.Categorical(kinds, categories=list(FEATURE_KINDS))}, index=pd.Index(names))
    adata = AnnData(X=X, obs=obs, var=var)
    adata.uns[COHORT_UNS_KEY] = {
        "params": {
            "image_key": image_key,
            "labels_key": labels_key,
            "per_type": bool(per_type),
            "segment": bool(segment),
            "gene_sets": gene_sets,
            "segment_kwargs": _jsonable(options["segment_kwargs"]),
            "score_kwargs": _jsonable(options["score_kwargs"]),
            "predict_kwargs": _jsonable(options["predict_kwargs"]),
            "distributed": client is not None,
            "genes": list(model.genes),
            "cell_types": list(model.cell_types or []),
            "ghist_version": __version__,
        }
    }
    logger.info(
        "Predicted %d slides (%d segmented here) into %d features in %.1f s",
        adata.n_obs,
        int(obs["segmented"].sum()),
        adata.n_vars,
        time.perf_counter() - start,
    )
    return adata


# ---------------------------------------------------------------------------------------------- runners
def _run_local(
    slides: Mapping[str, Any], model: GHISTModel, options: dict[str, Any], progress: bool
) -> dict[str, tuple[np.ndarray, bool]]:
    from tqdm.auto import tqdm

    results = {}
    for sample, slide in tqdm(slides.items(), desc="ghist.tl.predict_cohort", unit="slide", disable=not progress):
        results[sample] = _predict_slide(str(sample), slide, model, options)
    return results


def _run_distributed(
    slides: Mapping[str, Any], model: GHISTModel, options: dict[str, Any], client: Client, progress: bool
) -> dict[str, tuple[np.ndarray, bool]]:
    from distributed import as_completed
    from tqdm.auto import tqdm

    # A plain dict of CPU tensors, sent once to every worker; each task rebuilds its own model from it, so the
    # user's model is never moved between devices nor shared between threads.
    [state] = client.scatter([model._to_state()], broadcast=True, hash=False)
    in_memory = [s for s, v in slides.items() if isinstance(v, SpatialData)]
    scattered = dict(zip(in_memory, client.scatter([slides[s] for s in in_memory], hash=False))) if in_memory else {}
    token = uuid.uuid4().hex[:8]
    futures = {}
    for sample, slide in slides.items():
        arg = scattered.get(sample, slide if isinstance(slide, SpatialData) else os.fspath(slide))
        fut = client.submit(
            _predict_slide, str(sample), arg, state, options, key=f"ghist-predict-{sample}-{token}", pure=False
        )
        futures[fut.key] = (sample, fut)
    results = {}
    try:
        bar = tqdm(total=len(futures), desc="ghist.tl.predict_cohort", unit="slide", disable=not progress)
        with bar:
            for fut in as_completed([f for _, f in futures.values()]):
                results[futures[fut.key][0]] = fut.result()  # re-raises a task's error here
                bar.update()
    finally:
        client.cancel([f for _, f in futures.values()] + [state, *scattered.values()])
    return results


# ---------------------------------------------------------------------------------------------- one slide
def _predict_slide(
    sample: str, slide: SpatialData | str, model: GHISTModel | dict[str, Any], options: dict[str, Any]
) -> tuple[np.ndarray, bool]:
    """Predict one slide and summarise it; top-level so that dask can run it on a worker."""
    import spatialdata

    from .._model import GHISTModel
    from ..pp import segment_nuclei
    from ._predict import predict

    if options.get("in_worker"):
        import dask

        # One slide is one task: read its image blocks in this thread rather than submitting nested tasks.
        with dask.config.set(scheduler="synchronous"):
            return _predict_slide(sample, slide, model, {**options, "in_worker": False})
    image_key, labels_key = options["image_key"], options["labels_key"]
    if not isinstance(slide, SpatialData):
        slide = spatialdata.read_zarr(slide)
    _check_slide(sample, slide, image_key, labels_key, options["segment"])
    if isinstance(model, dict):
        model = GHISTModel._from_state(model)
    # A new in-memory SpatialData sharing the elements: predict and segment_nuclei write into it, not the user's.
    work = SpatialData(images={image_key: slide.images[image_key]})
    segmented = labels_key not in slide.labels
    if segmented:
        logger.info("Slide %r has no labels %r: segmenting nuclei.", sample, labels_key)
        segment_nuclei(work, image_key=image_key, key_added=labels_key, progress=False, **options["segment_kwargs"])
    else:
        work.labels[labels_key] = slide.labels[labels_key]
    table = predict(
        work,
        model,
        image_key=image_key,
        labels_key=labels_key,
        key_added=PRED_KEY,
        progress=False,
        **options["predict_kwargs"],
    )
    return _summarise(table, model, options["gene_sets"], options["per_type"], options["score_kwargs"]), segmented


def _summarise(
    table: AnnData,
    model: GHISTModel,
    gene_sets: dict[str, list[str]],
    per_type: bool,
    score_kwargs: Mapping[str, Any],
) -> np.ndarray:
    """One slide's features, in the order of :func:`_feature_names`."""
    X = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, dtype=np.float64)
    types = list(model.cell_types or [])
    parts = [np.array([table.n_obs], dtype=np.float64)]
    if types:
        codes = pd.Categorical(table.obs[PRED_CELL_TYPE_KEY], categories=types).codes
        counts = np.bincount(codes[codes >= 0], minlength=len(types)).astype(np.float64)
        parts.append(counts / max(table.n_obs, 1))
    parts.append(X.mean(axis=0) if table.n_obs else np.full(X.shape[1], np.nan))
    if per_type and types:
        by_type = np.full((len(types), X.shape[1]), np.nan)
        for t in range(len(types)):
            sel = codes == t
            if sel.any():
                by_type[t] = X[sel].mean(axis=0)
        parts.append(by_type.ravel())
    if gene_sets:
        import scanpy as sc

        scored = AnnData(X=X.astype(np.float32), var=pd.DataFrame(index=table.var_names.copy()))
        # Fewer expression bins for small panels, so that every bin has control genes besides the set's own.
        kwargs = {"random_state": 0, "n_bins": int(np.clip(X.shape[1] // 10, 1, 25)), **score_kwargs}
        scores = []
        for genes in gene_sets.values():
            sc.tl.score_genes(scored, genes, score_name="__score__", use_raw=False, **kwargs)
            scores.append(float(scored.obs["__score__"].mean()))
        parts.append(np.array(scores))
    return np.concatenate(parts)


def _feature_names(model: GHISTModel, gene_sets: dict[str, list[str]], per_type: bool) -> tuple[list[str], list[str]]:
    types, genes = list(model.cell_types or []), list(model.genes)
    names, kinds = ["n_cells"], ["count"]
    names += [f"prop:{t}" for t in types]
    kinds += ["prop"] * len(types)
    names += [f"expr:{g}" for g in genes]
    kinds += ["expr"] * len(genes)
    if per_type and types:
        names += [f"expr:{t}:{g}" for t in types for g in genes]
        kinds += ["expr_by_type"] * (len(types) * len(genes))
    names += [f"score:{s}" for s in gene_sets]
    kinds += ["score"] * len(gene_sets)
    return names, kinds


# ---------------------------------------------------------------------------------------------- checks
def _check_slide(sample: str, slide: Any, image_key: str, labels_key: str, segment: bool) -> None:
    if isinstance(slide, str | os.PathLike):
        if not Path(slide).exists():
            raise FileNotFoundError(f"Slide {sample!r}: no SpatialData zarr store at {os.fspath(slide)!r}.")
        return
    if not isinstance(slide, SpatialData):
        raise TypeError(f"Slide {sample!r} must be a SpatialData or the path of a zarr store, got {type(slide)}.")
    if image_key not in slide.images:
        raise KeyError(
            f"Slide {sample!r}: image {image_key!r} not found in `sdata.images` (have {sorted(slide.images)})."
        )
    if labels_key not in slide.labels and not segment:
        raise KeyError(
            f"Slide {sample!r}: labels {labels_key!r} not found in `sdata.labels` (have {sorted(slide.labels)}); "
            "pass `segment=True` to segment the nuclei with `ghist.pp.segment_nuclei`."
        )


def _check_gene_sets(gene_sets: Mapping[str, Sequence[str]] | None, panel: Sequence[str]) -> dict[str, list[str]]:
    if not gene_sets:
        return {}
    if not isinstance(gene_sets, Mapping):
        raise TypeError(f"`gene_sets` must be a mapping of name -> genes, got {type(gene_sets).__name__}.")
    in_panel = set(panel)
    out = {}
    for name, genes in gene_sets.items():
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        kept = [g for g in dict.fromkeys(genes) if g in in_panel]
        if not kept:
            raise KeyError(f"Gene set {name!r}: none of its genes {genes[:5]} is among the model's {len(panel)} genes.")
        if len(kept) < len(genes):
            missing = [g for g in genes if g not in in_panel]
            logger.warning(
                "Gene set %r: ignoring %d genes not in the model's panel: %s", name, len(missing), missing[:5]
            )
        out[str(name)] = kept
    return out


# ---------------------------------------------------------------------------------------------- helpers
def _jsonable(value: Any) -> Any:
    """Plain JSON-like copy of ``value`` (anything else becomes its ``repr``), so that it can be written to zarr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return repr(value)
