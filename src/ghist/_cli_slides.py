"""``ghist segment``, ``ghist predict`` and ``ghist cohort``: the library's steps over many slide files, one store each.

Each slide gets a zarr store (:func:`ghist.io.open_slide_store`) into which every step writes its element as it
finishes (:func:`ghist.pp.detect_tissue`, :func:`ghist.pp.segment_nuclei`, :func:`ghist.tl.predict`): a slide whose
store holds every element of the command is skipped without being opened, a partial store is resumed from its first
missing step (a segmentation from its finished blocks), and one failed slide does not stop the others. The same
functions run underneath as in Python; this module only finds slides, schedules them and reports.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cli import _positive_int
from ._constants import IMAGE_KEY, LABELS_KEY, PRED_KEY, TISSUE_KEY
from ._folders import replaced_file

logger = logging.getLogger(__name__)

COMMANDS = ("segment", "predict", "cohort")
# Files a folder argument contributes: the slide formats ghist.io.read_wsi knows (those needing an extra or a
# conversion included, so that they are reported as failures rather than silently left out).
SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".tif",
    ".tiff",
    ".btf",
    ".mrxs",
    ".vms",
    ".vmu",
    ".svslide",
    ".dcm",
    ".scn",
    ".bif",
    ".czi",
    ".isyntax",
)


@dataclass
class SlideJob:
    """What to do for one slide: the steps of a command and their options (picklable, for dask workers)."""

    slide: Path
    store: Path
    predict: bool
    model: Any = None
    tissue: bool = True
    tissue_kwargs: dict[str, Any] = field(default_factory=dict)
    read_kwargs: dict[str, Any] = field(default_factory=dict)
    segment_kwargs: dict[str, Any] = field(default_factory=dict)
    predict_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[tuple[str, str]]:
        """``(element, kind)`` of each step, in order; the store is complete when it holds all of them."""
        steps = [(TISSUE_KEY, "shapes")] if self.tissue else []
        steps.append((LABELS_KEY, "labels"))
        if self.predict:
            steps.append((PRED_KEY, "tables"))
        return steps


@dataclass
class SlideResult:
    """How one slide went: ``"done"``, ``"skipped"`` or ``"failed"``, with what was done or why it failed."""

    slide: str
    status: str
    detail: str
    seconds: float = 0.0

    def line(self) -> str:
        """The log line of the slide."""
        took = f" in {self.seconds:.1f} s" if self.status == "done" else ""
        return f"{self.slide}: {self.status}{took} ({self.detail})" if self.detail else f"{self.slide}: {self.status}"


# ---------------------------------------------------------------------------------------------------------- arguments
def add_slide_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment``, ``predict`` and ``cohort`` subcommands to the ``ghist`` parser."""
    helps = {
        "segment": "detect tissue and segment nuclei of slide files, one zarr store per slide",
        "predict": "segment (when needed) and predict every nucleus of slide files, one zarr store per slide",
        "cohort": "segment each slide into its store (on the pool with --workers), then summarise every slide here "
        "into one row of a cohort table",
    }
    for name in COMMANDS:
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("slides", nargs="+", help="slide files, folders of slides, or glob patterns")
        p.add_argument("--out", default=None, help="folder of the stores (default: beside each slide)")
        if name != "segment":
            p.add_argument(
                "--model",
                default=None,
                help="a bundled model's name or a saved model's folder (default: the bundled her2st-breast-spots)",
            )
            p.add_argument("--batch-size", type=_positive_int, default=8, help="tiles per forward pass")
        if name == "cohort":
            p.add_argument("--output", required=True, help="the cohort table to write (.h5ad)")
            p.add_argument("--cache-dir", default=None, help="per-slide features (default: <output>.cache)")
        p.add_argument("--no-tissue", action="store_true", help="segment the whole image, not only the tissue")
        p.add_argument(
            "--tissue-min-area", type=float, default=20_000.0, help="smallest tissue piece kept, µm² (detect_tissue)"
        )
        p.add_argument("--pixel-size", type=float, default=None, help="µm per pixel, when the files lack it")
        p.add_argument("--backend", default="auto", help="slide reader: auto, tiffslide or openslide")
        p.add_argument("--segment-method", default="watershed", help="segment_nuclei's method")
        p.add_argument("--chunk-size", type=_positive_int, default=2048, help="segmentation block side, pixels")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--workers", type=_positive_int, default=1, help="slides at once, on a local dask pool")
        group.add_argument("--scheduler", default=None, help="address of a running dask.distributed scheduler")
        p.add_argument("--no-progress", action="store_true")


def find_slides(arguments: Sequence[str]) -> list[Path]:
    """Slide files named by paths, folders (their slide files, not recursive) and glob patterns, in order, once each.

    Raises
    ------
    FileNotFoundError
        An argument matches nothing.

    """
    found: list[Path] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir() and path.suffix != ".zarr":
            matches = sorted(p for p in path.iterdir() if p.is_file() and _is_slide(p))
            if not matches:
                raise FileNotFoundError(f"The folder {arg!r} holds no slide file ({', '.join(SLIDE_SUFFIXES)}).")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(arg):
            matches = sorted(Path(p) for p in glob.glob(arg) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"The pattern {arg!r} matches no file.")
        else:
            raise FileNotFoundError(f"No slide file, folder or pattern match at {arg!r}.")
        found += [m for m in matches if m.resolve() not in {f.resolve() for f in found}]
    return found


def check_stores(slides: Sequence[Path], stores: Sequence[Path]) -> None:
    """Refuse two slides that would share a store (the same file name stem in the same folder or ``--out``)."""
    seen: dict[Path, Path] = {}
    for slide, store in zip(slides, stores):
        other = seen.setdefault(store.resolve(), slide)
        if other != slide:
            raise ValueError(
                f"{str(other)!r} and {str(slide)!r} would share the store {str(store)!r}; rename one of them or run "
                "them with different `--out` folders."
            )


def _is_slide(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES


# ---------------------------------------------------------------------------------------------------------- one slide
def store_is_complete(job: SlideJob) -> bool:
    """Whether ``job.store`` is this slide's store and already holds every element of the job's steps.

    Only folder names are read, no element is opened: an element's folder is moved in whole by the one writer, so a
    folder that is there is complete.
    """
    from .io._slide_store import check_store_of, slide_record

    if not job.store.exists():
        return False
    check_store_of(job.store, slide_record(job.slide))
    return all((job.store / kind / key / "zarr.json").is_file() for key, kind in job.steps)


def run_slide(job: SlideJob, progress: bool = False, in_worker: bool = False) -> SlideResult:
    """Run the missing steps of one slide into its store; never raises (a failure is the result's status).

    ``in_worker``: on a dask.distributed worker, the slide's own dask arrays are computed in the worker's threads,
    not sent back to the cluster (their file handles do not travel).
    """
    if in_worker:
        import dask

        with dask.config.set(scheduler="threads"):
            return run_slide(job, progress)
    start = time.perf_counter()
    name = job.slide.name
    try:
        if store_is_complete(job):
            return SlideResult(name, "skipped", f"store complete: {job.store}")
        done = _run_steps(job, progress)
    except Exception as err:  # one slide's failure is reported, the others go on
        logger.debug("Slide %s failed", name, exc_info=True)
        message = " ".join(str(err).split()) or "no message"
        return SlideResult(name, "failed", f"{type(err).__name__}: {message}")
    return SlideResult(
        name, "done", f"{', '.join(done) or 'nothing missing'} -> {job.store}", time.perf_counter() - start
    )


def _run_steps(job: SlideJob, progress: bool) -> list[str]:
    import ghist

    from ._write import elements_on_disk

    sdata = ghist.io.open_slide_store(job.slide, job.store, image_key=IMAGE_KEY, **job.read_kwargs)
    on_disk = elements_on_disk(sdata)
    done = []
    roi_key = TISSUE_KEY if job.tissue else None
    if job.tissue and TISSUE_KEY not in on_disk:
        tissue = ghist.pp.detect_tissue(sdata, key_added=TISSUE_KEY, **job.tissue_kwargs)
        if TISSUE_KEY not in sdata.shapes:
            raise ValueError(
                "no tissue found (see the warning above); lower `--tissue-min-area`, or segment the whole image with "
                "`--no-tissue`"
            )
        done.append(f"tissue: {len(tissue)} piece(s)")
    if LABELS_KEY not in on_disk:
        labels = ghist.pp.segment_nuclei(
            sdata, key_added=LABELS_KEY, roi_key=roi_key, progress=progress, **job.segment_kwargs
        )
        done.append(f"nuclei: {labels.shape[0]} x {labels.shape[1]} px labels")
    if job.predict and PRED_KEY not in on_disk:
        table = ghist.tl.predict(
            sdata, job.model, key_added=PRED_KEY, roi_key=roi_key, progress=progress, **job.predict_kwargs
        )
        done.append(f"table: {table.n_obs} cells x {table.n_vars} genes")
    return done


# ----------------------------------------------------------------------------------------------------------- the run
def run_slides(
    jobs: Sequence[SlideJob],
    *,
    workers: int = 1,
    scheduler: str | None = None,
    progress: bool = False,
    report: Callable[[SlideResult], None] = lambda r: None,
) -> list[SlideResult]:
    """Run ``jobs`` here (``workers=1``), on a local dask pool of ``workers`` processes, or on a cluster.

    Each slide is one task; ``report`` is called with each result as it comes. Returns the results in job order.
    """
    if workers == 1 and scheduler is None:
        results = []
        for job in jobs:
            results.append(run_slide(job, progress))
            report(results[-1])
        return results
    from distributed import Client, LocalCluster, as_completed

    # One thread per worker process: a slide's steps use the cores through numpy/torch already.
    cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
    try:
        with Client(scheduler or cluster) as client:
            futures = {client.submit(run_slide, job, False, True, pure=False): i for i, job in enumerate(jobs)}
            out: list[SlideResult | None] = [None] * len(jobs)
            for future in as_completed(futures):
                i = futures[future]
                try:
                    out[i] = future.result()
                except Exception as err:  # a worker lost (killed, out of memory) fails its slide, not the run
                    out[i] = SlideResult(jobs[i].slide.name, "failed", f"{type(err).__name__}: {err}")
                report(out[i])
    finally:
        if cluster is not None:
            cluster.close()
    return [r for r in out if r is not None]


def main_slides(args: argparse.Namespace) -> int:
    """Run a ``segment``/``predict``/``cohort`` command.

    Returns 0 when every slide is done or skipped, 1 when any slide failed, 2 when the arguments name no slide, two
    slides that would share a store, or a model that does not exist (before any slide is touched).
    """
    from ._bundled_models import resolve_model

    model = None
    try:
        slides = find_slides(args.slides)
        check_stores(slides, [_store_path(slide, args.out) for slide in slides])
        if args.command != "segment":
            # A wrong name or folder fails here, before any slide; slides run here share the loaded model, dask
            # workers load it from its name or folder.
            loaded = resolve_model(args.model)
            model = loaded if args.workers == 1 and args.scheduler is None else args.model
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"ghist {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2
    read_kwargs = {"backend": args.backend}
    if args.pixel_size is not None:
        read_kwargs["pixel_size"] = args.pixel_size
    jobs = [
        SlideJob(
            slide=slide,
            store=_store_path(slide, args.out),
            predict=args.command == "predict",
            model=model,
            tissue=not args.no_tissue,
            tissue_kwargs={"min_area_um2": args.tissue_min_area},
            read_kwargs=read_kwargs,
            segment_kwargs={"method": args.segment_method, "chunk_size": args.chunk_size},
            predict_kwargs={} if args.command == "segment" else {"batch_size": args.batch_size},
        )
        for slide in slides
    ]
    print(f"ghist {args.command}: {len(jobs)} slide(s)", flush=True)

    def report(result: SlideResult) -> None:
        print(f"ghist {args.command}: {result.line()}", flush=True)

    results = run_slides(
        jobs, workers=args.workers, scheduler=args.scheduler, progress=not args.no_progress, report=report
    )
    failed = [r for r in results if r.status == "failed"]
    if args.command == "cohort" and len(failed) < len(results):
        try:
            left_out = _write_cohort(args, jobs, results, model)
        except Exception as err:  # e.g. no slide could be summarised: every slide is reported, nothing is written
            why = f"{type(err).__name__}: {' '.join(str(err).split())}"
            left_out = {r.slide: why for r in results if r.status != "failed"}
        for name, why in left_out.items():
            failed.append(SlideResult(name, "failed", f"summarising: {why}"))
            report(failed[-1])
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped")}
    counts["failed"] = len(failed)
    print(
        f"ghist {args.command}: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed",
        flush=True,
    )
    for result in failed:
        print(f"ghist {args.command}: FAILED {result.line()}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _store_path(slide: Path, out: str | None) -> Path:
    from .io._slide_store import default_store_path

    return default_store_path(slide, out)


def _write_cohort(
    args: argparse.Namespace, jobs: Sequence[SlideJob], results: Iterable[SlideResult], model: Any
) -> dict[str, str]:
    """Summarise the segmented slides with :func:`ghist.tl.predict_cohort` into ``--output``.

    Returns the slides it left out (slide file name -> why).
    """
    import ghist

    ok = [job for job, result in zip(jobs, results) if result.status != "failed"]
    slides = {job.slide.stem: ghist.io.open_slide_store(job.slide, job.store, **job.read_kwargs) for job in ok}
    output = Path(args.output)
    cache = Path(args.cache_dir) if args.cache_dir else output.with_name(output.name + ".cache")
    # Here, not on the pool: the slides' images are read from their files through handles that do not travel to
    # dask workers (predict_cohort sends a worker a store's path, and these stores do not hold the image).
    cohort = ghist.tl.predict_cohort(
        slides,
        model,
        segment=False,
        on_error="skip",
        cache_dir=cache,
        progress=not args.no_progress,
        batch_size=args.batch_size,  # no roi_key: the nuclei are segmented only in the tissue already
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with replaced_file(output) as scratch:
        cohort.write_h5ad(scratch)
    print(f"ghist cohort: {cohort.n_obs} slide(s) x {cohort.n_vars} features -> {output}", flush=True)
    names = {job.slide.stem: job.slide.name for job in ok}
    return {names[stem]: str(why) for stem, why in cohort.uns["ghist_cohort"]["failed"].items()}
