"""Input checks shared by every ``pp``/``tl`` entry point (the data contract: ``ARCHITECTURE.md``).

Each check names the argument, element, key or gene at fault, what was expected and what was found.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import get_table_keys
from xarray import DataArray, DataTree

logger = logging.getLogger(__name__)


class ValidationError(ValueError):
    """Several problems with the input, reported together."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("Invalid input:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _preview(values: Iterable[Any], n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}] ({len(values)} in all)"


def check_key_type(key: Any, arg: str, attr: str) -> None:
    """An element key must be a string: anything else would fail as a raw ``TypeError`` (unhashable) in a lookup."""
    if not isinstance(key, str):
        raise TypeError(f"`{arg}` must be a string naming an element of `sdata.{attr}`; got {key!r}.")


def check_name(value: Any, arg: str, what: str, *, optional: bool = False) -> None:
    """A column, layer or group name must be a string (``None`` too when ``optional``).

    Anything else would fail as a raw ``TypeError`` (unhashable) or a ``KeyError`` about the wrong thing in a lookup.
    """
    if (optional and value is None) or isinstance(value, str):
        return
    raise TypeError(f"`{arg}` must be a string naming {what}{' (or None)' if optional else ''}; got {value!r}.")


def require_key(sdata: SpatialData, attr: str, key: str, arg: str = "key") -> Any:
    """Return ``getattr(sdata, attr)[key]`` or raise a :class:`KeyError` listing the keys that exist."""
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a `spatialdata.SpatialData`, got {type(sdata).__name__}.")
    check_key_type(key, arg, attr)
    elements = getattr(sdata, attr)
    if key not in elements:
        raise KeyError(f"{key!r} not found in `sdata.{attr}` (have {sorted(elements)}).")
    return elements[key]


ELEMENT_KINDS = ("images", "labels", "shapes", "points", "tables")


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False, maximum: int | None = None) -> None:
    """``value`` must be an integer (not a bool) in ``[minimum, maximum]``; ``None`` too when ``optional``."""
    if optional and value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
    if bad or (maximum is not None and value > maximum):
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be an integer {expected}{' (or None)' if optional else ''}, got {value!r}.")


# numpy, torch and Lightning's ``seed_everything`` all take seeds in this range as they are; Lightning replaces a seed
# outside it by a random one with only a warning, which would make a "seeded" run irreproducible.
SEED_RANGE = (0, 2**32 - 1)


def check_seed(seed: Any, name: str = "seed") -> int:
    """The one check of a random seed: an integer (not a bool) in :data:`SEED_RANGE`; returned as an ``int``."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral) or not lo <= seed <= hi:
        raise ValueError(f"`{name}` must be an integer in [{lo}, 2**32 - 1], got {seed!r}.")
    return int(seed)


def layer_names(adata: AnnData) -> list[str]:
    """Names of ``adata.layers``, sorted; anndata >= 0.13 also lists ``None`` (``X``) among them, which is left out."""
    return sorted(key for key in adata.layers if isinstance(key, str))


def check_number(name: str, value: Any, *, positive: bool = True, optional: bool = False) -> None:
    """``value`` must be a finite real number (not a bool), ``> 0`` or (``positive=False``) ``>= 0``."""
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or not (value > 0 if positive else value >= 0):
        expected = ("> 0" if positive else ">= 0") + (" (or None)" if optional else "")
        raise ValueError(f"`{name}` must be a finite number {expected}, got {value!r}.")


def check_element_name(name: Any, arg: str = "key_added") -> str:
    """A name spatialdata can store as an element: letters, digits, ``_``, ``-``, ``.``; not ``.``, ``..``, ``__*``.

    Checked before any work, so a prediction or a segmentation is not computed only to fail when it is written.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`{arg}` must be a non-empty string; got {name!r}.")
    bad = sorted({c for c in name if not (c.isalnum() or c in "_-.")})
    why = ""
    if bad or name in (".", "..") or name.startswith("__"):
        why = f"it holds {''.join(bad)!r}" if bad else "names '.', '..' and names starting with '__' are reserved"
    else:
        try:  # spatialdata's own rule too, where this version has it (it may be stricter than the one above)
            from spatialdata._core.validation import check_valid_name
        except ImportError:
            check_valid_name = None
        if check_valid_name is not None:
            try:
                check_valid_name(name)
            except ValueError as error:
                why = str(error).rstrip(".")
    if why:
        raise ValueError(
            f"`{arg}={name!r}` cannot name a SpatialData element ({why}); use letters, digits, '_', '-' and '.' only, "
            "e.g. 'ghist_2'."
        )
    return name


def check_key_added(
    sdata: SpatialData,
    key_added: str,
    kind: str,
    *,
    overwrite: bool | None = False,
    arg: str = "key_added",
    where: str = "",
    hint: str = "",
) -> None:
    """Check that a new element may be written to ``sdata.<kind>[key_added]``.

    Element names are unique across kinds, so a name taken by another kind is always an error; one of the same
    kind only without ``overwrite`` (``None``: the caller offers no overwrite). ``arg`` names the argument in the
    message, ``where`` says which sample (e.g. ``" of sample 'a'"``) and ``hint`` adds another way out.
    """
    check_element_name(key_added, arg)
    for attr in ELEMENT_KINDS:
        if attr != kind and key_added in getattr(sdata, attr):
            raise ValueError(
                f"`{arg}={key_added!r}` is already the name of an element of `sdata.{attr}`{where}; element names "
                f"must be unique: pass another `{arg}`."
            )
    # spatialdata refuses names that differ only in case (they would share a folder on case-insensitive disks)
    for attr in ELEMENT_KINDS:
        variants = [k for k in getattr(sdata, attr) if k != key_added and k.lower() == key_added.lower()]
        if variants:
            raise ValueError(
                f"`{arg}={key_added!r}` differs only in case from `sdata.{attr}[{variants[0]!r}]`{where}; spatialdata "
                f"cannot store both: pass another `{arg}`."
            )
    if key_added in getattr(sdata, kind) and not overwrite:
        raise ValueError(
            f"`sdata.{kind}[{key_added!r}]`{where} already exists; pass another `{arg}`"
            + (f", {hint}" if hint else "")
            + (" or `overwrite=True` to replace it." if overwrite is not None else " or delete it first.")
        )


class ResourceError(ValueError):
    """An argument (or a file) would need more memory than this machine has available; raised before allocating."""


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's ``MemAvailable``, capped by a cgroup (container) limit.

    ``None`` when it cannot be told (not Linux and no ``os.sysconf``): the memory checks then pass.
    """
    import os

    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    try:  # cgroup v2: a container's limit is often far below the host's free memory
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return int(available)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def check_memory(nbytes: float, what: str, *, hint: str = "") -> None:
    """Refuse, with a :class:`ResourceError`, work whose estimated peak memory exceeds what is available.

    ``what`` says what would need the memory (e.g. ``"tiles of tile_size=40000"``), ``hint`` how to need less.
    Estimates are of the buffers the caller is about to allocate, so only requests that cannot fit are refused.
    """
    available = available_memory()
    if available is None or nbytes <= available:
        return
    raise ResourceError(
        f"{what} would need about {_gb(nbytes)} of memory, more than the {_gb(available)} available"
        + (f"; {hint}" if hint else ".")
    )


def check_blocks_memory(
    height: int, width: int, *, chunk_size: int, halo: int, n_workers: int, bytes_per_pixel: float, what: str
) -> None:
    """:func:`check_memory` of a sweep over ``chunk_size`` blocks with ``halo`` pixels of context on each side.

    ``n_workers`` windows are worked on at once, each needing ``bytes_per_pixel`` per pixel of its window (at most
    the whole image); ``what`` names the sweep in the message.
    """
    window = min(chunk_size + 2 * halo, height) * min(chunk_size + 2 * halo, width)
    check_memory(
        float(window) * bytes_per_pixel * max(int(n_workers), 1),
        f"{what} in windows of {min(chunk_size + 2 * halo, height)} x {min(chunk_size + 2 * halo, width)} px "
        f"(chunk_size={chunk_size}, halo={halo}, {n_workers} at once)",
        hint="pass a smaller `chunk_size`, `halo` or `num_workers` (or a smaller `max_area_um2`, which sets the halo).",
    )


def scale0(element: DataArray | DataTree) -> DataArray:
    """Full-resolution array of a (possibly multiscale) raster element."""
    if isinstance(element, DataTree):
        first = sorted(element.children)[0]
        return next(iter(element[first].ds.data_vars.values()))
    return element


def raster_levels(element: DataArray | DataTree) -> list[tuple[float, float, DataArray]]:
    """Every pyramid level of a raster element as ``(downsample_y, downsample_x, array)``, finest first.

    Downsamples are measured from the shapes (full-resolution size over the level's size), as spatialdata derives
    the levels' transformations; a single-scale element is one level with downsample 1.
    """
    if not isinstance(element, DataTree):
        return [(1.0, 1.0, element)]
    arrays = [next(iter(element[name].ds.data_vars.values())) for name in element.children]
    arrays.sort(key=lambda a: -a.sizes["y"] * a.sizes["x"])
    full_y, full_x = arrays[0].sizes["y"], arrays[0].sizes["x"]
    return [(full_y / a.sizes["y"], full_x / a.sizes["x"], a) for a in arrays]


def get_image(sdata: SpatialData, image_key: str) -> DataArray:
    """Full-resolution H&E image, checked to be RGB ``uint8`` with dims ``(c, y, x)``."""
    check_key_type(image_key, "image_key", "images")
    if image_key not in sdata.images:
        where = [a for a in ("labels", "shapes", "points", "tables") if image_key in getattr(sdata, a)]
        hint = f"; {image_key!r} is in `sdata.{where[0]}`, which is not an image" if where else ""
        raise KeyError(f"Image {image_key!r} not found in `sdata.images` (have {sorted(sdata.images)}){hint}.")
    image = scale0(sdata.images[image_key])
    if tuple(image.dims) != ("c", "y", "x"):
        raise ValueError(f"Image {image_key!r} has dims {tuple(image.dims)}; expected 2D ('c', 'y', 'x').")
    if image.sizes["c"] != 3:
        raise ValueError(f"Image {image_key!r} has {image.sizes['c']} channels; expected 3 (RGB H&E).")
    if image.dtype != np.uint8:
        raise ValueError(
            f"Image {image_key!r} has dtype {image.dtype}; expected uint8 RGB. "
            "Rescale to 0-255 and cast, e.g. `(img / img.max() * 255).astype('uint8')`."
        )
    return image


def get_labels(sdata: SpatialData, labels_key: str) -> DataArray:
    """Full-resolution nucleus labels, checked to be a 2D integer array."""
    check_key_type(labels_key, "labels_key", "labels")
    if labels_key not in sdata.labels:
        where = [a for a in ("images", "shapes", "points", "tables") if labels_key in getattr(sdata, a)]
        hint = f"; {labels_key!r} is in `sdata.{where[0]}`, which is not a labels element" if where else ""
        raise KeyError(f"Labels {labels_key!r} not found in `sdata.labels` (have {sorted(sdata.labels)}){hint}.")
    labels = scale0(sdata.labels[labels_key])
    if tuple(labels.dims) != ("y", "x"):
        raise ValueError(f"Labels {labels_key!r} have dims {tuple(labels.dims)}; expected 2D ('y', 'x').")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Labels {labels_key!r} have dtype {labels.dtype}; expected integer instance ids.")
    return labels


def get_table(data: AnnData | SpatialData, table_key: str | None, arg: str = "table_key") -> AnnData:
    """The AnnData itself, or ``sdata.tables[table_key]`` (``arg`` names the argument in messages)."""
    if isinstance(data, AnnData):
        return data
    if isinstance(data, SpatialData):
        if table_key is None:
            raise ValueError(f"Pass `{arg}` to choose a table of `sdata.tables` (have {sorted(data.tables)}).")
        check_key_type(table_key, arg, "tables")
        if table_key not in data.tables:
            raise KeyError(f"Table {table_key!r} not found in `sdata.tables` (have {sorted(data.tables)}).")
        return data.tables[table_key]
    raise TypeError(f"Expected AnnData or SpatialData, got {type(data).__name__}.")


def table_annotation(sdata: SpatialData, table_key: str, region: str) -> tuple[str, str]:
    """Check that ``sdata.tables[table_key]`` annotates element ``region``; return (region_key, instance_key)."""
    table = get_table(sdata, table_key)
    if "spatialdata_attrs" not in table.uns:
        raise ValueError(
            f"Table {table_key!r} is not a spatialdata TableModel (no `uns['spatialdata_attrs']`); parse it with "
            f"`TableModel.parse(adata, region={region!r}, region_key=..., instance_key=...)`."
        )
    regions, region_key, instance_key = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    if region not in regions:
        raise ValueError(
            f"Table {table_key!r} annotates {regions}, not {region!r}; expected it to annotate {region!r}."
        )
    if instance_key not in table.obs:
        raise KeyError(f"Table {table_key!r} lacks its instance key column `obs[{instance_key!r}]`.")
    return region_key, instance_key


def region_mask(table: AnnData, region: str) -> np.ndarray:
    """Boolean mask of the table rows that annotate ``region``."""
    _, region_key, _ = get_table_keys(table)
    return (table.obs[region_key].astype(str) == region).to_numpy()


def table_of_region(sdata: SpatialData, table_key: str, region: str, *, what: str) -> tuple[AnnData, str, str]:
    """The rows of ``sdata.tables[table_key]`` annotating element ``region``, with the table's region and instance keys.

    Raises when the table is not a TableModel annotating ``region`` or when none of its rows does (``what`` names
    the rows in that message, e.g. ``"cells"``).
    """
    table = get_table(sdata, table_key)
    region_key, instance_key = table_annotation(sdata, table_key, region)
    table = table[region_mask(table, region)]
    if table.n_obs == 0:
        raise ValueError(f"Table {table_key!r} has no {what} annotating {region!r}.")
    return table, region_key, instance_key


def positions_of_ids(ids: Sequence[Any] | pd.Index | np.ndarray, index: pd.Index) -> np.ndarray:
    """Position in ``index`` of each instance id (-1: absent), matching as text when the dtypes differ.

    Tables written by readers often hold instance ids as strings for an integer index of the shapes (or the
    reverse); comparing as text makes ``"3"`` find ``3``.
    """
    index = pd.Index(index)
    ids = pd.Index(ids)
    position = index.get_indexer(ids)
    if (position < 0).any():
        as_text = pd.Index(index.astype(str)).get_indexer(ids.astype(str))
        position = np.where(position < 0, as_text, position)
    return np.asarray(position, dtype=np.int64)


def check_genes(var_names: Sequence[str] | pd.Index, genes: Sequence[str] | None, *, where: str) -> list[str]:
    """Return ``genes`` (default: all of ``var_names``), raising a :class:`KeyError` that names missing genes."""
    var_names = pd.Index(var_names)
    if genes is None:
        return list(var_names)
    if isinstance(genes, str):
        genes = [genes]
    genes = list(genes)
    if len(genes) == 0:
        raise ValueError(f"`genes` is empty; expected at least one gene of {where}.")
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"`genes` lists {_preview(duplicated)} more than once.")
    missing = [g for g in genes if g not in var_names]
    if missing:
        raise KeyError(f"Genes {_preview(missing)} not found in {where} ({len(var_names)} genes).")
    return genes


def check_unique_genes(var_names: Sequence[str] | pd.Index, *, where: str) -> None:
    """Gene names must be unique: a duplicated name would silently pick one of its columns."""
    index = pd.Index(var_names)
    if not index.is_unique:
        dup = index[index.duplicated()].unique().tolist()
        raise ValueError(
            f"{where} has duplicated gene names {_preview(dup)}; expected unique `var_names` "
            "(e.g. `adata.var_names_make_unique()`, or keep one column per gene)."
        )


def get_counts(
    adata: AnnData, *, layer: str | None = None, where: str = "the table", integer: bool = True
) -> np.ndarray | sp.spmatrix:
    """Raw counts matrix (``X`` or ``layers[layer]``), checked to be finite, non-negative and (by default) integer.

    A matrix of non-integer values is almost always already normalised (``log1p``, scaled, ...): taking
    ``log1p`` of it again would train on the wrong scale without any error, so it is refused, naming the layer to
    pass instead. ``integer=False`` accepts non-integer (e.g. ambient-corrected) counts.
    """
    check_unique_genes(adata.var_names, where=where[:1].upper() + where[1:])
    check_name(layer, "layer", f"a layer of {where}", optional=True)
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found in {where} (have {layer_names(adata)}).")
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise ValueError(f"{where} has no expression matrix `X`; expected raw counts.")
    values = X.data if sp.issparse(X) else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{where} holds dtype {values.dtype}; expected numeric raw counts.")
    if values.size and not np.isfinite(values).all():
        bad = ~np.isfinite(values)
        raise ValueError(f"{where} contains {int(bad.sum())} NaN or infinite values; expected finite raw counts.")
    if values.size and values.min() < 0:
        raise ValueError(f"{where} contains negative values (min {values.min()}); expected raw counts >= 0.")
    if integer and values.size and np.issubdtype(values.dtype, np.floating):
        fractional = values != np.round(values)
        if fractional.any():
            example = float(values[fractional].ravel()[0])
            source = f"`layers[{layer!r}]`" if layer is not None else "`X`"
            raise ValueError(
                f"{where} {source} holds non-integer values ({int(fractional.sum())} of them, e.g. {example:.4g}); "
                "expected raw counts. It looks normalised (log1p or scaled): pass the raw counts instead, e.g. "
                f"`layer='counts'` (have layers {layer_names(adata)})."
            )
    return X


def check_instances(table_ids: np.ndarray, label_ids: np.ndarray, *, table_key: str, labels_key: str) -> None:
    """Every cell of the table must be a nucleus of the labels."""
    missing = np.setdiff1d(np.asarray(table_ids), np.asarray(label_ids))
    if missing.size:
        raise ValueError(
            f"Table {table_key!r} has {missing.size} cells whose ids are absent from labels {labels_key!r}: "
            f"{_preview(missing.tolist())}; expected every table cell to be a nucleus of {labels_key!r}."
        )


def check_cell_types(table: AnnData, cell_type_key: str | None, *, table_key: str) -> pd.Categorical | None:
    """The cell type column as a categorical (``None`` when ``cell_type_key`` is ``None``); refused when all missing."""
    if cell_type_key is None:
        return None
    check_name(cell_type_key, "cell_type_key", "a column of the table's `obs`")
    if cell_type_key not in table.obs:
        raise KeyError(
            f"Cell type column {cell_type_key!r} not found in `sdata.tables[{table_key!r}].obs` "
            f"(have {list(table.obs.columns)})."
        )
    types = pd.Categorical(table.obs[cell_type_key])
    if len(types) and (types.codes < 0).all():
        # a model fitted on these would have no cell types at all, and say nothing about it
        raise ValueError(
            f"Cell type column {cell_type_key!r} of `sdata.tables[{table_key!r}].obs` has no value: all "
            f"{len(types)} cells are NaN; expected a cell type for (most of) the cells. Fill the column (e.g. with "
            "`ghist.pp.annotate_cell_types`) or pass `cell_type_key=None` to train without cell types."
        )
    return types


def check_profiles(matrix: np.ndarray, names: Sequence[str], *, where: str) -> None:
    """Reference profiles (groups x genes, log1p scale) must be finite and not all zero; all-zero groups are named.

    An all-zero reference (e.g. counts of the wrong genes, or an empty layer) would give the profile-mixture head
    nothing to mix and train without a word; it is refused. A single all-zero group only gets a warning: a small
    panel may miss a rare type's genes.
    """
    matrix = np.asarray(matrix)
    if matrix.size == 0:
        raise ValueError(f"{where} are empty ({matrix.shape[0]} groups x {matrix.shape[1]} genes).")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where} contain {int((~np.isfinite(matrix)).sum())} NaN or infinite values.")
    if not matrix.any():
        raise ValueError(
            f"{where} are all zero ({matrix.shape[0]} groups x {matrix.shape[1]} genes): the reference holds no "
            "expression of these genes. Check that its `var_names` are the panel's genes and that `X` (or `layer=`) "
            "holds the counts."
        )
    empty = [str(n) for n, row in zip(names, matrix, strict=True) if not row.any()]
    if empty:
        logger.warning(
            "%s: %d group(s) express none of the %d genes (all-zero profiles): %s.",
            where,
            len(empty),
            matrix.shape[1],
            ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )
