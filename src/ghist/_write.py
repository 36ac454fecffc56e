"""The one writer of everything ghist adds to a SpatialData: in memory and, when backed, in its zarr store.

Two promises, kept for tables, labels, images, shapes and points alike:

- **Nothing is replaced without** ``overwrite=True``: the check looks at the object *and* at its store, so an element
  on disk that was not loaded (``spatialdata.read_zarr(store, selection=...)``, or deleted from memory only) counts.
- **All or nothing on disk**: the new element is written completely into a scratch store inside the zarr store
  (``<store>/.ghist-write-<pid>-<hex>``, a folder spatialdata does not read), then moved in by one rename (or
  exchanged with the old one by one atomic exchange, ``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np`` on
  macOS), and only then is the old one removed and the consolidated metadata rewritten. A process killed at any
  point leaves a store that ``spatialdata.read_zarr`` opens with the old element or the new one, complete:

  * killed while writing the scratch store: the element's folder and the consolidated metadata are untouched;
  * killed after the rename: the folder holds the new element; the consolidated metadata still lists the element by
    the same name (spatialdata reads each element's own metadata from its folder, not from the consolidated copy),
    or, for a new name, does not list it yet (the store opens as before the write);
  * consolidated metadata is one file replaced atomically by zarr; it never names a folder that is missing.

  An element folder the consolidated metadata does not list yet still counts as existing for ``overwrite``.
  Left-over scratch stores of killed runs are removed by the next write into the same store (only those whose
  process is gone). Where the platform cannot exchange two folders atomically (not Linux or macOS, or a filesystem
  without the exchange), the old folder is renamed aside first: a kill in the microseconds between the two renames
  leaves the old element complete in the scratch store, not in its place (the store does not open then), and the
  next write puts it back before anything else.

The table is never copied: an AnnData whose ``X``, layers or ``obsm`` are dask arrays is written chunk by chunk by
anndata, and afterwards those arrays read from the written store, so whatever backed them before may be deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

from anndata import AnnData
from spatialdata import SpatialData

from ._constants import SCRATCH_PREFIX
from ._validation import ELEMENT_KINDS, check_key_added

logger = logging.getLogger(__name__)

_INTENT, _STORE, _ASIDE = "ghist-write.json", "new.zarr", "old"
_SCRATCH_RE = re.compile(rf"^{re.escape(SCRATCH_PREFIX)}(\d+)-[0-9a-f]{{32}}$")


# ----------------------------------------------------------------------------------------------------------- checks
def element_kind(element: Any) -> str:
    """The ``SpatialData`` attribute an element belongs in (``"tables"``, ``"labels"``, ``"images"``, ...)."""
    if isinstance(element, AnnData):
        return "tables"
    from spatialdata.models import (
        Image2DModel,
        Image3DModel,
        Labels2DModel,
        Labels3DModel,
        PointsModel,
        ShapesModel,
        get_model,
    )

    try:
        model = get_model(element)
    except Exception as err:  # spatialdata raises several types for what is not one of its elements
        raise TypeError(
            f"Expected a SpatialData element (AnnData, labels, image, shapes or points) parsed by a "
            f"`spatialdata.models` parser; got {type(element).__name__}."
        ) from err
    kinds = {
        Image2DModel: "images",
        Image3DModel: "images",
        Labels2DModel: "labels",
        Labels3DModel: "labels",
        ShapesModel: "shapes",
        PointsModel: "points",
    }
    return kinds[model]


def elements_on_disk(sdata: SpatialData) -> dict[str, str]:
    """Name -> kind of every element in the zarr store backing ``sdata`` (empty when not backed).

    Hidden folders (names starting with ``.``, such as the writer's scratch stores) are not elements: spatialdata
    does not read them. Element folders that the store's consolidated metadata does not list yet (a write killed
    before it rewrote them) count too.
    """
    if sdata.path is None:
        return {}
    if not Path(sdata.path).is_dir():
        raise ValueError(
            f"`sdata` is backed by the zarr store {str(sdata.path)!r}, which no longer exists; set `sdata.path = None` "
            "to work in memory, or write it to a new store with `sdata.write(path)`."
        )
    out: dict[str, str] = {}
    for path in sdata.elements_paths_on_disk():
        kind, _, name = path.partition("/")
        if not name.startswith("."):
            out[name] = kind
    for kind in ELEMENT_KINDS:
        folder = Path(sdata.path) / kind
        if folder.is_dir():
            for child in folder.iterdir():
                if not child.name.startswith(".") and (child / "zarr.json").is_file():
                    out.setdefault(child.name, kind)
    return out


def check_writable(
    sdata: SpatialData,
    key: str,
    kind: str,
    *,
    overwrite: bool | None = False,
    arg: str = "key_added",
    hint: str = "",
    where: str = "",
) -> None:
    """Check, before any work, that ``sdata.<kind>[key]`` may be written, in memory and in ``sdata``'s store.

    Element names are unique across kinds, so a name taken by another kind (in memory or on disk) is always an error;
    one of the same kind only without ``overwrite`` (``None``: the caller offers no overwrite). ``hint`` adds another
    way out to the message, ``where`` says which sample (e.g. ``" of sample 'a'"``).

    Raises
    ------
    ValueError
        Naming the argument, the element and where it is (in memory, or on disk in the store only).

    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    if kind not in ELEMENT_KINDS:
        raise ValueError(f"Unknown element kind {kind!r}; expected one of {list(ELEMENT_KINDS)}.")
    check_key_added(sdata, key, kind, overwrite=overwrite, arg=arg, where=where, hint=hint)  # in memory
    if key.startswith("."):
        raise ValueError(
            f"`{arg}={key!r}` starts with '.': `spatialdata.read_zarr` skips such elements, so it would be written and "
            "never read back; pass another name."
        )
    how = (
        "pass another `{arg}`"
        + (f", {hint}" if hint else "")
        + (" or `overwrite=True` to replace it." if overwrite is not None else ".")
    )
    on_disk = elements_on_disk(sdata)
    if key in on_disk and on_disk[key] != kind:
        raise ValueError(
            f"`{arg}={key!r}` is already the name of a {on_disk[key]} element in the zarr store {str(sdata.path)!r}"
            f"{where} (not loaded in `sdata`); element names must be unique: pass another `{arg}`."
        )
    if key in on_disk and key not in getattr(sdata, kind) and not overwrite:
        raise ValueError(
            f"The zarr store {str(sdata.path)!r} backing `sdata`{where} holds a {kind} element {key!r} that is not "
            f"loaded in `sdata` (read with `selection=`, or deleted from memory only); " + how.format(arg=arg)
        )


# ----------------------------------------------------------------------------------------------------------- writer
def write_element(
    sdata: SpatialData,
    key: str,
    element: Any,
    *,
    overwrite: bool = False,
    arg: str = "key_added",
) -> Any:
    """Add ``element`` to ``sdata`` under ``key`` and, when ``sdata`` is backed, to its zarr store, all or nothing.

    Parameters
    ----------
    sdata
        The SpatialData to add to.
    key
        Name of the new element.
    element
        An AnnData table or a parsed SpatialData element (labels, image, shapes, points); its kind decides where it
        goes. A table whose ``X``/layers are dask arrays is written chunk by chunk, never computed whole.
    overwrite
        Replace an element of the same kind and name, in memory or on disk. Without it, an existing one, loaded or
        only in the store, raises a :class:`ValueError` and nothing is written.
    arg
        The caller's argument that named ``key``, for error messages.

    Returns
    -------
    The element as it now is in ``sdata``: for a backed ``sdata``, labels, images and points read lazily from the
    store, and a table's dask arrays read from the store.

    Examples
    --------
    >>> import ghist
    >>> from ghist._write import write_element
    >>> sdata = ghist.datasets.synthetic(seed=0)
    >>> table = write_element(sdata, "copy", sdata["table"].copy())
    >>> "copy" in sdata.tables
    True

    """
    kind = element_kind(element)
    check_writable(sdata, key, kind, overwrite=overwrite, arg=arg)
    if sdata.path is None:
        getattr(sdata, kind)[key] = element
        return element
    root = Path(sdata.path)
    _check_zarr_v3(root)
    _check_no_other_reader(sdata, key, kind, element)
    _remove_stale_scratch(root)
    scratch = root / f"{SCRATCH_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    moved = False
    try:
        scratch.mkdir()
        # what this scratch store is for, so that the next writer can put an old element back (see _swap)
        (scratch / _INTENT).write_text(json.dumps({"kind": kind, "key": key}))
        _write_scratch(scratch, key, kind, element)
        _ensure_kind_group(root, kind)
        target = root / kind / key
        staged = scratch / _STORE / kind / key
        if target.exists():
            _swap(staged, target, scratch)
        else:
            os.rename(staged, target)
        moved = True
        if kind == "labels":
            _register_label(root, key)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if moved:
            _consolidate(sdata)
    element = _read_back(root, key, kind, element)
    getattr(sdata, kind)[key] = element
    logger.info("Wrote `sdata.%s[%r]` to %s", kind, key, root)
    return element


# --------------------------------------------------------------------------------------------------------- internals
def _check_zarr_v3(root: Path) -> None:
    """Refuse a store in the old zarr v2 layout: spatialdata writes v3 elements, which such a store cannot hold."""
    if not (root / "zarr.json").exists():
        raise ValueError(
            f"The zarr store {str(root)!r} backing `sdata` is not in the zarr v3 layout spatialdata writes today (no "
            "`zarr.json` at its root); write `sdata` to a new store with `sdata.write(path)` first."
        )


def _check_no_other_reader(sdata: SpatialData, key: str, kind: str, element: Any) -> None:
    """Refuse before any work when another loaded element reads its data from the files about to be replaced."""
    from spatialdata import get_dask_backing_files

    target = (Path(sdata.path) / kind / key).resolve()
    if not target.exists():
        return
    for other_kind, name, other in sdata.gen_elements():
        if (other_kind, name) == (kind, key) or other is element or other_kind == "tables":
            continue
        files: list[str] = []
        with contextlib.suppress(Exception):  # elements without dask data have no backing files
            files = list(get_dask_backing_files(other))
        if any(Path(f).resolve().is_relative_to(target) for f in files):
            raise ValueError(
                f"`sdata.{other_kind}[{name!r}]` reads its data from the files of `sdata.{kind}[{key!r}]` in "
                f"{str(sdata.path)!r}; replacing them would break it. Compute it or write it first."
            )


def _remove_stale_scratch(root: Path) -> None:
    """Remove scratch stores left by writers that were killed (their process is gone); never anything else.

    A writer killed between the two renames of the fallback swap left the old element in its scratch store and none
    in its place: that element is put back first.
    """
    for child in root.iterdir():
        match = _SCRATCH_RE.match(child.name)
        if match is None or not child.is_dir() or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            intent = json.loads((child / _INTENT).read_text())
            kind, key = intent["kind"], intent["key"]
            if kind not in ELEMENT_KINDS or not isinstance(key, str) or "/" in key or key.startswith("."):
                raise ValueError(f"not an element: {intent}")
            target, aside = root / kind / key, child / _ASIDE
            if aside.is_dir() and not target.exists():
                logger.warning("Putting %s back from %s, where an interrupted write left it", target, aside)
                os.rename(aside, target)
        logger.info("Removing %s, left in the store by an interrupted write", child)
        shutil.rmtree(child, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _write_scratch(scratch: Path, key: str, kind: str, element: Any) -> None:
    """Write ``element`` as the only element of a new store at ``scratch`` (no copy of its data)."""
    holder = SpatialData()
    with warnings.catch_warnings(), _unsharded_tables():
        # A table annotating labels that the scratch store does not hold: expected here.
        warnings.filterwarnings("ignore", message=".*is annotating.*not present", category=UserWarning)
        getattr(holder, kind)[key] = element
        holder.write(scratch / _STORE, consolidate_metadata=False)


def _unsharded_tables() -> contextlib.AbstractContextManager:
    """Tables written without zarr shards, as anndata writes them today, unless the user chose in anndata's settings.

    anndata warns for every array of every table it writes while its ``auto_shard_zarr_v3`` setting is unset (its
    default may change to sharded); a predicted table is dozens of arrays, and the choice is not the user's to make
    for each of them. A setting the user gave is kept.
    """
    import anndata

    if getattr(anndata.settings, "auto_shard_zarr_v3", False) is None:
        return anndata.settings.override(auto_shard_zarr_v3=False)
    return contextlib.nullcontext()


def _ensure_kind_group(root: Path, kind: str) -> None:
    import zarr

    group = zarr.open_group(root, mode="r+", use_consolidated=False)
    if kind not in group:
        group.create_group(kind)


def _register_label(root: Path, key: str) -> None:
    """Name the labels in the OME-NGFF ``labels`` group's list, as ome-zarr does when it writes them."""
    import zarr

    group = zarr.open_group(root / "labels", mode="r+", use_consolidated=False)
    attrs = group.attrs.asdict()
    holder = attrs.get("ome", attrs)
    names = [n for n in holder.get("labels", []) if (root / "labels" / n).exists()]
    if key not in names:
        names.append(key)
    holder["labels"] = names
    group.attrs.update(attrs)


def _swap(staged: Path, target: Path, scratch: Path) -> None:
    """Put ``staged`` at ``target`` and the old ``target`` at ``staged``, atomically where the OS can."""
    if _exchange(staged, target):
        return
    aside = scratch / _ASIDE
    os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(aside, target)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two paths in one atomic step; False where the platform or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
        else:
            return False
    except OSError:
        return False
    if rc == 0:
        return True
    logger.debug("Atomic exchange not available (errno %d); renaming in two steps", ctypes.get_errno())
    return False


def _consolidate(sdata: SpatialData) -> None:
    # The consolidated metadata lists the store's groups: rewrite it once the folders are in their final places.
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()


def _read_back(root: Path, key: str, kind: str, element: Any) -> Any:
    """The element as written, reading from the store whatever was lazy (so its old backing may go)."""
    if kind in ("images", "labels", "points"):
        from spatialdata import read_zarr

        return getattr(read_zarr(root, selection=(kind,)), kind)[key]
    if kind == "tables":
        _repoint_dask_arrays(element, root / "tables" / key)
    return element


def _repoint_dask_arrays(table: AnnData, path: Path) -> None:
    """Replace the table's dask arrays by dask arrays over what was just written (same chunks, nothing computed)."""
    import dask.array as da
    import zarr

    def from_store(sub: str, like: da.Array) -> da.Array:
        return da.from_zarr(zarr.open_array(path / sub, mode="r"), chunks=like.chunks)

    if isinstance(table.X, da.Array):
        table.X = from_store("X", table.X)
    for name in list(table.layers):
        if name is not None and isinstance(table.layers[name], da.Array):  # anndata 0.13 lists X as layer None
            table.layers[name] = from_store(f"layers/{name}", table.layers[name])
    for name in list(table.obsm):
        if isinstance(table.obsm[name], da.Array):
            table.obsm[name] = from_store(f"obsm/{name}", table.obsm[name])
