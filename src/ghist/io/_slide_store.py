"""`ghist.io.open_slide_store`: a zarr SpatialData store tied to one slide file, reopened where a run left it."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from spatialdata import SpatialData

from .._constants import IMAGE_KEY, SLIDE_ATTRS_KEY

logger = logging.getLogger(__name__)

STORE_SUFFIX = ".zarr"


def default_store_path(slide_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``<slide stem>.zarr`` beside the slide, or in the folder ``out`` when given."""
    slide_path = Path(slide_path)
    folder = slide_path.parent if out is None else Path(out)
    return folder / f"{slide_path.stem}{STORE_SUFFIX}"


def slide_record(slide_path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a slide file: its absolute path, size in bytes and modification time (ns)."""
    path = Path(slide_path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def open_slide_store(
    slide_path: str | os.PathLike,
    store: str | os.PathLike | None = None,
    *,
    image_key: str = IMAGE_KEY,
    write_image: bool = False,
    **read_kwargs: Any,
) -> SpatialData:
    """Open (or create) the zarr SpatialData store of one slide file, with the slide's lazy image in it.

    The store records which file it was made from (absolute path, size and modification time) and refuses any other
    file, so results of one slide never mix with another's. Elements that ghist writes into the returned SpatialData
    (:func:`ghist.pp.detect_tissue`, :func:`ghist.pp.segment_nuclei`, :func:`ghist.tl.predict`) go into the store
    as each step finishes, all or nothing, and are there when the store is opened again: a run killed half-way
    keeps every finished step, and a segmentation in progress keeps its finished blocks (the next
    :func:`~ghist.pp.segment_nuclei` into the store resumes from them).

    The image itself stays in the slide file, read lazily (:func:`ghist.io.read_wsi`); it is copied into the store
    only with ``write_image=True``.

    Parameters
    ----------
    slide_path
        The slide file (any format :func:`ghist.io.read_wsi` reads).
    store
        The zarr store; default ``<slide stem>.zarr`` beside the slide. Created when missing (atomically: a run
        killed while creating it leaves no half-made store under this name).
    image_key
        Key of the slide's image in ``sdata.images``.
    write_image
        Also write the image into the store (once; a store holding it already is not rewritten).
    **read_kwargs
        Passed to :func:`ghist.io.read_wsi` (``pixel_size``, ``backend``, ``chunk_size``, ``max_levels``).

    Returns
    -------
    A :class:`spatialdata.SpatialData` backed by the store (``sdata.path``), holding the elements on disk (read
    lazily) and ``images[image_key]``. ``sdata.attrs["ghist_slide"]`` holds the slide record.

    Raises
    ------
    FileNotFoundError
        No slide file at ``slide_path``.
    ValueError
        ``store`` exists and is not a store of this slide (made from another file, or changed since; or not made
        by this function), or is not a folder.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.io.open_slide_store("TCGA-XX-0000.svs")  # doctest: +SKIP
    >>> ghist.pp.detect_tissue(sdata)  # doctest: +SKIP
    >>> ghist.pp.segment_nuclei(sdata, roi_key="tissue")  # doctest: +SKIP
    >>> ghist.tl.predict(sdata, roi_key="tissue")  # doctest: +SKIP

    """
    import spatialdata as sd

    from .._write import elements_on_disk, write_element
    from ._wsi import read_wsi

    slide_path = Path(slide_path)
    if not slide_path.is_file():
        raise FileNotFoundError(f"No slide file at {str(slide_path)!r}.")
    store = default_store_path(slide_path) if store is None else Path(store)
    record = slide_record(slide_path)
    if store.exists():
        check_store_of(store, record)
    wsi = read_wsi(slide_path, image_key=image_key, **read_kwargs)  # an unreadable slide fails before a store exists
    if not store.exists():
        _create_store(store, record)
    disk = sd.read_zarr(store)
    on_disk = elements_on_disk(disk)
    if _finish_interrupted_writes(store, disk, on_disk):
        disk = sd.read_zarr(store)
    if image_key in on_disk and on_disk[image_key] != "images":
        raise ValueError(
            f"The store {str(store)!r} holds a {on_disk[image_key]} element named {image_key!r}; pass another "
            "`image_key`."
        )
    if write_image and image_key not in on_disk:
        write_element(disk, image_key, wsi.images[image_key], arg="image_key")
    # A new object (not an element written into one): the store's elements plus, unless stored, the lazy slide image.
    images = dict(disk.images)
    images.setdefault(image_key, wsi.images[image_key])
    sdata = SpatialData(
        images=images,
        labels=dict(disk.labels),
        points=dict(disk.points),
        shapes=dict(disk.shapes),
        tables=dict(disk.tables),
        attrs={**disk.attrs, **wsi.attrs, SLIDE_ATTRS_KEY: record},
    )
    sdata.path = disk.path
    return sdata


def read_slide_record(store: str | os.PathLike) -> dict[str, Any] | None:
    """The slide record of a store made by :func:`open_slide_store` (``None`` when it has none)."""
    import zarr

    try:
        group = zarr.open_group(store, mode="r")
    except Exception:  # not a zarr group at all; the caller names the problem
        return None
    record = group.attrs.get(SLIDE_ATTRS_KEY)
    return dict(record) if isinstance(record, dict) else None


def check_store_of(store: Path, record: dict[str, Any]) -> None:
    """Refuse a store that was not made from the slide ``record`` describes."""
    if not store.is_dir():
        raise ValueError(f"{str(store)!r} exists and is not a folder; expected a zarr store or a free path.")
    found = read_slide_record(store)
    if found is None:
        raise ValueError(
            f"{str(store)!r} is not a slide store made by `ghist.io.open_slide_store` (it records no slide file); "
            "pass another `store`, or move it away."
        )
    if (found.get("size"), found.get("mtime_ns")) != (record["size"], record["mtime_ns"]):
        raise ValueError(
            f"The store {str(store)!r} was made from {found.get('path')!r} ({found.get('size')} bytes, modified at "
            f"{found.get('mtime_ns')} ns), not from {record['path']!r} ({record['size']} bytes, modified at "
            f"{record['mtime_ns']} ns): its results belong to another file or an older version of it. Pass another "
            "`store`, or move it away to start again."
        )
    if found.get("path") != record["path"]:
        logger.info("Slide %s was moved since its store was made (from %s).", record["path"], found.get("path"))


def _create_store(store: Path, record: dict[str, Any]) -> None:
    """An empty SpatialData store with the slide record, moved into place by one rename."""
    import zarr

    from .._write import _process_alive

    store.parent.mkdir(parents=True, exist_ok=True)
    for old in store.parent.glob(f".{store.name}.ghist-new-*-*"):  # left by runs killed while creating the store
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    scratch = store.parent / f".{store.name}.ghist-new-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        SpatialData().write(scratch)
        zarr.open_group(scratch, mode="r+").attrs[SLIDE_ATTRS_KEY] = record
        os.rename(scratch, store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("Created the slide store %s", store)


def _finish_interrupted_writes(store: Path, disk: SpatialData, on_disk: dict[str, str]) -> bool:
    """List in the store's metadata the elements a killed writer moved in but did not list yet; whether any was.

    The one writer moves an element's folder in whole before it updates the metadata that lists it, so a folder that
    is there but not listed is complete: the metadata is brought up to date, as the writer would have done next.
    """
    from .._write import _register_label

    unlisted = {key: kind for key, kind in on_disk.items() if key not in getattr(disk, kind)}
    if not unlisted:
        return False
    for key, kind in unlisted.items():
        if kind == "labels":
            _register_label(store, key)
    if disk.has_consolidated_metadata():
        disk.write_consolidated_metadata()
    logger.info("Listed %s in %s: written completely by a run that was stopped before listing them.", unlisted, store)
    return True
