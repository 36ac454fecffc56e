"""Offline nucleus segmentation of H&E images, streamed chunk by chunk over the slide."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import dask.array as da
import numpy as np
import zarr
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel
from spatialdata.transformations import get_transformation
from tqdm.auto import tqdm
from xarray import DataArray

from .._centroids import label_centroids
from .._constants import IMAGE_KEY, LABELS_KEY, MICRONS_CS
from .._deprecation import renamed_arguments
from .._docs import doc_image_key, doc_params, doc_progress, doc_sdata
from .._memory import release_freed_memory
from .._validation import check_blocks_memory, check_int, get_image
from .._write import check_writable, write_element
from ._segment_backends import WATERSHED_DEFAULTS, make_backend

logger = logging.getLogger(__name__)

SegmentationMethod = Literal["watershed", "ghist", "instanseg", "stardist", "cellpose"]
SEGMENTATION_METHODS: tuple[str, ...] = ("watershed", "ghist", "instanseg", "stardist", "cellpose")
#: Nucleus areas (µm²) kept by default, unless a learned model says what it was trained on.
DEFAULT_AREA_UM2 = (10.0, 200.0)

# Default cap on worker threads: each holds a window and its float intermediates (about 0.4 GB at the default
# chunk_size of 2048), and up to twice as many finished blocks wait to be stitched, so 8 workers stay near 5 GB.
MAX_DEFAULT_WORKERS = 8


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------------


@doc_params(
    sdata=doc_sdata,
    image_key=doc_image_key,
    progress=doc_progress,
    watershed_defaults=", ".join(f"``{k}={v!r}``" for k, v in WATERSHED_DEFAULTS.items()),
    max_workers=MAX_DEFAULT_WORKERS,
)
@renamed_arguments(n_workers="num_workers")
def segment_nuclei(
    sdata: SpatialData,
    *,
    image_key: str = IMAGE_KEY,
    key_added: str = LABELS_KEY,
    method: SegmentationMethod = "watershed",
    pixel_size: float | None = None,
    min_area_um2: float | None = None,
    max_area_um2: float | None = None,
    chunk_size: int = 2048,
    halo: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model: Any = None,
    roi_key: str | None = None,
    num_workers: int | None = None,
    **method_kwargs: Any,
) -> DataArray:
    """Segment the nuclei of an H&E image into instance labels, chunk by chunk.

    The image is cut into ``chunk_size`` blocks, each read with a ``halo`` of context around it and segmented on its
    own, so memory is bounded by the chunk size, not the slide size. A nucleus belongs to the block that holds its
    centroid and receives one id, even when it crosses a block border; ids are unique over the slide and numbered
    block after block. The labels are kept compressed in memory.

    Blocks are segmented by ``num_workers`` threads at once and stitched in block order, so the labels, ids included,
    are the same for any ``num_workers``. Threads, not processes: the watershed's numpy, SciPy and scikit-image steps
    release the GIL, and threads share the (possibly lazy, file-backed) image and the model without copying them.
    At most ``2 * num_workers`` blocks are in flight, so memory grows with ``num_workers``, not with the slide.

    Five ``method`` values are available.

    ``"watershed"`` (default, no model needed)
        Colour deconvolution (:func:`skimage.color.rgb2hed`) to the hematoxylin channel, Gaussian smoothing and a
        threshold (by default Otsu's, computed once over the tissue of a downsampled copy of the whole image, so all
        blocks share it) give the nuclear foreground; small holes are filled. Nucleus-sized blobs of hematoxylin
        (maxima of a scale-normalised Laplacian of Gaussian) seed a watershed that splits touching nuclei.
        Options (``**method_kwargs``): ``threshold`` (``"otsu"`` or a hematoxylin optical density),
        ``threshold_factor`` (multiplies Otsu's threshold; lower finds fainter nuclei), ``sigma_um`` (smoothing
        before thresholding), ``blob_sigma_um`` (scale of the seed detector, about a nucleus radius / √2),
        ``min_distance_um`` (closest two seeds may be), ``max_hole_um2`` (largest hole filled) and
        ``background_gray`` (pixels whose mean RGB value is above it count as glass, not tissue, for Otsu's
        threshold). Defaults: {watershed_defaults}.
    ``"ghist"``
        A learned segmenter, :class:`~ghist.pp.NucleusSegmenter`, trained with :func:`ghist.pp.fit_segmenter`:
        passed as ``model``, or the folder it was saved to, or the name of a bundled one (none ships yet). Each
        block is resampled to the model's working pixel size; the network predicts each pixel's nucleus
        probability and relative distance to its nucleus' border, brought back to the block's grid, where a
        watershed seeded by the distance peaks splits touching nuclei. Options: ``fg_threshold``,
        ``marker_threshold`` (by default those chosen on the model's validation data), ``min_marker_um2``,
        ``marker_prominence`` and
        ``normalise_stain`` (default ``True``: a model that recorded its training images' colours gets every image
        mapped to them first, Reinhard's transfer in CIELAB, with the image's own statistics measured once; ``False``
        segments the image's own colours). Only the network's forward passes are serialised; the watershed runs in
        every worker.
    ``"instanseg"``
        InstanSeg (``pip install 'ghist[instanseg]'``), by default its ``brightfield_nuclei`` model (H&E nuclei at
        0.5 µm/px; weights under the Apache-2.0 licence, about 15 MB). ``model`` may also be another InstanSeg model
        name, an :class:`instanseg.InstanSeg`, its TorchScript module, or the path of an ``instanseg.pt`` (a
        TorchScript program: load files you trust). InstanSeg resamples each block to its model's pixel size.
        Options: ``min_size``, ``mask_threshold``, ``peak_distance``, ``seed_threshold``, ``overlap_threshold``,
        ``fg_threshold`` (InstanSeg's post-processing).
    ``"stardist"``
        StarDist (``pip install 'ghist[stardist]'``, on TensorFlow), by default its ``2D_versatile_he`` model. Its
        weights were trained on images (MoNuSeg 2018, TNBC) released for non-commercial research only: check their
        terms before commercial use (a warning says so when it is used). ``model`` may also be another pretrained
        name, a :class:`stardist.models.StarDist2D`, or the folder of a saved one (its ``config.json`` and ``*.h5``
        weights). Each block, percentile-normalised, goes through ``model.predict_instances(block,
        **method_kwargs)``.
    ``"cellpose"``
        Cellpose (``pip install 'ghist[cellpose]'``), by default its ``nuclei`` model (BSD-3-Clause). ``model`` may
        also be another built-in model name, a :class:`cellpose.models.CellposeModel`, or the path of a weights
        file; each block goes through ``model.eval(block, **method_kwargs)`` (with Cellpose 3,
        ``channels=[0, 0]`` unless given: the RGB image is read as grey).

    The pretrained weights of the last three are fetched by their packages on first use and cached where each
    caches them (InstanSeg beside its package or in ``INSTANSEG_BIOIMAGEIO_PATH``, StarDist in
    ``~/.keras/models``, Cellpose in ``~/.cellpose/models`` or ``CELLPOSE_LOCAL_MODELS_PATH``). Offline, the call
    fails with a ``FileNotFoundError`` naming the file to fetch elsewhere and the folder to put it in; a local file
    or folder passed as ``model`` is never downloaded.
    The models are called by one thread at a time (their frameworks use all cores for one block already); the
    other workers read and stitch blocks meanwhile.

    Parameters
    ----------
    {sdata}
    {image_key}
    key_added
        Key of the labels written into ``sdata.labels``.
    method
        ``"watershed"``, ``"ghist"``, ``"instanseg"``, ``"stardist"`` or ``"cellpose"``.
    pixel_size
        Size of a full-resolution image pixel in µm. By default read from the image's transformation to the
        ``"microns"`` coordinate system.
    min_area_um2, max_area_um2
        Nuclei smaller or larger than these areas (µm²) are discarded. By default 10 and 200, or for
        ``method="ghist"`` the range of the nuclei the model was trained on (a little widened).
    chunk_size
        Side of the square blocks segmented one at a time (per worker), in pixels.
    halo
        Context read around each block, in pixels. By default twice the diameter of the largest nucleus allowed,
        plus a margin for smoothing.
    overwrite
        Replace an existing ``sdata.labels[key_added]``.
    {progress}
    model
        The model of a learned method: an object, a saved folder or file, or a name (see above); for
        ``"instanseg"``, ``"stardist"`` and ``"cellpose"`` by default the package's pretrained H&E nucleus model.
    roi_key
        Shapes of ``sdata`` (e.g. from :func:`ghist.pp.detect_tissue`): only blocks touching them are read and
        segmented, so the glass of a whole slide costs nothing.
    num_workers
        Number of blocks segmented at once, by as many threads. By default the CPUs this process may use
        (:func:`os.sched_getaffinity`), at most {max_workers}. ``1`` segments block after block in the calling
        thread. The result does not depend on it.
    **method_kwargs
        Options of the method, see above.

    Returns
    -------
    The labels, also added as ``sdata.labels[key_added]``: a :class:`~spatialdata.models.Labels2DModel` of ``int32``
    nucleus ids (0 = background) with the image's transformations, so it lives in the image's pixel space. When
    ``sdata`` is backed by a Zarr store, the element is also written to disk, all or nothing (the old labels stay
    until the new ones are complete), and the returned labels read from there (earlier versions returned ``None``).
    Logs (INFO) the number of nuclei, the megapixels segmented (those of the blocks read: inside the region of
    interest when ``roi_key`` is given), the seconds taken and the throughput in Mpx/s.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=0)
    >>> labels = ghist.pp.segment_nuclei(sdata, key_added="nuclei_he", num_workers=2, progress=False)
    >>> labels is sdata.labels["nuclei_he"]
    True

    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    if method not in SEGMENTATION_METHODS:
        raise ValueError(f"Unknown segmentation `method` {method!r}; expected one of {list(SEGMENTATION_METHODS)}.")
    image = get_image(sdata, image_key)
    check_writable(sdata, key_added, "labels", overwrite=overwrite)  # memory and the backing store, before any work
    check_int("num_workers", num_workers, 1, optional=True)
    n_workers = default_n_workers() if num_workers is None else int(num_workers)
    check_int("chunk_size", chunk_size, 64)
    check_int("halo", halo, 0, optional=True)
    for name, value in (("min_area_um2", min_area_um2), ("max_area_um2", max_area_um2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float | np.number)):
            raise ValueError(f"`{name}` must be a number of µm²; got {value!r}.")
    element = sdata.images[image_key]
    pixel_size = _resolve_pixel_size(sdata, image_key, pixel_size)
    _check_segment_size(sdata, element, image_key, roi_key)  # before the backend reads the image

    start = time.perf_counter()
    backend = make_backend(method, element, pixel_size, model, method_kwargs)
    # A learned model keeps, unless told otherwise, the range of nucleus areas it was trained on.
    default_area = backend.area_um2 or DEFAULT_AREA_UM2
    min_area_um2 = default_area[0] if min_area_um2 is None else min_area_um2
    max_area_um2 = default_area[1] if max_area_um2 is None else max_area_um2
    if not (np.isfinite(min_area_um2) and np.isfinite(max_area_um2) and 0 <= min_area_um2 < max_area_um2):
        raise ValueError(
            f"Expected 0 <= `min_area_um2` < `max_area_um2`, got min_area_um2={min_area_um2!r}, "
            f"max_area_um2={max_area_um2!r}."
        )
    min_area_px = min_area_um2 / pixel_size**2
    max_area_px = max_area_um2 / pixel_size**2
    max_diameter_px = 2.0 * math.sqrt(max_area_px / math.pi)
    if halo is None:
        halo = math.ceil(2.0 * max_diameter_px + backend.margin) + 2
    elif halo < max_diameter_px:
        logger.warning(
            "`halo`=%d px is smaller than the largest nucleus allowed (%.0f px across); nuclei crossing block "
            "borders may be cut or lost.",
            halo,
            max_diameter_px,
        )
    # the watershed peaks at about 50 bytes per window pixel, plus the window and its labels
    check_blocks_memory(
        *image.shape[1:], chunk_size=chunk_size, halo=halo, n_workers=n_workers, bytes_per_pixel=64, what="Segmenting"
    )

    region = None
    if roi_key is not None:
        from .._spatial import region_in_pixels

        region = region_in_pixels(sdata, roi_key, image_key)
    # Into a backed SpatialData, finished blocks are saved as they come, and a re-run after a crash reuses them.
    checkpoint = None
    if model is None or isinstance(model, str | os.PathLike):
        from ._segment_checkpoint import checkpoint_for

        params = [method, None if model is None else str(model), sorted(method_kwargs.items()), image_key]
        params += [list(image.shape), int(chunk_size), int(halo), min_area_px, max_area_px, pixel_size]
        checkpoint = checkpoint_for(sdata, key_added, {"segment_nuclei": params})
    store, mpx = _segment_blocks(
        image.data,
        backend.segment,
        region=region,
        chunk_size=int(chunk_size),
        halo=int(halo),
        min_area_px=min_area_px,
        max_area_px=max_area_px,
        progress=progress,
        n_workers=n_workers,
        checkpoint=checkpoint,
    )
    seconds = time.perf_counter() - start
    n_nuclei = int(store.attrs["n_objects"])
    labels = Labels2DModel.parse(
        # ``inline_array`` and a name of our own: spatialdata takes "original-from-zarr" arrays for files on disk.
        da.from_array(store, chunks=store.chunks, name=f"ghist-segment-nuclei-{uuid.uuid4().hex}", inline_array=True),
        dims=("y", "x"),
        transformations=copy.deepcopy(get_transformation(element, get_all=True)),
    )
    labels = write_element(sdata, key_added, labels, overwrite=overwrite)
    if checkpoint is not None:
        checkpoint.remove()
    logger.info(
        "Segmented %d nuclei of image %r into `sdata.labels[%r]`: %.2f Mpx in %.1f s, %.2f Mpx/s (%d worker%s).",
        n_nuclei,
        image_key,
        key_added,
        mpx,
        seconds,
        mpx / max(seconds, 1e-9),
        n_workers,
        "" if n_workers == 1 else "s",
    )
    return labels


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------


# Pixels one call segments at most (34 Gpx: a day of the watershed at this machine's speed; scanned slides are under
# about 20 Gpx). Beyond that, a call would run for days: refused with the way out instead. The same bound applies to
# the coarsest pyramid level, which the backends read whole (e.g. for the watershed's threshold).
_MAX_SEGMENT_PX = 2**35
_PYRAMID_HINT = (
    "make a pyramid first, e.g. `vips tiffsave slide.tif pyramid.tif --tile --pyramid --compression jpeg --bigtiff` "
    "(or tifffile with `subifds=`), and read it with `ghist.io.read_wsi`"
)


def _check_segment_size(sdata: SpatialData, element: Any, image_key: str, roi_key: str | None) -> None:
    """Refuse, before any work, an image (or region of interest) too large to segment in bounded time."""
    from .._validation import raster_levels

    levels = [array for _, _, array in raster_levels(element)]
    height, width = levels[0].sizes["y"], levels[0].sizes["x"]
    coarsest = min(float(a.sizes["y"]) * float(a.sizes["x"]) for a in levels)
    if coarsest > _MAX_SEGMENT_PX:
        raise ValueError(
            f"Image {image_key!r} is {height} x {width} px ({height * width / 1e9:.3g} Gpx) with no pyramid level "
            f"under {_MAX_SEGMENT_PX / 1e9:.3g} Gpx: segmentation reads a coarse copy of the whole image, which would "
            f"take days at this size. {_PYRAMID_HINT[0].upper()}{_PYRAMID_HINT[1:]}; then restrict segmentation to the "
            "tissue: `ghist.pp.detect_tissue(sdata)` and `segment_nuclei(sdata, roi_key='tissue')`."
        )
    n_px = float(height) * float(width)
    if n_px <= _MAX_SEGMENT_PX:
        return
    if roi_key is not None:
        from .._spatial import region_in_pixels

        region = region_in_pixels(sdata, roi_key, image_key)
        x0, y0, x1, y1 = region.bounds if not region.is_empty else (0.0, 0.0, 0.0, 0.0)
        n_px = max(0.0, min(x1, width) - max(x0, 0.0)) * max(0.0, min(y1, height) - max(y0, 0.0))
        if n_px <= _MAX_SEGMENT_PX:
            return
    where = f"the bounds of region {roi_key!r}" if roi_key is not None else f"image {image_key!r}"
    raise ValueError(
        f"Segmenting {where} means {n_px / 1e9:.3g} Gpx ({height} x {width} px image), beyond the "
        f"{_MAX_SEGMENT_PX / 1e9:.3g} Gpx one call segments: restrict it to the tissue, "
        "`ghist.pp.detect_tissue(sdata)` then `segment_nuclei(sdata, roi_key='tissue')`, or to a smaller region."
    )


def _resolve_pixel_size(sdata: SpatialData, image_key: str, pixel_size: float | None) -> float:
    """Pixel size in µm: the argument, else ghist's one rule (:func:`ghist._spatial.image_pixel_size`), checked."""
    from .._spatial import check_pixel_size, image_pixel_size  # one rule and one plausible range everywhere

    if pixel_size is not None:
        return check_pixel_size(pixel_size)
    size = image_pixel_size(sdata, image_key)
    if size is None:
        raise ValueError(
            f"Cannot tell the pixel size of image {image_key!r}: it has no transformation to a {MICRONS_CS!r} "
            f"coordinate system (its coordinate systems: {sorted(sdata.coordinate_systems)}). Pass `pixel_size` "
            "(µm per pixel)."
        )
    return check_pixel_size(size, "the image's pixel size", where=f" of image {image_key!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Block loop and stitching
# ----------------------------------------------------------------------------------------------------------------------


def _blocks(height: int, width: int, chunk_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks ``(y0, y1, x0, x1)`` of a non-overlapping grid, row by row, the last ones cut by the image's edge."""
    from .._tiling import plan_grid

    yield from (tuple(b) for b in plan_grid((height, width), chunk_size, edge="clip").bounds().tolist())


def default_n_workers() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count), at most ``MAX_DEFAULT_WORKERS``."""
    try:
        n_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        n_cpus = os.cpu_count() or 1
    return max(1, min(n_cpus, MAX_DEFAULT_WORKERS))


def _read_rgb(image: Any, y0: int, y1: int, x0: int, x1: int, *, scheduler: str | None = None) -> np.ndarray:
    """A ``(y, x, 3)`` uint8 window of a ``(c, y, x)`` (dask or numpy) array."""
    window = image[:, y0:y1, x0:x1]
    if hasattr(window, "compute"):
        window = window.compute(scheduler=scheduler)
    return np.ascontiguousarray(np.moveaxis(np.asarray(window), 0, -1))


Block = tuple[int, int, int, int]


class _BlockResult(NamedTuple):
    window: Block  # the block with its halo: wy0, wy1, wx0, wx1
    local: np.ndarray  # labels of the window, ids of its own
    keep: np.ndarray  # over the local ids: the objects this block owns


def _ordered(work: Callable[[Block], _BlockResult], blocks: Iterable[Block], n_workers: int) -> Iterator[_BlockResult]:
    """``work(block)`` of each block, in block order, computed by ``n_workers`` threads.

    At most ``2 * n_workers`` blocks are submitted and not yet consumed, so memory does not grow with the slide.
    """
    if n_workers == 1:
        yield from map(work, blocks)
        return
    todo = iter(blocks)
    pending: deque[Future[_BlockResult]] = deque()
    with ThreadPoolExecutor(n_workers, thread_name_prefix="ghist-segment") as pool:
        try:
            for block in todo:
                pending.append(pool.submit(work, block))
                if len(pending) == 2 * n_workers:
                    break
            while pending:
                result = pending.popleft().result()
                block = next(todo, None)
                if block is not None:
                    pending.append(pool.submit(work, block))
                yield result
        finally:  # an error (or an abandoned generator) must not leave queued blocks running
            for future in pending:
                future.cancel()


def _segment_blocks(
    image: Any,
    segmenter: Callable[[np.ndarray], np.ndarray],
    *,
    chunk_size: int,
    halo: int,
    min_area_px: float,
    max_area_px: float,
    progress: bool,
    region: Any = None,
    n_workers: int = 1,
    checkpoint: Any = None,
) -> tuple[zarr.Array, float]:
    """Segment ``image`` (``c, y, x``) block by block into a compressed in-memory Zarr array of global ids.

    Each block is segmented with ``halo`` pixels of context. It keeps the objects whose centroid falls inside it,
    whose area is within bounds and that do not touch the cut edge of its window (those are too large to be whole),
    and writes them, with ids continuing those of the previous blocks, onto pixels no earlier block has claimed.
    Blocks are segmented by ``n_workers`` threads but numbered and written in block order, so the result does not
    depend on ``n_workers``. Returns the array and the megapixels of the blocks segmented. With a ``checkpoint``
    (:class:`~ghist.pp._segment_checkpoint.BlockCheckpoint`), blocks saved by an earlier run are loaded instead of
    segmented, and each newly segmented block is saved before it is stitched.
    """
    _, height, width = image.shape
    out = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=(height, width),
        chunks=(min(chunk_size, height), min(chunk_size, width)),
        dtype="int32",
        fill_value=0,
    )
    blocks = list(_blocks(height, width, chunk_size))
    if region is not None:  # blocks that do not touch the region of interest (e.g. glass) are not read at all
        import shapely

        boxes = shapely.box(*np.array([(x0, y0, x1, y1) for y0, y1, x0, x1 in blocks], dtype=float).T)
        inside = shapely.intersects(boxes, region)
        logger.info(
            "Segmenting %d of %d blocks (the rest lie outside the region of interest)", inside.sum(), len(blocks)
        )
        blocks = [b for b, ok in zip(blocks, inside) if ok]
    mpx = [(y1 - y0) * (x1 - x0) / 1e6 for y0, y1, x0, x1 in blocks]
    # Worker threads read their window with dask's synchronous scheduler: the blocks are the parallelism, and a
    # thread pool per worker would only oversubscribe the cores.
    scheduler = None if n_workers == 1 else "synchronous"

    def work(block: Block) -> _BlockResult:
        saved = None if checkpoint is None else checkpoint.load(block)
        if saved is not None:
            return _BlockResult(*saved)
        result = _segment_block(block)
        if checkpoint is not None:
            checkpoint.save(block, *result)
        return result

    def _segment_block(block: Block) -> _BlockResult:
        y0, y1, x0, x1 = block
        wy0, wy1, wx0, wx1 = max(y0 - halo, 0), min(y1 + halo, height), max(x0 - halo, 0), min(x1 + halo, width)
        local = np.asarray(segmenter(_read_rgb(image, wy0, wy1, wx0, wx1, scheduler=scheduler)))
        if local.shape != (wy1 - wy0, wx1 - wx0):
            raise RuntimeError(
                f"The segmentation method returned shape {local.shape} for a window of shape {(wy1 - wy0, wx1 - wx0)}."
            )
        keep = _owned_objects(
            local,
            core=(y0 - wy0, y1 - wy0, x0 - wx0, x1 - wx0),
            cut_edges=(wy0 > 0, wy1 < height, wx0 > 0, wx1 < width),
            min_area_px=min_area_px,
            max_area_px=max_area_px,
        )
        keep[0] = False
        return _BlockResult((wy0, wy1, wx0, wx1), local, keep)

    next_id = 1
    bar = tqdm(
        total=sum(mpx),
        desc="Segmenting nuclei",
        unit="Mpx",
        # rate_noinv: always Mpx/s (tqdm's default turns slow rates into s/Mpx).
        bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} Mpx [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]",
        disable=not progress,
    )
    with bar:
        for block_mpx, (window, local, keep) in zip(mpx, _ordered(work, blocks, n_workers)):
            n_kept = int(np.count_nonzero(keep))
            if n_kept:
                if next_id + n_kept > np.iinfo(np.int32).max:
                    raise OverflowError("More nuclei than int32 labels can number.")
                lut = np.zeros(keep.size, dtype=np.int32)  # local id -> global id (0: dropped objects, background)
                lut[keep] = np.arange(next_id, next_id + n_kept, dtype=np.int32)
                ids = lut[local]
                wy0, wy1, wx0, wx1 = window
                current = out[wy0:wy1, wx0:wx1]
                free = current == 0
                current[free] = ids[free]
                out[wy0:wy1, wx0:wx1] = current
                next_id += n_kept
            bar.set_postfix(nuclei=next_id - 1, refresh=False)
            bar.update(block_mpx)
            del local, keep
            release_freed_memory()  # else glibc keeps the freed block arrays: memory would grow with the slide
    if checkpoint is not None and checkpoint.n_loaded:
        logger.info("Reused %d finished block(s) of an interrupted run from %s", checkpoint.n_loaded, checkpoint.folder)
    out.attrs["n_objects"] = next_id - 1
    return out, float(sum(mpx))


def _owned_objects(
    local: np.ndarray,
    *,
    core: tuple[int, int, int, int],
    cut_edges: tuple[bool, bool, bool, bool],
    min_area_px: float,
    max_area_px: float,
) -> np.ndarray:
    """Boolean mask over the ids of ``local`` (index 0: background) of the objects to keep."""
    local = local.astype(np.int64, copy=False)
    if local.size and local.min() < 0:
        raise ValueError("The segmentation method returned negative labels.")
    n = int(local.max()) + 1 if local.size else 1
    # The one centroid rule (ghist._centroids); the block test below compares pixel indices, hence the half pixel.
    cells = label_centroids(local)
    area, cx, cy = np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
    area[cells.ids] = cells.area
    cx[cells.ids], cy[cells.ids] = cells.xy[:, 0] - 0.5, cells.xy[:, 1] - 0.5
    cy0, cy1, cx0, cx1 = core
    keep = (area >= min_area_px) & (area <= max_area_px)
    keep &= (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    top, bottom, left, right = cut_edges
    for cut, edge in ((top, local[0]), (bottom, local[-1]), (left, local[:, 0]), (right, local[:, -1])):
        if cut:
            keep[np.unique(edge)] = False
    return keep
