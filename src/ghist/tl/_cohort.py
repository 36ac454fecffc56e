"""`ghist.tl.predict_cohort`: predict many H&E slides (optionally on dask.distributed) and summarise each one."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from .._bundled_models import resolve_model
from .._constants import (
    COHORT_PROP_PREFIX,
    COHORT_SE_LAYER,
    COHORT_UNS_KEY,
    IMAGE_KEY,
    LABELS_KEY,
    PRED_CELL_TYPE_KEY,
    PRED_KEY,
    PRED_PROBA_KEY,
    PRED_STD_LAYER,
)
from .._docs import doc_image_key, doc_labels_key, doc_params, doc_progress
from .._folders import replaced_file
from .._validation import ValidationError

if TYPE_CHECKING:
    from distributed import Client

    from .._model import GHISTModel

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("count", "prop", "expr", "expr_by_type", "score")
# predict() arguments that predict_cohort sets itself.
_RESERVED = ("image_key", "labels_key", "key_added", "overwrite", "progress")


@doc_params(image_key=doc_image_key, labels_key=doc_labels_key, progress=doc_progress)
def predict_cohort(
    slides: Mapping[str, SpatialData | str | os.PathLike],
    model: GHISTModel | str | os.PathLike | None = None,
    *,
    image_key: str = IMAGE_KEY,
    labels_key: str = LABELS_KEY,
    client: Client | None = None,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    per_type: bool = False,
    segment: bool = True,
    segment_kwargs: Mapping[str, Any] | None = None,
    score_kwargs: Mapping[str, Any] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    cache_dir: str | os.PathLike | None = None,
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

    Every slide is checked before any slide is predicted (image and labels keys, image dtype and channels,
    labels dtype, the extents of image and labels, that a path opens as a SpatialData store), and every problem
    found is reported at once, naming its slide. An error while a slide is predicted names the slide too.

    Parameters
    ----------
    slides
        Sample id -> a :class:`~spatialdata.SpatialData` or the path of a SpatialData zarr store (read with
        :func:`spatialdata.read_zarr` where the slide is predicted).
    model
        A trained :class:`ghist.GHISTModel`, a shipped model's name (:func:`ghist.models.available`), a saved
        model's folder, or ``None`` for :data:`ghist.models.DEFAULT_MODEL` (as in :func:`ghist.tl.predict`).
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
        ``random_state=0`` (reproducible scores) and ``n_bins`` about the number of genes // 10, between 3 and 25,
        chosen so that every expression bin has control genes besides the set's own.
    on_error
        ``"raise"``: a slide that fails its checks stops the run before any work (one
        :class:`~ghist._validation.ValidationError` lists the problems of every slide), and an error while
        predicting a slide is raised, naming the slide. ``"skip"``: such slides are left out of the result (with a
        warning) and listed in ``uns["ghist_cohort"]["failed"]``; the other slides are returned.
    cache_dir
        A folder keeping each finished slide's features (one ``.npz`` file per slide, written as soon as the slide
        is done), keyed by its sample id and a fingerprint of the model's weights and of these settings. A rerun
        with the same folder, model and settings reuses the slides finished before (e.g. after a failure or an
        interruption) instead of predicting them again. Sample ids name slides across runs: a different slide
        under a reused sample id is not detected.
    {progress}
    **predict_kwargs
        Passed on to :func:`ghist.tl.predict` (e.g. ``alpha``, ``batch_size``, ``accelerator``, ``seed``).

    Returns
    -------
    Samples x features :class:`~anndata.AnnData` (``obs_names``: the sample ids, in the order of ``slides``) with

    - ``X``: the features; ``var_names``: ``n_cells``, ``prop:<type>`` (fraction of the slide's cells predicted
      as the type), ``expr:<gene>`` (mean predicted ``log1p`` expression), ``expr:<type>:<gene>`` (with
      ``per_type``) and ``score:<name>`` (with ``gene_sets``);
    - ``layers["ghist_se"]``: the standard error of each feature (``NaN`` for ``n_cells``): for a mean over the
      slide's cells, ``sqrt(sum_i sigma_i^2 / n^2 + s^2 / n)`` with ``sigma_i`` a cell's predictive spread
      (``layers["ghist_std"]`` of :func:`ghist.tl.predict`; cells' errors taken as independent) and ``s`` the
      between-cell standard deviation (the slide's cells as a sample of its tissue); for a proportion the same with
      ``sigma_i^2 = p_i (1 - p_i)`` from the cell's type probability and ``s^2 = prop (1 - prop)``; gene-set scores
      the between-cell part only. It feeds ``ghist.tl.survival(weights="inverse_variance")``;
    - ``var["kind"]``: ``"count"``, ``"prop"``, ``"expr"``, ``"expr_by_type"`` or ``"score"``;
    - ``obs["segmented"]``: whether the slide's nuclei were segmented here;
    - ``uns["ghist_cohort"]["params"]``: the settings of the run;
    - ``uns["ghist_cohort"]["failed"]``: sample id -> ``"ExceptionType: message"`` of the slides left out
      (with ``on_error="skip"``; empty otherwise), and ``uns["ghist_cohort"]["cached"]``: the sample ids whose
      features were read from ``cache_dir``.

    Examples
    --------
    >>> slides, clinical = ghist.datasets.synthetic_cohort(40)  # doctest: +SKIP
    >>> cohort = ghist.tl.predict_cohort(slides, model, gene_sets={{"immune": ["PTPRC", "CD3E"]}})  # doctest: +SKIP
    >>> cohort.obs = cohort.obs.join(clinical)  # doctest: +SKIP
    >>> ghist.tl.survival(cohort, duration_key="time", event_key="event")  # doctest: +SKIP

    Keep going past broken slides, and resume an interrupted run:

    >>> cohort = ghist.tl.predict_cohort(slides, model, on_error="skip", cache_dir="cohort_cache")  # doctest: +SKIP
    >>> cohort.uns["ghist_cohort"]["failed"]  # doctest: +SKIP

    With a cluster, one task per slide:

    >>> from dask.distributed import Client
    >>> cohort = ghist.tl.predict_cohort(paths, model, client=Client(n_workers=4))  # doctest: +SKIP

    """
    from .._version import __version__

    if not isinstance(slides, Mapping):
        raise TypeError(f"`slides` must be a mapping of sample id -> SpatialData or zarr path, got {type(slides)}.")
    if len(slides) == 0:
        raise ValueError("`slides` is empty; expected at least one sample id -> SpatialData or zarr path.")
    reserved = sorted(set(predict_kwargs) & set(_RESERVED))
    if reserved:
        raise TypeError(f"{reserved} are set by `predict_cohort`; pass `image_key`/`labels_key` to it directly.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"`on_error` must be 'raise' or 'skip', got {on_error!r}.")
    model = resolve_model(model)
    samples = [str(s) for s in slides]
    if len(set(samples)) != len(samples):
        raise ValueError("Sample ids of `slides` are not unique once converted to strings.")
    slides = {str(sample): slide for sample, slide in slides.items()}
    wrong = [
        f"Slide {sample!r}: expected a SpatialData or the path of a SpatialData zarr store, got a "
        f"{type(slide).__name__}."
        for sample, slide in slides.items()
        if not isinstance(slide, SpatialData | str | os.PathLike)
    ]
    if wrong:
        raise TypeError(" ".join(wrong))
    gene_sets = _check_gene_sets(gene_sets, model.genes)
    names, kinds = _feature_names(model, gene_sets, per_type)
    options = {
        "image_key": image_key,
        "labels_key": labels_key,
        "gene_sets": gene_sets,
        "per_type": bool(per_type),
        "segment": bool(segment),
        "segment_kwargs": dict(segment_kwargs or {}),
        # With its defaults filled in, so that the cache's fingerprint and `uns` hold the scoring as run.
        "score_kwargs": {"random_state": 0, "n_bins": score_n_bins(len(model.genes)), **(score_kwargs or {})},
        "predict_kwargs": dict(predict_kwargs),
    }
    if client is not None:
        options["predict_kwargs"].setdefault("accelerator", "cpu")

    # Every slide is checked before any is predicted, so that a bad slide late in the list costs no work.
    failed: dict[str, str] = {}
    problems = {
        sample: _slide_problems(sample, slide, image_key, labels_key, segment) for sample, slide in slides.items()
    }
    problems = {sample: found for sample, found in problems.items() if found}
    if problems and on_error == "raise":
        raise ValidationError([f"Slide {sample!r}: {p}" for sample, found in problems.items() for p in found])
    for sample, found in problems.items():
        failed[sample] = "ValidationError: " + "; ".join(found)
        logger.warning("Skipping slide %r: %s", sample, "; ".join(found))

    cache = _Cache(cache_dir, model, options, names) if cache_dir is not None else None
    results: dict[str, tuple[np.ndarray, bool]] = {}
    todo = {sample: slide for sample, slide in slides.items() if sample not in problems}
    cached = []
    if cache is not None:
        for sample in list(todo):
            hit = cache.load(sample)
            if hit is not None:
                results[sample] = hit
                cached.append(sample)
                del todo[sample]
        logger.info("Reused %d of %d slides from the cache %s", len(cached), len(slides), os.fspath(cache_dir))

    def done(sample: str, result: tuple[np.ndarray, bool]) -> None:
        results[sample] = result
        if cache is not None:
            cache.save(sample, result)

    def fail(sample: str, err: BaseException) -> None:
        if on_error == "raise":
            raise err
        failed[sample] = f"{type(err).__name__}: {_message(err, sample)}"
        logger.warning("Slide %r failed and is left out: %s", sample, failed[sample])

    start = time.perf_counter()
    if todo and client is None:
        _run_local(todo, model, options, progress, done, fail)
    elif todo:
        _run_distributed(todo, model, {**options, "in_worker": True}, client, progress, done, fail)
    finished = [sample for sample in slides if sample in results]
    if not finished:
        raise ValueError(
            "No slide could be predicted: " + "; ".join(f"{sample!r}: {msg}" for sample, msg in failed.items())
        )

    both = np.vstack([results[s][0] for s in finished])
    X, se = both[:, : len(names)], both[:, len(names) :]
    obs = pd.DataFrame({"segmented": [bool(results[s][1]) for s in finished]}, index=pd.Index(finished))
    var = pd.DataFrame({"kind": pd.Categorical(kinds, categories=list(FEATURE_KINDS))}, index=pd.Index(names))
    adata = AnnData(X=X, obs=obs, var=var, layers={COHORT_SE_LAYER: se})
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
            "on_error": on_error,
            "cache_dir": None if cache_dir is None else os.fspath(cache_dir),
        },
        "failed": {sample: failed[sample] for sample in slides if sample in failed},
        "cached": cached,
    }
    if failed:
        logger.warning("%d of %d slides failed and are left out: %s", len(failed), len(slides), sorted(failed))
    logger.info(
        "Predicted %d slides (%d segmented here) into %d features in %.1f s",
        adata.n_obs,
        int(obs["segmented"].sum()),
        adata.n_vars,
        time.perf_counter() - start,
    )
    return adata


# ---------------------------------------------------------------------------------------------- runners
Done = Callable[[str, tuple[np.ndarray, bool]], None]
Fail = Callable[[str, BaseException], None]


def _run_local(
    slides: Mapping[str, Any], model: GHISTModel, options: dict[str, Any], progress: bool, done: Done, fail: Fail
) -> None:
    from tqdm.auto import tqdm

    for sample, slide in tqdm(slides.items(), desc="ghist.tl.predict_cohort", unit="slide", disable=not progress):
        try:
            result = _predict_slide(sample, slide, model, options)
        except Exception as err:  # `fail` raises it again, or records it with `on_error="skip"`
            fail(sample, err)
        else:
            done(sample, result)


def _run_distributed(
    slides: Mapping[str, Any],
    model: GHISTModel,
    options: dict[str, Any],
    client: Client,
    progress: bool,
    done: Done,
    fail: Fail,
) -> None:
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
            _predict_slide, sample, arg, state, options, key=f"ghist-predict-{sample}-{token}", pure=False
        )
        futures[fut.key] = (sample, fut)
    try:
        bar = tqdm(total=len(futures), desc="ghist.tl.predict_cohort", unit="slide", disable=not progress)
        with bar:
            # Results are handled here, on the client, as they arrive: the cache is written by this process only.
            for fut in as_completed([f for _, f in futures.values()]):
                sample = futures[fut.key][0]
                try:
                    result = fut.result()  # re-raises the task's error (which names the slide) here
                except Exception as err:  # `fail` raises it again, or records it
                    fail(sample, err)
                else:
                    done(sample, result)
                bar.update()
    finally:
        client.cancel([f for _, f in futures.values()] + [state, *scattered.values()])


# ---------------------------------------------------------------------------------------------- one slide
def _predict_slide(
    sample: str, slide: SpatialData | str, model: GHISTModel | dict[str, Any], options: dict[str, Any]
) -> tuple[np.ndarray, bool]:
    """Predict one slide and summarise it; top-level so that dask can run it on a worker.

    Any error is raised again with the slide named in its message (same type where it can be rebuilt).
    """
    if options.get("in_worker"):
        import dask

        # One slide is one task: read its image blocks in this thread rather than submitting nested tasks.
        with dask.config.set(scheduler="synchronous"):
            return _predict_slide(sample, slide, model, {**options, "in_worker": False})
    try:
        return _predict_one(sample, slide, model, options)
    except Exception as err:
        named = _name_slide(err, sample)
        if named is err:
            raise
        raise named from err


def _predict_one(
    sample: str, slide: SpatialData | str, model: GHISTModel | dict[str, Any], options: dict[str, Any]
) -> tuple[np.ndarray, bool]:
    import spatialdata

    from .._model import GHISTModel
    from ..pp import segment_nuclei
    from ._predict import predict

    image_key, labels_key = options["image_key"], options["labels_key"]
    if not isinstance(slide, SpatialData):
        slide = spatialdata.read_zarr(slide)
    # Checked up front already; again here for stores read on a worker (cheap: nothing is computed).
    problems = _slide_problems(sample, slide, image_key, labels_key, options["segment"])
    if problems:
        raise ValidationError(problems)
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
    """One slide's features, in the order of :func:`_feature_names`, followed by their standard errors (same order).

    See :mod:`ghist.tl._cohort_se` for what each standard error is.
    """
    from ._cohort_se import mean_se, proportion_se

    X = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, dtype=np.float64)
    std = table.layers.get(PRED_STD_LAYER)
    std = None if std is None else np.asarray(std, dtype=np.float64)
    types = list(model.cell_types or [])
    parts = [np.array([table.n_obs], dtype=np.float64)]
    ses = [np.array([np.nan])]  # a count of cells: no standard error
    if types:
        codes = pd.Categorical(table.obs[PRED_CELL_TYPE_KEY], categories=types).codes
        counts = np.bincount(codes[codes >= 0], minlength=len(types)).astype(np.float64)
        parts.append(counts / max(table.n_obs, 1))
        proba = table.obsm.get(PRED_PROBA_KEY)
        ses.append(
            proportion_se(parts[-1], None if proba is None else np.asarray(proba, dtype=np.float64), table.n_obs)
        )
    parts.append(X.mean(axis=0) if table.n_obs else np.full(X.shape[1], np.nan))
    ses.append(mean_se(X, std))
    if per_type and types:
        by_type = np.full((len(types), X.shape[1]), np.nan)
        by_type_se = np.full((len(types), X.shape[1]), np.nan)
        for t in range(len(types)):
            sel = codes == t
            if sel.any():
                by_type[t] = X[sel].mean(axis=0)
                by_type_se[t] = mean_se(X[sel], None if std is None else std[sel])
        parts.append(by_type.ravel())
        ses.append(by_type_se.ravel())
    if gene_sets:
        import scanpy as sc

        scored = AnnData(X=X.astype(np.float32), var=pd.DataFrame(index=table.var_names.copy()))
        scores, score_ses = [], []
        for genes in gene_sets.values():
            sc.tl.score_genes(scored, genes, score_name="__score__", use_raw=False, **score_kwargs)
            per_cell = scored.obs["__score__"].to_numpy(dtype=np.float64)
            scores.append(float(per_cell.mean()))
            score_ses.append(float(mean_se(per_cell[:, None], None)[0]))
        parts.append(np.array(scores))
        ses.append(np.array(score_ses))
    return np.concatenate([*parts, *ses])


def score_n_bins(n_genes: int) -> int:
    """``n_bins`` of :func:`scanpy.tl.score_genes` for a panel of ``n_genes`` (about 10 genes a bin, 3-25 bins).

    scanpy cuts genes by expression rank into bins of ``round(n_genes / (n_bins - 1))``; where that divides
    ``n_genes`` the most expressed gene is alone in the last bin, and a set of only that gene has no control genes
    (a RuntimeError). Such bin counts are skipped; a panel with none left (e.g. 12 genes, where every bin count
    isolates the top gene) keeps about 10 genes a bin.
    """
    start = int(np.clip(n_genes // 10, 3, 25))
    for n_bins in [*range(start, 2, -1), *range(start + 1, 26)]:
        size = int(np.round(n_genes / (n_bins - 1)))
        if size and n_genes % size:
            return n_bins
    return start


def _feature_names(model: GHISTModel, gene_sets: dict[str, list[str]], per_type: bool) -> tuple[list[str], list[str]]:
    types, genes = list(model.cell_types or []), list(model.genes)
    names, kinds = ["n_cells"], ["count"]
    names += [f"{COHORT_PROP_PREFIX}{t}" for t in types]
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
def _slide_problems(sample: str, slide: Any, image_key: str, labels_key: str, segment: bool) -> list[str]:
    """What is wrong with one slide (empty: nothing), without computing anything: stores are opened lazily."""
    import spatialdata

    from .._spatial import check_extents
    from .._validation import get_image, get_labels

    if not isinstance(slide, SpatialData):
        path = Path(slide)
        if not path.exists():
            return [f"no SpatialData zarr store at {os.fspath(slide)!r}."]
        try:
            slide = spatialdata.read_zarr(path)
        except Exception as err:  # any reason it cannot be read is this slide's problem
            return [f"cannot open {os.fspath(slide)!r} as a SpatialData zarr store ({type(err).__name__}: {err})."]
    problems = []
    try:
        get_image(slide, image_key)
    except (KeyError, ValueError) as err:
        problems.append(_message(err, sample))
    if labels_key not in slide.labels:
        if not segment:
            problems.append(
                f"labels {labels_key!r} not found in `sdata.labels` (have {sorted(slide.labels)}); pass "
                "`segment=True` to segment the nuclei with `ghist.pp.segment_nuclei`."
            )
        return problems
    try:
        get_labels(slide, labels_key)
    except (KeyError, ValueError) as err:
        problems.append(_message(err, sample))
    if not problems:
        try:
            check_extents(slide, image_key, labels_key)
        except (KeyError, ValueError) as err:
            problems.append(_message(err, sample))
    return problems


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


# ---------------------------------------------------------------------------------------------- errors
def _message(err: BaseException, sample: str) -> str:
    """The text of an error, without the quotes a KeyError adds nor the slide prefix."""
    msg = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    msg = str(msg)
    prefix = f"Slide {sample!r}: "
    return msg[len(prefix) :] if msg.startswith(prefix) else msg


def _name_slide(err: Exception, sample: str) -> Exception:
    """``err`` with ``Slide 'x': `` before its message, of the same type where it can be rebuilt from a message."""
    prefix = f"Slide {sample!r}: "
    if isinstance(err, ValidationError):
        if all(p.startswith(prefix) for p in err.problems):
            return err
        return ValidationError([p if p.startswith(prefix) else prefix + p for p in err.problems])
    msg = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    if str(msg).startswith(prefix):
        return err
    try:
        named = type(err)(prefix + str(msg))
    except Exception:  # types whose constructor wants more than a message
        named = RuntimeError(f"{prefix}{type(err).__name__}: {msg}")
    return named


# ---------------------------------------------------------------------------------------------- cache
class _Cache:
    """One ``.npz`` file per finished slide, named by the sample id and a fingerprint of the model and settings."""

    def __init__(self, folder: str | os.PathLike, model: GHISTModel, options: dict[str, Any], names: list[str]):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"`cache_dir` {os.fspath(folder)!r} exists and is not a folder.")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.fingerprint = _fingerprint(model, options, names)

    def _file(self, sample: str) -> Path:
        # Sample ids may hold any character: the file name carries a digest of it; the file the id itself.
        return self.folder / f"{hashlib.sha256(sample.encode()).hexdigest()[:20]}-{self.fingerprint[:20]}.npz"

    def load(self, sample: str) -> tuple[np.ndarray, bool] | None:
        path = self._file(sample)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                if str(npz["sample"]) != sample or str(npz["fingerprint"]) != self.fingerprint:
                    return None
                features, segmented = npz["features"].astype(np.float64), bool(npz["segmented"])
        except Exception as err:  # an unreadable cache file is predicted again, not trusted
            logger.warning("Ignoring the unreadable cache file %s (%s: %s)", path, type(err).__name__, err)
            return None
        if features.shape != (2 * len(self.names),):  # features and their standard errors
            return None
        return features, segmented

    def save(self, sample: str, result: tuple[np.ndarray, bool]) -> None:
        features, segmented = result
        path = self._file(sample)
        # Written next to its final name, then renamed: a crash never leaves a half-written file under that name.
        with replaced_file(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                features=np.asarray(features, dtype=np.float64),
                segmented=np.asarray(bool(segmented)),
                sample=np.asarray(sample),
                fingerprint=np.asarray(self.fingerprint),
            )


def _fingerprint(model: GHISTModel, options: dict[str, Any], names: list[str]) -> str:
    """Digest of the model's weights and settings, of the cohort options and of the feature names."""
    import torch

    from .._version import __version__

    state = model._to_state()
    h = hashlib.sha256()
    settings = {k: v for k, v in state["settings"].items() if k != "history"}
    h.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    for name in sorted(state["tensors"]):
        tensor = state["tensors"][name]
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    run = {k: v for k, v in options.items() if k != "in_worker"}
    h.update(json.dumps(_jsonable(run), sort_keys=True).encode())
    h.update(json.dumps(names).encode())
    h.update(__version__.encode())
    return h.hexdigest()


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
